"""Backbone loading: backbone file, torchvision state dict, Lightning checkpoint; mismatch errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from finetune.backbone import BackboneMismatchError, load_backbone
from pretrain.core.backbone.backbone_file import save_backbone_file
from pretrain.core.backbone.resnet import build_resnet


def _pretrained(norm: str = "bn", arch: str = "resnet18", seed: int = 0) -> nn.Module:
    """A ResNet whose weights and BN statistics differ from a fresh one."""
    torch.manual_seed(seed)
    model = build_resnet(arch, norm)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return model


def _same_weights(loaded: nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    checked = 0
    for k, v in source.items():
        if k in state and not k.endswith("num_batches_tracked"):
            assert torch.equal(state[k], v), k
            checked += 1
    assert checked >= 60


@pytest.fixture(scope="module")
def bn_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _pretrained("bn").state_dict()
    meta = {"arch": "resnet18", "norm": "bn", "method": "swav", "epochs": 3, "num_prototypes": 30,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = save_backbone_file(sd, tmp_path_factory.mktemp("bf"), meta)
    return path, sd


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "syncbn"])
def test_backbone_file_round_trip(bn_file, norm: str) -> None:
    path, sd = bn_file
    model, report = load_backbone(path, "resnet18", norm)
    assert report.format == "backbone_file"
    assert not report.missing and not report.unexpected
    expected = {k for k in sd if not (norm == "frozen_bn" and k.endswith("num_batches_tracked"))}
    assert set(report.matched) == expected
    # FrozenBN has no counters: they are set aside quietly, not reported as unexpected.
    assert set(report.ignored) == set(sd) - expected
    _same_weights(model, sd)
    norm_type = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    assert isinstance(model.layer1[0].bn1, norm_type)


def test_backbone_file_metadata_and_folder(bn_file) -> None:
    path, _ = bn_file
    _, report = load_backbone(path.parent, "auto", "frozen_bn")  # folder + arch from backbone.json
    assert report.meta["arch"] == "resnet18"
    assert report.summary()["method"] == "swav"
    assert report.summary()["num_prototypes"] == 30
    assert report.image_mean == [0.5, 0.5, 0.5] and report.image_std == [0.25, 0.25, 0.25]
    text = str(report)
    assert "matched    100" in text and "missing    0" in text and "unexpected 0" in text


def test_torchvision_state_dict_with_fc(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model, report = load_backbone(tmp_path / "r18.pth", "auto", "frozen_bn")
    assert report.format == "state_dict" and report.meta["arch"] == "resnet18"
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)
    assert not report.unexpected and not report.missing
    _same_weights(model, tv.state_dict())
    # The same tensors in a bare safetensors file (no json) load too.
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model, report = load_backbone(tmp_path / "r18.safetensors", "resnet18", "bn")
    assert report.format == "safetensors" and not report.unexpected
    _same_weights(model, tv.state_dict())


def test_wrapped_state_dicts(tmp_path: Path) -> None:
    """DDP/compile prefixes and {"model": ...}/{"state_dict": ...} wrappers are unwrapped."""
    sd = _pretrained("bn").state_dict()
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    for name in ("a.pt", "b.pth"):
        model, report = load_backbone(tmp_path / name, "resnet18", "bn")
        assert not report.missing and not report.unexpected, name
        _same_weights(model, sd)


def test_lightning_checkpoint(tmp_path: Path) -> None:
    online = _pretrained("bn", seed=0).state_dict()
    momentum = _pretrained("bn", seed=1).state_dict()
    state = {f"backbone.{k}": v for k, v in online.items()}
    state |= {f"backbone_momentum.{k}": v for k, v in momentum.items()}
    state |= {"projection_head.layers.0.weight": torch.zeros(8, 512), "prototypes.weight": torch.zeros(30, 8)}
    state["epochs_done"] = torch.tensor(4)  # pretrain's own counter wins over Lightning's epoch
    cfg = {"backbone": {"arch": "resnet18", "norm": "syncbn"},
           "method": {"name": "swav", "num_prototypes": 30}, "trainer": {"max_epochs": 10},
           "data": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}
    torch.save({"state_dict": state, "hyper_parameters": {"config": cfg}, "epoch": 9}, tmp_path / "last.ckpt")
    model, report = load_backbone(tmp_path / "last.ckpt", "auto", "frozen_bn")
    assert report.format == "lightning_ckpt"
    assert not report.missing and not report.unexpected
    assert report.summary() | {"checkpoint": None} == {
        "checkpoint": None, "format": "lightning_ckpt", "arch": "resnet18", "norm": "bn",
        "method": "swav", "epochs": 4, "num_prototypes": 30,
    }
    assert report.image_mean == [0.4, 0.4, 0.4]
    _same_weights(model, online)  # the online encoder, not the momentum copy
    del state["epochs_done"]
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "epoch": 9}, tmp_path / "old.ckpt")
    assert load_backbone(tmp_path / "old.ckpt", "auto", "bn")[1].meta["epochs"] == 10

    torch.save({"state_dict": {"classifier.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="no ResNet weights.*is it a pretrain or fine-tuning checkpoint"):
        load_backbone(tmp_path / "other.ckpt", "resnet18", "bn")


def test_arch_mismatch_names_the_fix(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(BackboneMismatchError, match=r"holds resnet34 weights.*backbone\.arch=resnet34"):
        load_backbone(tmp_path / "r34.pth", "resnet18", "frozen_bn")


def test_bn_weights_refuse_groupnorm(bn_file) -> None:
    path, _ = bn_file
    with pytest.raises(BackboneMismatchError) as err:
        load_backbone(path, "resnet18", "gn")
    msg = str(err.value)
    assert "BatchNorm" in msg and "frozen_bn" in msg and "backbone.norm=gn" in msg


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "syncbn"])
def test_gn_weights_refuse_batchnorm(tmp_path: Path, norm: str) -> None:
    torch.save(_pretrained("gn").state_dict(), tmp_path / "gn.pth")
    with pytest.raises(BackboneMismatchError, match="no BatchNorm running statistics.*backbone.norm=gn"):
        load_backbone(tmp_path / "gn.pth", "resnet18", norm)


def test_gn_round_trip(tmp_path: Path) -> None:
    sd = _pretrained("gn").state_dict()
    path = save_backbone_file(sd, tmp_path, {"arch": "resnet18", "norm": "gn", "method": "vicreg"})
    model, report = load_backbone(path, "resnet18", "gn")
    assert set(report.matched) == set(sd) and not report.ignored
    _same_weights(model, sd)


def test_strict_and_lenient_loading(tmp_path: Path) -> None:
    sd = dict(_pretrained("bn").state_dict())
    del sd["layer4.1.conv2.weight"]
    sd["layer4.1.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(BackboneMismatchError, match="strict load failed"):
        load_backbone(tmp_path / "odd.pth", "resnet18", "bn")
    model, report = load_backbone(tmp_path / "odd.pth", "resnet18", "bn", strict=False)
    assert report.missing == ["layer4.1.conv2.weight"]
    assert report.unexpected == ["layer4.1.extra.weight"]
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    sd = dict(_pretrained("bn").state_dict())
    sd["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # e.g. a grayscale-input stem
    torch.save(sd, tmp_path / "gray.pth")
    with pytest.raises(BackboneMismatchError, match=r"conv1.weight: file \(64, 1, 7, 7\)"):
        load_backbone(tmp_path / "gray.pth", "resnet18", "bn")


def test_random_init_and_bad_inputs(tmp_path: Path) -> None:
    model, report = load_backbone(None, "resnet18", "frozen_bn")
    assert report.format == "random" and "random" in str(report)
    # Random FrozenBN is the identity: running stats 0/1, affine 1/0.
    assert torch.all(model.bn1.running_var == 1) and torch.all(model.bn1.running_mean == 0)
    with pytest.raises(ValueError, match="arch=auto needs a checkpoint"):
        load_backbone(None, "auto", "bn")
    with pytest.raises(ValueError, match="unknown norm"):
        load_backbone(None, "resnet18", "layernorm")
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pth", "resnet18", "bn")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unrecognised backbone checkpoint"):
        load_backbone(tmp_path / "weights.npz", "resnet18", "bn")
    # Pickled objects are not executed: the weights-only load refuses them with the project's message.
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="refused to load backbone checkpoint .*argparse.Namespace"):
        load_backbone(tmp_path / "pickled.pth", "resnet18", "bn")


def test_file_written_by_pretrain_export(tmp_path: Path) -> None:
    """The real writer's metadata (pretrain.export) is understood."""
    from pretrain.export import write_backbone

    sd = _pretrained("bn").state_dict()
    config = {"backbone": {"arch": "resnet18", "norm": "bn"},
              "method": {"name": "swav", "num_prototypes": 30, "temperature": 0.1},
              "data": {"mean": [0.45, 0.45, 0.45], "std": [0.22, 0.22, 0.22]}}
    path = write_backbone({f"backbone.{k}": v for k, v in sd.items()}, config, tmp_path,
                          images_seen=64, epochs=2)
    model, report = load_backbone(path, "auto", "frozen_bn")
    assert report.summary()["method"] == "swav" and report.summary()["epochs"] == 2
    assert report.summary()["num_prototypes"] == 30
    assert report.image_mean == [0.45, 0.45, 0.45] and report.image_std == [0.22, 0.22, 0.22]
    _same_weights(model, sd)


def test_resnet_from_detector_weights(tmp_path: Path) -> None:
    """A fine-tuned detector's ResNet (backbone.body.*) can seed another run; FPN/heads are dropped."""
    from finetune.detectors import build_detector

    resnet = _pretrained("bn")
    sd = {k: v.clone() for k, v in resnet.state_dict().items()}
    detector = build_detector("fasterrcnn", resnet, "resnet18", 2, trainable_layers=5, min_size=64)
    torch.save(detector.state_dict(), tmp_path / "det.pth")
    wrapped = {f"model.{k}": v for k, v in detector.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "det.ckpt")
    for name in ("det.pth", "det.ckpt"):
        model, report = load_backbone(tmp_path / name, "auto", "bn")
        assert not report.missing and not report.unexpected, name
        _same_weights(model, sd)
