"""Faster R-CNN (Ren et al. 2015) with a P2-P6 FPN: the builder and what the detector can do."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from finetune.detectors.builders import DetectorSpec, anchor_generator, fpn_backbone, register_detector
from finetune.detectors.capabilities import DetectorCapabilities
from finetune.detectors.heads import ROI_SIZE, build_box_head


def set_test_budget(model: nn.Module, proposals: int | None, pre_nms: int | None) -> dict[str, int]:
    """RPN proposals kept per image after NMS (``proposals``) and per level before it (``pre_nms``)."""
    rpn: Any = model.rpn
    if proposals is not None:
        rpn._post_nms_top_n["testing"] = proposals
        rpn._pre_nms_top_n["testing"] = pre_nms or proposals
    elif pre_nms is not None:
        rpn._pre_nms_top_n["testing"] = pre_nms
    return {"rpn_pre_nms_top_n_test": rpn._pre_nms_top_n["testing"],
            "rpn_post_nms_top_n_test": rpn._post_nms_top_n["testing"]}


def anchor_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], int]:
    """The RPN's per-anchor objectness (N, A, 1) and deltas (N, A, 4) on a normalised batch."""
    features = list(model.backbone(x).values())  # type: ignore[operator]
    grid = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
    objectness, deltas = model.rpn.head(features)  # type: ignore[operator, union-attr]
    n = x.shape[0]
    a = objectness[0].shape[1]
    cls = torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1, 1) for o in objectness], 1)
    box = torch.cat([d.view(n, a, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in deltas], 1)
    return cls, box, grid, a


CAPABILITIES = DetectorCapabilities(model_type=FasterRCNN, roi_heads=True, sigmoid_classes=False,
                                    set_test_budget=set_test_budget, anchor_outputs=anchor_outputs)


@register_detector("fasterrcnn", CAPABILITIES)
def build_fasterrcnn(spec: DetectorSpec) -> nn.Module:
    """Faster R-CNN with a P2-P6 FPN, an RPN and the chosen RoI box head (softmax over K + 1)."""
    if spec.box_loss != "smooth_l1":
        raise ValueError(
            f"Faster R-CNN uses torchvision's smooth-L1 RPN/RoI box loss; box_loss={spec.box_loss!r} is "
            "available for retinanet only"
        )
    o = spec.options
    anchors = anchor_generator(spec, octaves=False)
    channels = int(o["fpn_channels"])
    body = fpn_backbone(spec.backbone, returned_layers=(1, 2, 3, 4),
                        fpn_norm=o["fpn_norm"], out_channels=channels)
    size = int(o["representation_size"])
    # RoIAlign's bilinear samples per bin side (torchvision: 2). Its CPU backward scales with
    # RoIs x channels x samples and dominates a CPU training step on small images: 1 is 4x cheaper.
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], ROI_SIZE, sampling_ratio=int(o["roi_sampling_ratio"]))
    return FasterRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_head=build_box_head(spec.box_head, size, o["head_norm"], in_channels=channels),
        box_predictor=FastRCNNPredictor(size, spec.num_classes + 1),
        box_score_thresh=spec.score_thresh,
        box_detections_per_img=spec.detections_per_img,
        **spec.transform,
        **spec.extra,
    )
