"""Checkpoints laid out like the official releases of the SSL code bases load, heads listed as ignored.

Each fixture is a random ResNet-18 under that repository's real key pattern (and container), saved
with torch.save and read back with weights_only=True, as a user's download would be.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from finetune.backbone import BackboneMismatchError, load_backbone
from pretrain.core.backbone.resnet import build_resnet


@pytest.fixture(scope="module")
def resnet() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_resnet("resnet18", "bn").state_dict()


def under(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


T = torch.zeros
SEQUENTIAL = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
# repository -> (builder of its checkpoint object from a ResNet state dict, file suffix, a head key it ignores)
LAYOUTS: dict[str, tuple[Callable[[dict], dict], str, str]] = {
    "swav": (lambda r: {"epoch": 100, "state_dict": {**under("module.", r),
                                                     "module.projection_head.0.weight": T(8, 512),
                                                     "module.prototypes.weight": T(30, 8)}}, ".pth.tar",
             "projection_head.0.weight"),
    "moco_v2": (lambda r: {"epoch": 200, "arch": "resnet18", "state_dict": {
        **under("module.encoder_q.", r), "module.encoder_q.fc.0.weight": T(8, 512),
        "module.encoder_q.fc.2.weight": T(4, 8),
        **under("module.encoder_k.", r), "module.queue": T(4, 16), "module.queue_ptr": T(1)}}, ".pth.tar", "queue"),
    "moco_v3": (lambda r: {"state_dict": {**under("module.base_encoder.", r),
                                          "module.base_encoder.fc.0.weight": T(8, 512),
                                          **under("module.momentum_encoder.", r),
                                          "module.predictor.0.weight": T(8, 8)}},
                ".pth.tar", "predictor.0.weight"),
    "simclr": (lambda r: {**under("encoder.", r), "projector.0.weight": T(8, 512)}, ".pt", "projector.0.weight"),
    "byol": (lambda r: {**under("online_encoder.net.", r), "online_encoder.projector.net.0.weight": T(8, 512),
                        "online_predictor.net.0.weight": T(8, 8), **under("target_encoder.net.", r)}, ".pt",
             "online_predictor.net.0.weight"),
    "dino": (lambda r: {"epoch": 100, "teacher": {**under("backbone.", r), "head.mlp.0.weight": T(8, 512),
                                                  "head.last_layer.weight_g": T(16, 1)},
                        "student": under("module.backbone.", r)}, ".pth", "head.last_layer.weight_g"),
    "vicreg": (lambda r: {"epoch": 3, "model": {**under("module.backbone.", r),
                                                "module.projector.0.weight": T(8, 512)}},
               ".pth", "projector.0.weight"),
    "barlow_twins": (lambda r: {"model": {**under("module.backbone.", r), "module.projector.0.weight": T(8, 512),
                                          "module.bn.running_mean": T(8)}}, ".pth", "bn.running_mean"),
    "solo_learn": (lambda r: {"state_dict": {**under("backbone.", r), "projector.0.weight": T(8, 512),
                                             "classifier.weight": T(10, 512), **under("momentum_backbone.", r),
                                             "predictor.0.weight": T(8, 8), "queue": T(2, 8, 16)}}, ".pth",
                   "momentum_backbone.conv1.weight"),
    "vissl": (lambda r: {"classy_state_dict": {"base_model": {"model": {
        "trunk": under("_feature_blocks.", r), "heads": {"0.clf.0.weight": T(8, 512)}}}}}, ".torch.pth",
              "heads.0.clf.0.weight"),
    "lightly": (lambda r: {**{f"backbone.{SEQUENTIAL[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v
                              for k, v in r.items()},
                           "projection_head.layers.0.weight": T(8, 512), "prototypes.layers.weight": T(30, 8)}, ".pth",
                "prototypes.layers.weight"),
    "timm": (lambda r: {**r, "fc.weight": T(1000, 512), "fc.bias": T(1000)}, ".pth", "fc.weight"),
}


@pytest.mark.parametrize("repo", sorted(LAYOUTS))
def test_official_layouts_load_with_heads_ignored(repo: str, resnet: dict, tmp_path: Path) -> None:
    build, suffix, head = LAYOUTS[repo]
    path = tmp_path / f"{repo}{suffix}"
    torch.save(build(resnet), path)
    model, report = load_backbone(path, "auto", "bn")
    expected = sorted(k for k in resnet)
    assert report.matched == expected and report.missing == [] and report.unexpected == []
    assert head in report.ignored, report.ignored
    assert report.meta["arch"] == "resnet18"
    for k in ("conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(model.state_dict()[k], resnet[k]), k


def test_an_unknown_extra_key_is_still_an_error(resnet: dict, tmp_path: Path) -> None:
    build, _, _ = LAYOUTS["swav"]
    ckpt = build(resnet)
    ckpt["state_dict"]["module.mystery_block.weight"] = T(3)
    torch.save(ckpt, tmp_path / "swav_plus.pth")
    with pytest.raises(BackboneMismatchError, match="mystery_block.weight"):
        load_backbone(tmp_path / "swav_plus.pth", "resnet18", "bn")
    _, report = load_backbone(tmp_path / "swav_plus.pth", "resnet18", "bn", strict=False)
    assert report.unexpected == ["mystery_block.weight"]
