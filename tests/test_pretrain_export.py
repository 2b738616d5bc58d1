"""The backbone file: torchvision names, a clean round trip, and export from a bare checkpoint."""

from __future__ import annotations

import json

import hydra.utils
import pytest
import torch
import torchvision


def smoke_config(method: str, *overrides: str) -> dict:
    return plain_config(compose_config("pretrain", overrides=["experiment=smoke", f"method={method}", *overrides]))


def build(config: dict) -> SSLMethod:
    return hydra.utils.get_class(config["method"]["module"])(config)
from conftest import compose_config
from torch import nn

from pretrain.core.backbone.backbone_file import read_backbone_file
from pretrain.core.backbone.resnet import build_resnet
from pretrain.export import export_checkpoint, main, write_backbone
from pretrain.methods.base import SSLMethod, plain_config


def _perturb_bn(model: nn.Module) -> None:
    """Non-default BN statistics, so the round trip has to carry the buffers too."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)


@pytest.mark.parametrize("method", ["swav", "moco", "densecl", "detcon"])
def test_round_trip_into_a_fresh_torchvision_resnet(tmp_path, method):
    config = smoke_config(method)
    model = build(config)
    _perturb_bn(model.backbone)
    path = write_backbone(model.state_dict(), config, tmp_path, images_seen=123, epochs=4, global_step=9)
    state, meta = read_backbone_file(path)
    assert not any(k.startswith(("backbone", "_orig_mod", "fc.")) for k in state)

    resnet = getattr(torchvision.models, meta["arch"])(weights=None)
    result = resnet.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    resnet.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    resnet.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), resnet(x), atol=1e-5)

    assert meta["format_version"] == 1 and meta["method"] == method and meta["norm"] == "bn"
    assert meta["epochs"] == 4 and meta["images_seen"] == 123 and meta["global_step"] == 9
    assert meta["mean"] == config["data"]["mean"] and meta["config"]["method"]["name"] == method
    if method == "swav":
        assert meta["num_prototypes"] == 16
        assert meta["method_settings"]["queue_length"] == config["method"]["queue_length"]
        assert meta["method_settings"]["views"]["crop_sizes"] == [64, 32]
    else:
        assert meta["num_prototypes"] is None and meta["method_settings"]["temperature"] == config["method"][
            "temperature"]
    if method == "densecl":
        assert meta["method_settings"]["dense_lambda"] == 0.5
    if method == "detcon":
        assert meta["method_settings"]["num_samples"] == 4 and meta["method_settings"]["views"]["grid_size"] == [4, 4]


def test_group_norm_backbone_round_trip(tmp_path):
    config = smoke_config("vicreg", "backbone.norm=gn")
    model = build(config)
    path = write_backbone(model.state_dict(), config, tmp_path, images_seen=0, epochs=0)
    state, meta = read_backbone_file(path)
    assert meta["norm"] == "gn" and meta["gn_groups"] == 32
    assert not any("running_mean" in k for k in state)
    resnet = build_resnet(meta["arch"], meta["norm"], meta["gn_groups"])
    resnet.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    resnet.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), resnet(x), atol=1e-5)


def test_compiled_and_wrapped_prefixes_are_stripped(tmp_path):
    config = smoke_config("simclr")
    model = build(config)
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state, _ = read_backbone_file(write_backbone(sd, config, tmp_path, 0, 0))
    assert "conv1.weight" in state and torch.equal(state["conv1.weight"], model.backbone.conv1.weight)


def test_wrong_arch_is_refused(tmp_path):
    config = smoke_config("simclr")
    model = build(config)
    config["backbone"]["arch"] = "resnet34"
    with pytest.raises(ValueError, match="do not match resnet34"):
        write_backbone(model.state_dict(), config, tmp_path, 0, 0)


def _fake_checkpoint(tmp_path, config, model) -> object:
    """A checkpoint shaped like Lightning's: plain-dict hparams, state dict, counters."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    path = ckpt_dir / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0,
                "global_step": 3}, path)
    return path


def test_export_from_a_bare_checkpoint_with_weights_only(tmp_path, capsys):
    config = smoke_config("swav")
    model = build(config)
    model.images_seen.fill_(64)
    model.epochs_done.fill_(2)
    path = _fake_checkpoint(tmp_path, config, model)
    torch.load(path, weights_only=True)  # plain-dict hparams: no pickled objects
    out = export_checkpoint(path)
    assert out == tmp_path / "run" / "backbone.safetensors"
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["images_seen"] == 64 and meta["epochs"] == 2 and meta["global_step"] == 3
    state, _ = read_backbone_file(out)
    assert torch.equal(state["layer1.0.conv1.weight"], model.backbone.layer1[0].conv1.weight)

    assert main([str(path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "backbone.json").exists()
    assert main([str(tmp_path / "missing.ckpt")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_checkpoint_without_config_is_refused(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="no pretrain config"):
        export_checkpoint(path)
