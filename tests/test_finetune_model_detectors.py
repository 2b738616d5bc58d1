"""Detectors: every head/loss/norm combination trains a step and predicts; freezing; anchors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import FrozenBatchNorm2d

from finetune.detectors import (
    BOX_HEADS,
    Res5BoxHead,
    SmoothL1RegressionHead,
    build_detector,
    default_anchor_sizes,
    freeze_stages,
)
from pretrain.core.backbone.resnet import build_resnet

NUM_CLASSES = 3
# Few proposals and a narrow RoI head keep a Faster R-CNN step well under a second on CPU.
TINY_RCNN = {
    "min_size": 96,
    "max_size": 128,
    "rpn_pre_nms_top_n_train": 64,
    "rpn_post_nms_top_n_train": 32,
    "rpn_pre_nms_top_n_test": 64,
    "rpn_post_nms_top_n_test": 32,
    "box_batch_size_per_image": 32,
    "representation_size": 64,
}
TINY_RETINA = {"min_size": 96, "max_size": 128, "topk_candidates": 100}


def _batch(n: int = 2, h: int = 96, w: int = 128) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 40, h - 40])
        wh = 8 + torch.rand(3, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (3,), generator=g)})
    return images, targets


def _build(name: str, norm: str, trainable_layers: int = 3, **kwargs) -> nn.Module:
    tiny = TINY_RCNN if name == "fasterrcnn" else TINY_RETINA
    return build_detector(
        name, build_resnet("resnet18", norm), "resnet18", NUM_CLASSES, trainable_layers, **{**tiny, **kwargs}
    )


COMBOS = [("fasterrcnn", head, "smooth_l1") for head in BOX_HEADS] + [
    ("retinanet", "mlp", "smooth_l1"),
    ("retinanet", "mlp", "giou"),
]


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
@pytest.mark.parametrize(("name", "box_head", "box_loss"), COMBOS)
def test_detector_trains_a_step_and_predicts(name: str, box_head: str, box_loss: str, norm: str) -> None:
    torch.manual_seed(0)
    model = _build(name, norm, box_head=box_head, box_loss=box_loss)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == len(images)
    for det in out:
        assert det["boxes"].shape[1:] == (4,)
        assert det["boxes"].shape[0] == det["labels"].shape[0] == det["scores"].shape[0]
        assert det["boxes"].shape[0] <= 100
        # Labels come back in 1..K: index 0 is background (Faster R-CNN) or never a target (RetinaNet).
        if det["labels"].numel():
            assert det["labels"].min() >= 1 and det["labels"].max() <= NUM_CLASSES
        assert torch.all(det["boxes"][:, 2:] >= det["boxes"][:, :2])


def test_frozen_stages_get_no_gradient_and_keep_statistics() -> None:
    torch.manual_seed(0)
    model = _build("fasterrcnn", "bn", trainable_layers=2)  # stem, layer1, layer2 frozen
    body = model.backbone.body
    early = ("conv1", "bn1", "layer1", "layer2")
    frozen = {k: v.clone() for k, v in body.state_dict().items() if k.split(".")[0] in early}
    trained_stats = body.layer3[0].bn1.running_mean.clone()
    # torchvision only disables gradients in frozen stages; we also turn their BN into FrozenBN.
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer3[0].bn1, nn.BatchNorm2d)

    model.train()
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    for name, p in body.named_parameters():
        stage = name.split(".")[0]
        if stage in ("conv1", "bn1", "layer1", "layer2"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    after = body.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"{k} moved in a frozen stage"
    assert not torch.equal(body.layer3[0].bn1.running_mean, trained_stats), "BN stats in trained stages move"


def test_frozen_bn_statistics_never_move() -> None:
    model = _build("retinanet", "frozen_bn", trainable_layers=5)
    before = {k: v.clone() for k, v in model.backbone.body.state_dict().items() if "running" in k}
    assert before
    model.train()
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    after = model.backbone.body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("bad", [-1, 6])
def test_trainable_layers_bounds(bad: int) -> None:
    with pytest.raises(ValueError, match="trainable_layers"):
        _build("fasterrcnn", "frozen_bn", trainable_layers=bad)
    with pytest.raises(ValueError, match="trainable_layers"):
        freeze_stages(build_resnet("resnet18", "bn"), bad)


@pytest.mark.parametrize("trainable_layers", [0, 5])
def test_trainable_layers_extremes(trainable_layers: int) -> None:
    model = _build("fasterrcnn", "gn", trainable_layers=trainable_layers)
    flags = {p.requires_grad for p in model.backbone.body.parameters()}
    assert flags == {trainable_layers == 5}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


def test_gn_detector_has_no_batchnorm() -> None:
    for name, kwargs in (("fasterrcnn", {"box_head": "res5"}), ("fasterrcnn", {"box_head": "4conv1fc"}),
                         ("retinanet", {"head_norm": "gn"})):
        model = _build(name, "gn", **kwargs)
        kinds = {type(m) for m in model.modules()}
        batch_norms = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
        assert not any(issubclass(k, batch_norms) for k in kinds), name
        assert nn.GroupNorm in kinds


@pytest.mark.parametrize(
    ("name", "levels"),
    [("fasterrcnn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
     ("retinanet", {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128})],
)
@pytest.mark.parametrize("channels", [256, 64])
def test_fpn_levels_and_channels(name: str, levels: dict[str, int], channels: int) -> None:
    model = _build(name, "frozen_bn", fpn_channels=channels).eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == list(levels)
    for key, stride in levels.items():
        assert feats[key].shape == (1, channels, math.ceil(128 / stride), math.ceil(128 / stride)), key


# The first layer of each RoI box head and what it must take from a 64-channel FPN: a conv head the
# 64 channels, an MLP head the flattened 64x7x7 RoI features.
FIRST_LAYER_WIDTH = {"mlp": 64 * 7 * 7, "mlp_ln": 64 * 7 * 7, "res5": 64, "4conv1fc": 64}


@pytest.mark.parametrize(("name", "box_head"), [c[:2] for c in COMBOS[:len(BOX_HEADS) + 1]])
def test_a_narrower_fpn_narrows_every_head(name: str, box_head: str) -> None:
    """fpn_channels reaches the RPN / RetinaNet head and the RoI box head, and the detector trains."""
    model = _build(name, "frozen_bn", box_head=box_head, fpn_channels=64)
    head = model.rpn.head if name == "fasterrcnn" else model.head.classification_head
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 64
    if name == "fasterrcnn":
        first = next(m for m in model.roi_heads.box_head.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        width = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
        assert width == FIRST_LAYER_WIDTH[box_head]
    images, targets = _batch(2)
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_fpn_matches_torchvision_and_fits_resnet50() -> None:
    """Our FPN wrapper has torchvision's parameter names and shapes (checkpoints load across the switch)
    and reads each ResNet's own stage widths (ResNet-50's layer1 has 256 channels, ResNet-18's 64)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    from finetune.detectors import fpn_backbone

    for arch in ("resnet18", "resnet50"):
        ours = fpn_backbone(build_resnet(arch, "frozen_bn"), returned_layers=(1, 2, 3, 4))
        theirs = _resnet_fpn_extractor(build_resnet(arch, "frozen_bn"), 3, returned_layers=[1, 2, 3, 4])
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()}
        assert [b[0].in_channels for b in ours.fpn.inner_blocks] == (
            [64, 128, 256, 512] if arch == "resnet18" else [256, 512, 1024, 2048])


