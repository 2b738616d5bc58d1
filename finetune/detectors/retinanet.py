"""RetinaNet (Lin et al. 2017) with a P3-P7 FPN and K sigmoid classifiers: the builder and what the
detector can do."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from finetune.detectors.builders import (
    RETINANET_BOX_LOSSES,
    DetectorSpec,
    anchor_generator,
    fpn_backbone,
    register_detector,
)
from finetune.detectors.capabilities import DetectorCapabilities
from finetune.detectors.heads import SmoothL1RegressionHead, norm_factory


def set_test_budget(model: nn.Module, proposals: int | None, pre_nms: int | None) -> dict[str, int]:
    """Candidates per level before NMS (``topk_candidates``): ``pre_nms`` or else ``proposals``."""
    if proposals is not None or pre_nms is not None:
        model.topk_candidates = pre_nms or proposals  # type: ignore[assignment]
    return {"topk_candidates": int(model.topk_candidates)}  # type: ignore[arg-type]


def anchor_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], int]:
    """The head's per-anchor class logits (N, A, K) and deltas (N, A, 4) on a normalised batch."""
    features = list(model.backbone(x).values())  # type: ignore[operator]
    grid = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
    out = model.head(features)  # type: ignore[operator]
    a = model.anchor_generator.num_anchors_per_location()[0]  # type: ignore[operator, union-attr]
    return out["cls_logits"], out["bbox_regression"], grid, int(a)


class KClassRetinaNet(RetinaNet):
    """RetinaNet with exactly K sigmoid classifiers, speaking the 1..K labels of the rest of the code.

    A sigmoid classifier has no background class: built for K+1 classes, index 0 would be a class
    with no positives that still adds focal-loss terms to every anchor and, at a low score
    threshold (0.001 for mAP), is emitted as a detection of no category. So the head has K
    outputs, training labels go in as 0..K-1 and detections come out as 1..K.
    """

    def forward(self, images, targets=None):  # type: ignore[no-untyped-def, override]
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        if isinstance(out, list):  # detections (eval mode)
            out = [{**d, "labels": d["labels"] + 1} for d in out]
        return out


CAPABILITIES = DetectorCapabilities(model_type=RetinaNet, roi_heads=False, sigmoid_classes=True,
                                    set_test_budget=set_test_budget, anchor_outputs=anchor_outputs)


@register_detector("retinanet", CAPABILITIES)
def build_retinanet(spec: DetectorSpec) -> nn.Module:
    """RetinaNet with a P3-P7 FPN and K sigmoid classifiers (:class:`KClassRetinaNet`)."""
    o = spec.options
    if spec.box_head != "mlp":
        raise ValueError(
            f"box_head={spec.box_head!r} is a Faster R-CNN RoI head; RetinaNet keeps its own conv head "
            "(leave box_head=mlp; head_norm=gn gives the GroupNorm head of torchvision's v2)"
        )
    if spec.box_loss not in RETINANET_BOX_LOSSES:
        raise ValueError(f"unknown box_loss {spec.box_loss!r}; RetinaNet supports {RETINANET_BOX_LOSSES}")
    p6p7_from = o["retinanet_p6p7_from"]
    if p6p7_from not in ("c5", "p5"):
        raise ValueError(f"retinanet_p6p7_from must be 'c5' or 'p5', got {p6p7_from!r}")
    anchors = anchor_generator(spec, octaves=True)
    c5 = spec.backbone.inplanes  # channels of layer4's output, whatever the depth
    channels = int(o["fpn_channels"])
    extra = LastLevelP6P7(c5 if p6p7_from == "c5" else channels, channels)
    # torchvision reads P5 whenever the two widths are equal, which a 512-channel FPN on a ResNet-18
    # (C5 has 512) would make true: the choice is ours, not a coincidence of widths.
    extra.use_P5 = p6p7_from == "p5"
    body = fpn_backbone(spec.backbone, returned_layers=(2, 3, 4),
                        fpn_norm=o["fpn_norm"], extra_blocks=extra, out_channels=channels)
    num_anchors = anchors.num_anchors_per_location()[0]
    head_norm = norm_factory(o["head_norm"] or "none")
    head = RetinaNetHead(channels, num_anchors, spec.num_classes, norm_layer=head_norm)
    if spec.box_loss == "smooth_l1":
        head.regression_head = SmoothL1RegressionHead(channels, num_anchors, float(o["smooth_l1_beta"]),
                                                      norm_layer=head_norm)
    else:
        head.regression_head._loss_type = spec.box_loss
    return KClassRetinaNet(
        body,
        num_classes=spec.num_classes,
        anchor_generator=anchors,
        head=head,
        score_thresh=spec.score_thresh,
        detections_per_img=spec.detections_per_img,
        **spec.transform,
        **spec.extra,
    )
