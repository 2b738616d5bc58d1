"""torchvision ResNets with a chosen normalisation layer.

Both stages build their ResNet here so that parameter names stay torchvision's
own end to end (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

ARCHS = ("resnet18", "resnet34", "resnet50")
NORMS = ("bn", "gn", "frozen_bn", "syncbn")
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
# Channels of layer1..layer4 outputs, for FPN construction.
STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}


def norm_layer(norm: str, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """Return a ``norm_layer(num_channels)`` factory for torchvision's ResNet.

    ``syncbn`` builds plain BN here; the trainer converts it under DDP
    (``nn.SyncBatchNorm.convert_sync_batchnorm``) because SyncBN needs a process group.
    """
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return partial(group_norm, gn_groups)
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest count below that divides ``channels``
    (GroupNorm needs ``channels % groups == 0``): the one rule for backbones, FPNs and heads."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def build_resnet(arch: str, norm: str = "bn", gn_groups: int = 32) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet without its classifier.

    ``fc`` is replaced by ``Identity`` so the model returns pooled features and
    its state dict has no ``fc.*`` keys (the backbone-file contract).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    model = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer(norm, gn_groups))
    model.fc = nn.Identity()
    return model


def infer_norm(state_dict: dict) -> str:
    """'bn' when the weights carry BN running statistics, else 'gn'."""
    return "bn" if any(k.endswith("running_mean") for k in state_dict) else "gn"


def infer_arch(state_dict: dict) -> str | None:
    """Guess the ResNet depth from block counts and block type; None if unknown."""
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("layer3.")}
    bottleneck = any(".conv3." in k for k in state_dict)
    if not blocks:
        return None
    n = max(blocks) + 1
    if bottleneck:
        return {6: "resnet50"}.get(n)
    return {2: "resnet18", 6: "resnet34"}.get(n)
