"""The EMA teacher: maths over parameters and float buffers, no gradients, exact copy at burn-in end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.semi.ema import copy_weights, ema_update, make_teacher


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_ema_moves_parameters_and_float_buffers_but_not_counters() -> None:
    student = toy()
    student(torch.randn(2, 3, 8, 8))  # materialise the lazy layer, update BN statistics
    teacher = make_teacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()
    student(torch.randn(4, 3, 8, 8) * 3 + 2)  # new BN running mean/var and num_batches_tracked
    s = student.state_dict()
    ema_update(teacher, student, decay=0.9)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * s[k])
        else:  # num_batches_tracked: averaging a counter means nothing
            assert torch.equal(v, before[k]), k
    bn_mean = teacher[1].running_mean
    assert not torch.equal(bn_mean, before["1.running_mean"]), "BN statistics must follow the student too"


def test_decay_one_keeps_the_teacher_and_zero_copies_the_student() -> None:
    student = toy()
    student(torch.randn(1, 3, 8, 8))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0)
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(v, kept[k]) for k, v in teacher.state_dict().items())
    ema_update(teacher, student, 0.0)
    s = student.state_dict()
    assert all(torch.equal(v, s[k]) for k, v in teacher.state_dict().items() if v.is_floating_point())
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)


def test_teacher_receives_no_gradient_and_stays_in_eval_mode() -> None:
    student = toy()
    student(torch.randn(1, 3, 8, 8))
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    loss = student(torch.randn(2, 3, 8, 8)).sum() + teacher(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_copy_weights_makes_an_exact_copy() -> None:
    student = toy()
    student(torch.randn(2, 3, 8, 8))
    other = toy()
    other(torch.randn(1, 3, 8, 8))
    teacher = make_teacher(other)
    copy_weights(teacher, student)
    s = student.state_dict()
    assert all(torch.equal(v, s[k]) for k, v in teacher.state_dict().items())
