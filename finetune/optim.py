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

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from finetune.detectors import to_frozen_bn
from pretrain.core.run.schedule import no_weight_decay

log = logging.getLogger(__name__)
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
            name of a preset in ``PRESETS``. Parts with multiplier 0 get no group: freeze them
            when the model is built, with :func:`freeze_parts`.
        freeze_backbone: leave every backbone stage (stem..layer4) out, as :func:`freeze_parts` froze it.

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
            if not param.requires_grad or (freeze_backbone and part in BACKBONE_PARTS) or mults[part] == 0:
                continue
            no_decay = no_weight_decay(module, param)
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


def freeze_parts(
    model: nn.Module,
    multipliers: Mapping[str, float] | str | None = None,
    freeze_backbone: bool = False,
) -> list[str]:
    """Freeze the parts that will not train, when the model is built.

    Parts with multiplier 0 (and, with ``freeze_backbone``, stem..layer4) lose their gradients and
    their BatchNorms become FrozenBatchNorm2d, so their running statistics stay as loaded too. This
    must happen before the trainer wraps the model (DDP registers the parameters that need
    gradients when it wraps; a later ``requires_grad_(False)`` breaks its gradient reduction).

    Parts with a small but non-zero multiplier (3-5-7 gives stem..layer2 1e-4) still train, and with
    ``norm=bn`` their BN statistics still follow every batch: use multiplier 0 or
    ``backbone.norm=frozen_bn`` to keep them fixed. That is logged.

    Returns:
        The frozen parts.
    """
    mults = resolve_multipliers(multipliers)
    frozen = [p for p in PARTS if mults[p] == 0 or (freeze_backbone and p in BACKBONE_PARTS)]
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and part_of(f"{name}.weight") in frozen:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, to_frozen_bn(module))
    for name, param in model.named_parameters():
        if part_of(name) in frozen:
            param.requires_grad_(False)
    drifting = [p for p in PARTS if p not in frozen and 0 < mults[p] < 1e-2 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and part_of(f"{n}.weight") == p
        for n, m in model.named_modules())]
    if frozen:
        log.info("frozen at build time (no gradients, BN statistics fixed): %s", ", ".join(frozen))
    if drifting:
        log.info("parts %s train at LR multipliers below 1e-2 but their BatchNorm statistics follow every "
                 "batch; use multiplier 0 or backbone.norm=frozen_bn to keep them as pretrained", drifting)
    return frozen


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


def linear_probe_factors(groups: Sequence[Mapping[str, Any]], factor: Callable[[int], float],
                         probe_steps: int) -> list[Callable[[int], float]]:
    """Per-group LR factors for LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained
    Features"): for the first ``probe_steps`` optimizer steps the backbone's groups (stem..layer4)
    stand still (factor 0) while the FPN and heads train on its features, then every group follows
    ``factor``. With ``probe_steps`` 0 every group follows ``factor``."""
    if probe_steps < 0:
        raise ValueError(f"linear_probe_steps must be >= 0, got {probe_steps}")

    def probed(step: int) -> float:
        return 0.0 if step < probe_steps else factor(step)

    return [probed if probe_steps and str(g["name"]).split(".")[0] in BACKBONE_PARTS else factor for g in groups]


def backbone_norms(model: nn.Module) -> list[nn.Module]:
    """The trainable BatchNorm layers of the detector's ResNet (``backbone.body``)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and part_of(f"{name}.weight") in BACKBONE_PARTS]