@pytest.mark.parametrize("p6p7_from", ["c5", "p5"])
def test_retinanet_p6p7_source_does_not_depend_on_the_fpn_width(p6p7_from: str) -> None:
    # torchvision picks P5 whenever C5 and the FPN have the same width (512 on a ResNet-18).
    for channels in (256, 512):
        model = _build("retinanet", "frozen_bn", fpn_channels=channels, retinanet_p6p7_from=p6p7_from)
        assert model.backbone.fpn.extra_blocks.use_P5 is (p6p7_from == "p5")


def test_box_loss_and_heads_are_wired() -> None:
    giou = _build("retinanet", "frozen_bn", box_loss="giou")
    assert giou.head.regression_head._loss_type == "giou"
    smooth = _build("retinanet", "frozen_bn", smooth_l1_beta=0.05)
    assert isinstance(smooth.head.regression_head, SmoothL1RegressionHead)
    assert smooth.head.regression_head.beta == 0.05
    assert isinstance(_build("fasterrcnn", "frozen_bn", box_head="res5").roi_heads.box_head, Res5BoxHead)
    ln = _build("fasterrcnn", "frozen_bn", box_head="mlp_ln").roi_heads.box_head
    assert sum(isinstance(m, nn.LayerNorm) for m in ln.modules()) == 2
    # K foreground classes + background.
    assert _build("fasterrcnn", "frozen_bn").roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    # softmax with a background class vs K sigmoids (no always-negative extra class)
    assert _build("retinanet", "frozen_bn").head.classification_head.num_classes == NUM_CLASSES


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fasterrcnn", {"box_loss": "giou"}, "retinanet only"),
        ("fasterrcnn", {"box_head": "nope"}, "unknown box_head"),
        ("retinanet", {"box_head": "res5"}, "Faster R-CNN RoI head"),
        ("retinanet", {"box_loss": "mse"}, "unknown box_loss"),
        ("retinanet", {"anchor_sizes": [16, 32, 64]}, "one entry per FPN level"),
        ("fasterrcnn", {"head_norm": "ln", "box_head": "res5"}, "unknown head/FPN norm"),
        ("ssd", {}, "unknown detector"),
        ("fasterrcnn", {"fpn_channels": 0}, "fpn_channels must be positive"),
        ("retinanet", {"fpn_channels": 0}, "fpn_channels must be positive"),
    ],
)
def test_bad_arguments_are_refused(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_detector(name, build_resnet("resnet18", "frozen_bn"), "resnet18", NUM_CLASSES, **kwargs)


def test_anchor_defaults_follow_input_size() -> None:
    assert default_anchor_sizes(800) == (32, 64, 128, 256, 512)  # torchvision's
    assert default_anchor_sizes(1333) == (32, 64, 128, 256, 512)
    assert default_anchor_sizes(128) == (8, 16, 32, 64, 128)  # 10..120 px objects in small images
    assert default_anchor_sizes(400) == (16, 32, 64, 128, 256)
    rcnn = _build("fasterrcnn", "frozen_bn", min_size=[96, 128])
    assert rcnn.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert rcnn.transform.min_size == (96, 128)
    retina = _build("retinanet", "frozen_bn", anchor_sizes=[16, 32, 64, 128, 256])
    assert retina.anchor_generator.sizes[0] == (16, 20, 25)  # three octave scales
    assert retina.anchor_generator.num_anchors_per_location() == [9] * 5


def test_image_normalisation_is_passed_through() -> None:
    model = _build("retinanet", "frozen_bn", image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    assert model.transform.image_mean == [0.5, 0.4, 0.3]
    assert model.transform.image_std == [0.2, 0.2, 0.2]


def test_accepts_tv_tensor_inputs() -> None:
    """Samples straight from the dataset/transforms (tv_tensors) feed the detector unchanged."""
    model = _build("fasterrcnn", "frozen_bn").train()
    images, targets = _batch(1)
    img = tv_tensors.Image(images[0])
    tgt = {"boxes": tv_tensors.BoundingBoxes(targets[0]["boxes"], format="XYXY", canvas_size=(96, 128)),
           "labels": targets[0]["labels"]}
    assert torch.isfinite(sum(model([img], [tgt]).values()))


def test_a_new_detector_is_one_registered_builder() -> None:
    from finetune.detectors import DETECTORS, DetectorSpec, register_detector

    seen: list[DetectorSpec] = []

    @register_detector("test_only_frcnn")
    def build(spec: DetectorSpec) -> nn.Module:  # e.g. Faster R-CNN with another RoI pooling
        seen.append(spec)
        return DETECTORS["fasterrcnn"](spec)

    try:
        model = build_detector("test_only_frcnn", build_resnet("resnet18", "frozen_bn"), "resnet18",
                               NUM_CLASSES, min_size=96, max_size=128, representation_size=64,
                               rpn_batch_size_per_image=32)
        assert seen and seen[0].options["representation_size"] == 64
        assert seen[0].extra == {"rpn_batch_size_per_image": 32}  # the rest goes to the torchvision class
        assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
        assert model.arch == "resnet18"
        with pytest.raises(ValueError, match="registered twice"):
            register_detector("test_only_frcnn")(build)
    finally:
        DETECTORS.pop("test_only_frcnn")
    registered = r"unknown detector 'yolo'; registered: \['fasterrcnn', 'retinanet'\]"
    with pytest.raises(ValueError, match=registered):
        build_detector("yolo", build_resnet("resnet18", "frozen_bn"), "resnet18", NUM_CLASSES)


@pytest.mark.parametrize("channels", [48, 96, 200, 256])
def test_one_group_norm_rule_for_backbone_and_heads(channels: int) -> None:
    """GroupNorm needs channels % groups == 0: 32 groups on 48 channels (min(32, C) = 32) cannot be built."""
    from finetune.detectors.heads import norm_factory
    from pretrain.core.backbone.resnet import norm_layer

    for gn in (norm_layer("gn", 32)(channels), norm_factory("gn")(channels)):
        assert gn.num_groups == math.gcd(32, channels) and channels % gn.num_groups == 0
        out = gn(torch.randn(2, channels, 3, 3))
        # Normalised per group: every group of every sample has zero mean.
        groups = out.reshape(2, gn.num_groups, -1).mean(-1)
        assert torch.allclose(groups, torch.zeros_like(groups), atol=1e-5)


def test_gn_backbone_with_groups_not_dividing_the_stem() -> None:
    # 24 groups divide none of resnet18's widths (64..512): the backbone uses 8 (= gcd) and trains.
    model = build_detector("retinanet", build_resnet("resnet18", "gn", gn_groups=24), "resnet18", NUM_CLASSES,
                           **TINY_RETINA)
    assert {m.num_groups for m in model.backbone.body.modules() if isinstance(m, nn.GroupNorm)} == {8}
    images, targets = _batch(1)
    assert torch.isfinite(sum(model.train()(images, targets).values()))


def test_a_new_box_head_is_one_registered_function() -> None:
    from finetune.detectors import register_box_head

    @register_box_head("test_only_linear")
    def linear(in_channels: int, representation_size: int, head_norm: str | None) -> nn.Module:
        return nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * 7 * 7, representation_size), nn.ReLU())

    try:
        model = _build("fasterrcnn", "frozen_bn", box_head="test_only_linear", fpn_channels=64)
        assert model.roi_heads.box_head[1].in_features == 64 * 7 * 7  # the builder passes the FPN width
        images, targets = _batch(1)
        assert torch.isfinite(sum(model.train()(images, targets).values()))
        with pytest.raises(ValueError, match="registered twice"):
            register_box_head("test_only_linear")(linear)
    finally:
        BOX_HEADS.pop("test_only_linear")
    registered = r"unknown box_head 'nope'; registered: \['4conv1fc', 'mlp', 'mlp_ln', 'res5'\]"
    with pytest.raises(ValueError, match=registered):
        _build("fasterrcnn", "frozen_bn", box_head="nope")
