"""The one schedule and weight-decay split both stages use."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from pretrain.core.run.schedule import ResumableLambdaLR, decay_split, lr_factor


def test_pretraining_warmup_is_not_capped_and_fine_tuning_warmup_is() -> None:
    # Pretraining gives warmup in epochs (VICReg: 10 of 100): a fifth of the run stays a fifth.
    assert lr_factor(100, 1000, "cosine", warmup_steps=200, warmup_factor=0.0, max_warmup_fraction=1.0) == 0.5
    # Fine-tuning caps it at a tenth of the run: at step 100 the warmup is over.
    assert lr_factor(100, 1000, "cosine", warmup_steps=200) == pytest.approx(1.0)


def test_resume_takes_the_new_horizon_at_once() -> None:
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    short = ResumableLambdaLR(opt, partial(lr_factor, total_steps=10, name="cosine", max_warmup_fraction=1.0))
    for _ in range(10):
        opt.step()
        short.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the end of the short run
    state = short.state_dict()
    opt2 = torch.optim.SGD([w], lr=1.0)
    longer = ResumableLambdaLR(opt2, partial(lr_factor, total_steps=20, name="cosine", max_warmup_fraction=1.0))
    longer.load_state_dict(state)
    assert longer.last_epoch == 10
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5)  # halfway along the new cosine, not 0


def test_biases_and_norms_are_not_decayed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    decay, no_decay = decay_split([model, model])  # shared modules count once
    assert [p.shape for p in decay] == [torch.Size([2, 4])]
    assert {id(p) for p in no_decay} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
