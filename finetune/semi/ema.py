"""The exponential-moving-average teacher of Mean Teacher / Unbiased Teacher.

After each student step (every ``teacher_update_every`` steps), every floating-point entry of the
teacher's state dict, parameters and buffers alike (BatchNorm running mean/var), moves towards
the student's: ``t = decay * t + (1 - decay) * s``. Integer buffers (``num_batches_tracked``) are
left alone: averaging a counter means nothing. Unbiased Teacher uses a keep rate of 0.9996 per
student step on COCO (facebookresearch/unbiased-teacher, ``SEMISUPNET.EMA_KEEP_RATE``); on a few
hundred CPU steps that leaves the teacher where burn-in put it, hence smaller demo values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` in eval mode that never receives gradients."""
    teacher = copy.deepcopy(student)
    freeze_teacher(teacher)
    return teacher


def freeze_teacher(teacher: nn.Module) -> None:
    """No gradients and eval mode (torchvision's detectors return detections only in eval mode)."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Make the teacher an exact copy of the student (every state-dict entry, counters included)."""
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        t_state[name].copy_(value)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` over every float state-dict entry.

    Raises:
        ValueError: ``decay`` outside [0, 1], or the two models' state dicts differ in keys.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))[:5]
        raise ValueError(f"teacher and student differ in their state dict (e.g. {missing})")
    floats = [(t_state[k], s_state[k]) for k in t_state if t_state[k].is_floating_point()]
    if not floats:
        return
    t_vals = [t for t, _ in floats]
    s_vals = [s.detach().to(t.dtype) for t, s in floats]
    # One fused kernel over all tensors: t += (1 - decay) * (s - t).
    torch._foreach_lerp_(t_vals, s_vals, 1.0 - decay)
