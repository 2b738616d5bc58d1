"""Frozen stages: no gradients, and BatchNorm statistics fixed too (FrozenBatchNorm2d)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

# Stem first, as torchvision counts trainable layers from the end: 5 = everything, 0 = nothing.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def freeze_stages(backbone: torchvision.models.ResNet, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages, including their BN statistics.

    torchvision only sets ``requires_grad=False``, which leaves BatchNorm running statistics in
    frozen stages updating in train mode; like detectron2's ``freeze_at`` we convert those
    BatchNorms to FrozenBatchNorm2d (same values, no ``num_batches_tracked``). GroupNorm has no
    statistics and only loses its gradients.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    frozen = STAGES[: 5 - trainable_layers]
    for stage in frozen:
        names = ("conv1", "bn1") if stage == "stem" else (stage,)
        for attr in names:
            module = getattr(backbone, attr)
            setattr(backbone, attr, to_frozen_bn(module))
            for p in getattr(backbone, attr).parameters():
                p.requires_grad_(False)


def to_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (plain or sync) inside ``module`` by an equivalent FrozenBatchNorm2d."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for child_name, child in module.named_children():
        new = to_frozen_bn(child)
        if new is not child:
            setattr(module, child_name, new)
    return module
