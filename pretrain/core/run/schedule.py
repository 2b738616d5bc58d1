"""Learning-rate schedules and the weight-decay split, one implementation for both stages.

Pretraining uses linear warmup + cosine (the SSL papers' schedule), fine-tuning step, cosine or
constant after a linear warmup (detectron2's). Both are a per-step factor of each group's base LR
in a :class:`ResumableLambdaLR`, and both leave biases and normalisation parameters undecayed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("step", "cosine", "constant")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def lr_factor(
    step: int,
    total_steps: int,
    name: str = "step",
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    milestones: Sequence[float] = (0.67, 0.89),
    gamma: float = 0.1,
    min_factor: float = 0.0,
    max_warmup_fraction: float = 0.1,
) -> float:
    """LR multiplier at optimiser step ``step`` of ``total_steps``: linear warmup, then the schedule.

    Args:
        name: ``step`` (times ``gamma`` at each of ``milestones``, fractions of the run), ``cosine``
            (from 1 down to ``min_factor`` at the last step, after the warmup) or ``constant``.
        warmup_steps: linear warmup from ``warmup_factor`` to 1, capped at ``max_warmup_fraction``
            of the run (fine-tuning: a tenth, so that short few-label runs spend most steps at the
            real LR; pretraining: uncapped, as the papers give warmup in epochs).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; choose one of {SCHEDULES}")
    total = max(1, int(total_steps))
    warmup = min(int(warmup_steps), int(total * max_warmup_fraction))
    if name == "step":
        factor = gamma ** sum(step >= round(m * total) for m in milestones)
    elif name == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if step < warmup:
        alpha = step / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class ResumableLambdaLR(LambdaLR):
    """A LambdaLR whose horizon comes from the current config when a run resumes.

    The restored state brings the step count and base LRs; the factor function (total steps,
    warmup) is the one built now, so raising ``trainer.max_epochs`` and re-running extends the
    schedule instead of continuing at the old run's final LR, and the optimiser's LR is set to
    the new schedule's value at once rather than one step late.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Keep this run's factor functions (their horizon), whatever the saved ones held.
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(self.last_epoch)


def no_weight_decay(module: nn.Module, param: nn.Parameter) -> bool:
    """Biases, normalisation parameters and other vectors are not decayed (standard for SSL and detection)."""
    return param.ndim <= 1 or isinstance(module, NORM_TYPES)


def decay_split(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters of ``modules`` as (decayed, not decayed), each once."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            for param in module.parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                (no_decay if no_weight_decay(module, param) else decay).append(param)
    return decay, no_decay
