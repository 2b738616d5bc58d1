"""Faster R-CNN and RetinaNet (FPN) on a ResNet that the caller built and loaded.

The detectors are torchvision's own classes; only the backbone wrapping, the box heads and the
anchor defaults are chosen here. Labels are 1..K for K foreground classes: Faster R-CNN's softmax
gets ``K + 1`` outputs (index 0 is background); RetinaNet's sigmoid classifier gets exactly K and
:class:`KClassRetinaNet` shifts labels to 0..K-1 on the way in and back to 1..K on the way out.

``builders`` (the registry and the shared part of every build), one file per detector (``fasterrcnn``,
``retinanet``: its builder and its :class:`DetectorCapabilities`), ``capabilities`` (what a detector
can do, asked by inference, the semi stage and config checks), ``heads`` (the registry of RoI box
heads, RetinaNet's smooth-L1 regression), ``freezing`` (frozen stages with FrozenBatchNorm2d).
"""

import importlib
import pkgutil

from finetune.detectors.builders import (
    DETECTORS,
    RETINANET_BOX_LOSSES,
    DetectorSpec,
    build_detector,
    default_anchor_sizes,
    fpn_backbone,
    register_detector,
)
from finetune.detectors.capabilities import (
    CAPABILITIES,
    DetectorCapabilities,
    capabilities_for,
    capabilities_of,
    require,
)
from finetune.detectors.fasterrcnn import build_fasterrcnn
from finetune.detectors.freezing import STAGES, freeze_stages, to_frozen_bn
from finetune.detectors.heads import (
    BOX_HEADS,
    HEAD_NORMS,
    Res5BoxHead,
    SmoothL1RegressionHead,
    build_box_head,
    register_box_head,
)
from finetune.detectors.retinanet import KClassRetinaNet, build_retinanet

# Every file of this package is imported, so a new detector file registers itself without an edit here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BOX_HEADS",
    "CAPABILITIES",
    "DETECTORS",
    "HEAD_NORMS",
    "RETINANET_BOX_LOSSES",
    "STAGES",
    "DetectorCapabilities",
    "DetectorSpec",
    "KClassRetinaNet",
    "Res5BoxHead",
    "SmoothL1RegressionHead",
    "build_box_head",
    "build_detector",
    "build_fasterrcnn",
    "build_retinanet",
    "capabilities_for",
    "capabilities_of",
    "default_anchor_sizes",
    "fpn_backbone",
    "freeze_stages",
    "register_box_head",
    "register_detector",
    "require",
    "to_frozen_bn",
]
