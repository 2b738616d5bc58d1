"""Layer-wise learning-rate groups: presets, freezing, no-decay groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from finetune.detectors import build_detector
from finetune.optim import PARTS, PRESETS, freeze_parts, param_groups, part_of, resolve_multipliers
from pretrain.core.backbone.resnet import build_resnet

BASE_LR, WD = 0.01, 1e-4


def _model(name: str = "fasterrcnn", norm: str = "bn", trainable_layers: int = 5) -> nn.Module:
    return build_detector(name, build_resnet("resnet18", norm), "resnet18", 2, trainable_layers,
                          min_size=64, max_size=96)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
def test_preset_3_5_7(name: str) -> None:
    groups = _by_name(param_groups(_model(name), BASE_LR, WD, "3-5-7"))
    expected = {"head": 1.0, "fpn": 1.0, "layer4": 1e-2, "layer3": 1e-2, "layer2": 1e-4, "layer1": 1e-4,
                "stem": 1e-4}
    for part, mult in expected.items():
        for group_name in (part, f"{part}.no_decay"):
            assert group_name in groups, group_name
            assert groups[group_name]["lr"] == pytest.approx(BASE_LR * mult), group_name
            assert groups[group_name]["lr_mult"] == mult
    # head = 1e-3 gives the rule's 1e-3 / 1e-5 / 1e-7.
    g = _by_name(param_groups(_model(name), 1e-3, WD, "3-5-7"))
    assert (g["head"]["lr"], g["layer4"]["lr"], g["stem"]["lr"]) == pytest.approx((1e-3, 1e-5, 1e-7))


def test_every_trainable_parameter_in_exactly_one_group() -> None:
    model = _model(trainable_layers=3)
    groups = param_groups(model, BASE_LR, WD, {"layer3": 0.5})
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    names = {g["name"].split(".")[0] for g in groups}
    assert names == {"head", "fpn", "layer4", "layer3", "layer2"}  # stem and layer1 are frozen
    assert _by_name(groups)["layer3"]["lr"] == pytest.approx(0.5 * BASE_LR)
    assert _by_name(groups)["layer4"]["lr"] == pytest.approx(BASE_LR)  # missing keys are 1.0


def test_no_decay_for_biases_and_norms() -> None:
    model = _model(norm="gn")
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
    for g in param_groups(model, BASE_LR, WD):
        if g["name"].endswith(".no_decay"):
            assert g["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == WD
            assert all(p.ndim > 1 and id(p) not in norm_params for p in g["params"])


def test_freeze_backbone() -> None:
    model = _model()
    assert freeze_parts(model, freeze_backbone=True) == ["layer4", "layer3", "layer2", "layer1", "stem"]
    groups = param_groups(model, BASE_LR, WD, freeze_backbone=True)
    assert {g["name"].split(".")[0] for g in groups} == {"head", "fpn"}
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


def test_zero_multiplier_freezes_the_part_and_its_statistics() -> None:
    model = _model("fasterrcnn", norm="bn")
    assert freeze_parts(model, {"layer1": 0.0}) == ["layer1"]
    groups = param_groups(model, BASE_LR, WD, {"layer1": 0.0})
    assert not any(g["name"].startswith("layer1") for g in groups)
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())
    # BN statistics fixed too: a train-mode forward leaves layer1's running mean as it was.
    assert isinstance(model.backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.body.layer2[0].bn1, nn.BatchNorm2d)
    before = model.backbone.body.layer1[0].bn1.running_mean.clone()
    model.train()
    model.backbone.body(torch.rand(2, 3, 64, 64))
    assert torch.equal(model.backbone.body.layer1[0].bn1.running_mean, before)


def test_small_multipliers_train_but_their_bn_statistics_drift_and_say_so(caplog) -> None:
    """3-5-7 gives stem..layer2 1e-4: they keep training, and with norm=bn a train-mode forward still
    moves their running statistics; freeze_parts says so (and says nothing with frozen_bn)."""
    model = _model("fasterrcnn", norm="bn")
    with caplog.at_level("INFO", logger="finetune.optim"):
        assert freeze_parts(model, "3-5-7") == []
    assert "['layer2', 'layer1', 'stem']" in caplog.text
    assert "BatchNorm statistics follow every batch" in caplog.text
    assert all(p.requires_grad for p in model.backbone.body.layer1.parameters())
    before = model.backbone.body.layer1[0].bn1.running_mean.clone()
    model.train()
    model.backbone.body(torch.rand(2, 3, 64, 64))
    assert not torch.equal(model.backbone.body.layer1[0].bn1.running_mean, before)

    caplog.clear()
    with caplog.at_level("INFO", logger="finetune.optim"):
        freeze_parts(_model("fasterrcnn", norm="frozen_bn"), "3-5-7")
    assert "follow every batch" not in caplog.text


def test_param_groups_no_longer_change_requires_grad() -> None:
    """Freezing belongs to build time (before DDP wraps the model); param_groups only reads."""
    model = _model()
    param_groups(model, BASE_LR, WD, {"layer1": 0.0}, freeze_backbone=True)
    assert all(p.requires_grad for p in model.backbone.body.layer1.parameters())


def test_wrapped_model_and_optimizer() -> None:
    """A LightningModule-style wrapper (self.model = detector) keeps the parts."""
    wrapper = nn.Module()
    wrapper.model = _model("retinanet")
    groups = param_groups(wrapper, BASE_LR, WD, "backbone_0.1")
    assert _by_name(groups)["layer2"]["lr"] == pytest.approx(0.1 * BASE_LR)
    assert _by_name(groups)["head"]["lr"] == pytest.approx(BASE_LR)
    opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]
    assert part_of("model.backbone.body.conv1.weight") == "stem"
    assert part_of("model.backbone.fpn.extra_blocks.p6.weight") == "fpn"
    assert part_of("model.head.regression_head.bbox_reg.weight") == "head"
    assert part_of("model.roi_heads.box_head.fc6.weight") == "head"


def test_bad_multipliers() -> None:
    with pytest.raises(ValueError, match="unknown LR multiplier preset"):
        resolve_multipliers("2-4-6")
    with pytest.raises(ValueError, match="unknown LR multiplier keys"):
        resolve_multipliers({"backbone": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        resolve_multipliers({"head": -1})
    assert resolve_multipliers(None) == dict.fromkeys(PARTS, 1.0)
    assert set(PRESETS) >= {"uniform", "3-5-7"}
    model = _model()
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, BASE_LR, WD, dict.fromkeys(PARTS, 0.0))
