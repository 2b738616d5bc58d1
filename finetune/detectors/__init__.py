"""Faster R-CNN and RetinaNet (FPN) on a ResNet that the caller built and loaded.

The detectors are torchvision's own classes; only the backbone wrapping, the box heads and the
anchor defaults are chosen here. Labels are 1..K for K foreground classes: Faster R-CNN's softmax
gets ``K + 1`` outputs (index 0 is background); RetinaNet's sigmoid classifier gets exactly K and
:class:`KClassRetinaNet` shifts labels to 0..K-1 on the way in and back to 1..K on the way out.

``builders`` (the registry and one builder per detector), ``heads`` (the registry of RoI box heads,
RetinaNet's smooth-L1 regression), ``freezing`` (frozen stages with FrozenBatchNorm2d).
"""

from finetune.detectors.builders import (
    DETECTORS,
    RETINANET_BOX_LOSSES,
    DetectorSpec,
    KClassRetinaNet,
    build_detector,
    default_anchor_sizes,
    fpn_backbone,
    register_detector,
)
from finetune.detectors.freezing import STAGES, freeze_stages, to_frozen_bn
from finetune.detectors.heads import (
    BOX_HEADS,
    HEAD_NORMS,
    Res5BoxHead,
    SmoothL1RegressionHead,
    build_box_head,
    register_box_head,
)

__all__ = [
    "BOX_HEADS", "DETECTORS", "HEAD_NORMS", "RETINANET_BOX_LOSSES", "STAGES", "DetectorSpec",
    "KClassRetinaNet", "Res5BoxHead", "SmoothL1RegressionHead", "build_box_head", "build_detector",
    "default_anchor_sizes", "fpn_backbone", "freeze_stages", "register_box_head", "register_detector",
    "to_frozen_bn",
]
