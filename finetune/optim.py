"""Optimizer parameter groups with layer-wise learning rates for torchvision detectors.

Parts are found by torchvision's own module names, so the same code serves Faster R-CNN and
RetinaNet and any wrapper around them (a LightningModule holding the detector as ``model``):

* ``stem``: ``backbone.body.conv1`` / ``bn1``; ``layer1`` .. ``layer4``: ``backbone.body.layerN``;
* ``fpn``: ``backbone.fpn`` (incl. the P6/P7 extra block);
* ``head``: everything else (``rpn`` + ``roi_heads``, or RetinaNet's ``head``).

Each part is split into a decayed group (conv/linear weights) and a no-decay group (biases and
normalisation parameters, as is standard for detection). Frozen parameters are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

PARTS = ("head", "fpn", "layer4", "layer3", "layer2", "layer1", "stem")
BACKBONE_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")

# The "3-5-7" rule: learning rates of 1e-3 for the new head (and FPN), 1e-5 for the later backbone
# stages and 1e-7 for the stem and early stages, i.e. multipliers 1, 1e-2 and 1e-4 of the base LR.
# We read "later" as layer3/layer4 (the stages the detection heads draw their semantics from)
# and "early" as stem/layer1/layer2 (generic edge/texture filters that few labels should not
# move). With another base LR the ratios are kept, not the absolute values.
PRESETS: dict[str, dict[str, float]] = {
    "uniform": {},
    "3-5-7": {
        "head": 1.0,
        "fpn": 1.0,
        "layer4": 1e-2,
        "layer3": 1e-2,
        "layer2": 1e-4,
        "layer1": 1e-4,
        "stem": 1e-4,
    },
    # The common "backbone at a tenth of the head's LR" recipe (e.g. DETR, many fine-tuning guides).
    "backbone_0.1": {stage: 0.1 for stage in BACKBONE_PARTS},
}

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    multipliers: Mapping[str, float] | str | None = None,
    freeze_backbone: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` with per-part learning rates.

    Args:
        model: a torchvision detector, or a module that holds one.
        base_lr: learning rate of a part with multiplier 1.
        weight_decay: applied to weights; biases and norm parameters get 0.
        multipliers: per-part LR multipliers (keys from ``PARTS``; missing ones are 1.0), or the
            name of a preset in ``PRESETS``. A multiplier of 0 freezes that part.
        freeze_backbone: set ``requires_grad=False`` on every backbone stage (stem..layer4); the FPN
            and the head still train. With ``norm=bn`` the BN running statistics would still
            update in train mode; for a fully fixed backbone build the detector with
            ``trainable_layers=0`` instead, which also turns its BN into FrozenBatchNorm2d.

    Returns:
        Non-empty groups, each ``{"name", "params", "lr", "weight_decay", "lr_mult"}``; names are
        the part (``layer3``) or the part plus ``.no_decay``.

    Raises:
        ValueError: an unknown preset or part name, a negative multiplier, or no trainable params.
    """
    mults = resolve_multipliers(multipliers)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # shared parameters appear once
                continue
            seen.add(id(param))
            part = part_of(f"{module_name}.{param_name}" if module_name else param_name)
            if (freeze_backbone and part in BACKBONE_PARTS) or mults[part] == 0:
                param.requires_grad_(False)
            if not param.requires_grad:
                continue
            no_decay = param.ndim <= 1 or isinstance(module, _NORM_TYPES)
            buckets.setdefault((part, no_decay), []).append(param)

    groups = []
    for part in PARTS:
        for no_decay in (False, True):
            params = buckets.get((part, no_decay))
            if params:
                groups.append(
                    {
                        "name": f"{part}.no_decay" if no_decay else part,
                        "params": params,
                        "lr": base_lr * mults[part],
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "lr_mult": mults[part],
                    }
                )
    if not groups:
        raise ValueError("no trainable parameters left: everything is frozen")
    return groups


def resolve_multipliers(multipliers: Mapping[str, float] | str | None) -> dict[str, float]:
    """A full ``{part: multiplier}`` dict from a preset name, a partial mapping or None."""
    if multipliers is None:
        multipliers = {}
    elif isinstance(multipliers, str):
        if multipliers not in PRESETS:
            raise ValueError(f"unknown LR multiplier preset {multipliers!r}; choose one of {sorted(PRESETS)}")
        multipliers = PRESETS[multipliers]
    unknown = set(multipliers) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown LR multiplier keys {sorted(unknown)}; valid keys are {PARTS}")
    out = {part: float(multipliers.get(part, 1.0)) for part in PARTS}
    negative = {k: v for k, v in out.items() if v < 0}
    if negative:
        raise ValueError(f"LR multipliers must be >= 0, got {negative}")
    return out


def part_of(param_name: str) -> str:
    """The part (``stem``, ``layer1``..``layer4``, ``fpn`` or ``head``) a parameter belongs to."""
    parts = param_name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "backbone" and parts[i + 1] == "body":
            stage = parts[i + 2]
            return stage if stage in BACKBONE_PARTS else "stem"  # conv1/bn1 are the stem
        if parts[i] == "backbone" and parts[i + 1] == "fpn":
            return "fpn"
    return "head"
