"""Deterministic resume: a run stopped between checkpoints and re-run ends where the uninterrupted
run ends (same weights, same metrics), for pretraining, fine-tuning and the semi stage.

The stop is an exception raised inside a training step right after a step checkpoint (what a
SIGKILL leaves behind, without a subprocess: tests/test_reliability.py kills real processes).
"""

from __future__ import annotations

import pytest
import torch
from test_pretrain_train import smoke_cfg as pretrain_cfg
from test_semi_train import smoke_cfg
from torch.utils.data import DataLoader, Dataset

from finetune.module import DetectionModule
from finetune.run import run as finetune_train
from finetune.semi.module import SemiDetectionModule
from pretrain.core.run.resume import EpochSampler, SeededSamples, mix
from pretrain.core.run.safe_load import load_torch_file
from pretrain.methods.swav import SwAV
from pretrain.train import train as pretrain_train


class Killed(RuntimeError):
    pass


def _kill_at(monkeypatch: pytest.MonkeyPatch, cls: type, step: int) -> None:
    original = cls.training_step

    def step_or_die(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step == step:
            raise Killed(f"killed at step {step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", step_or_die)


def _float_state(path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v for k, v in load_torch_file(path)["state_dict"].items() if v.is_floating_point()}


# ------------------------------------------------------------------------------ the parts
def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_starts_mid_epoch():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10))
    assert list(EpochSampler(10, seed=3)) == first  # a fresh process draws the same
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _ in second] != [i for i, _ in first]
    s.start_at(4)
    assert list(s) == second[4:]  # skipped once ...
    assert list(s) == second  # ... then whole epochs again
    assert len({seed for _, seed in first + second}) == 20  # every sample of every epoch its own seed


def test_epoch_sampler_repeats_permutations_to_last_as_asked():
    s = EpochSampler(5, num_samples=12, seed=0)
    idx = [i for i, _ in s]
    assert len(idx) == len(s) == 12
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5))


class _Noisy(Dataset):
    """A 'random augmentation' of each index: torch, NumPy and Python RNG draws."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np
        return torch.tensor([i, torch.rand(()).item(), float(np.random.rand()), random.random()])


def test_a_sample_is_augmented_the_same_whatever_worker_reads_it():
    def batches(workers: int, start: int = 0) -> list[torch.Tensor]:
        sampler = EpochSampler(16, seed=7)
        sampler.set_epoch(2)
        sampler.start_at(start)
        return list(DataLoader(SeededSamples(_Noisy()), batch_size=4, sampler=sampler, num_workers=workers))

    in_process = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(in_process, batches(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(in_process[2:], batches(2, start=8), strict=True))
    assert len({round(float(x), 6) for b in in_process for x in b[:, 1]}) == 16  # still random per sample
    assert mix(1, 2) != mix(2, 1) and mix(0) != mix(0, 0)


# ------------------------------------------------------------------------------ whole runs
SEMI = ("semi=unbiased_teacher", "semi.burn_in=1", "semi.ema_decay=0.5", "semi.threshold=0.0",
        "detector.detections_per_img=20")


@pytest.mark.parametrize("cls, overrides, kill_step", [
    (DetectionModule, (), 4),
    pytest.param(DetectionModule, (), 3, marks=pytest.mark.slow),
    pytest.param(SemiDetectionModule, SEMI, 4, marks=pytest.mark.slow),  # 2.5 min each on 2 cores
    pytest.param(SemiDetectionModule, SEMI, 3, marks=pytest.mark.slow),
], ids=["finetune-mid-epoch", "finetune-epoch-boundary", "semi-mid-epoch", "semi-epoch-boundary"])
def test_killed_detection_run_ends_like_the_uninterrupted_one(cls, overrides, kill_step, synthetic_data, tmp_path,
                                                              monkeypatch):
    """3 steps per epoch, 2 epochs; killed at step 4 (one batch into epoch 2) or 3 (its start)."""
    args = (*overrides, "checkpoint_every_n_steps=1", "trainer.max_epochs=2", "eval.plots=false")
    whole = finetune_train(smoke_cfg(synthetic_data["root"], *args), tmp_path / "whole")
    with monkeypatch.context() as m:
        _kill_at(m, cls, kill_step)
        with pytest.raises(Killed):
            finetune_train(smoke_cfg(synthetic_data["root"], *args), tmp_path / "killed")
    assert load_torch_file(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == kill_step
    resumed = finetune_train(smoke_cfg(synthetic_data["root"], *args), tmp_path / "killed")
    assert resumed["global_step"] == whole["global_step"] == 6
    a = _float_state(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    b = _float_state(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed["coco"] == whole["coco"]
    # The epochs' mean training loss too (the running sum is in the checkpoint).
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]


@pytest.mark.slow  # 3 pretraining runs; the SIGKILL test in test_reliability.py covers resuming in make test
@pytest.mark.parametrize("views", [(), ("data.augment=tensor", "data.views_on=device", "data.num_workers=2")],
                         ids=["pil", "tensor-views-on-device"])
def test_killed_pretraining_ends_like_the_uninterrupted_one(views, synthetic_data, tmp_path, monkeypatch):
    """SwAV with its queue, 4 steps per epoch, 2 epochs, killed one batch into epoch 2; the views made
    per image in the workers (pil) or per batch on the device after the transfer."""
    overrides = ("method=swav", f"data.root={synthetic_data['root']}", "data.synthetic=null",
                 "data.knn_val_json=null", "checkpoint_every_n_steps=1", "trainer.max_epochs=2",
                 "method.queue_length=8", "method.queue_start_epoch=0", *views)
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = pretrain_train(pretrain_cfg(*overrides))
    monkeypatch.chdir(tmp_path / "killed")
    with monkeypatch.context() as m:
        _kill_at(m, SwAV, 5)
        with pytest.raises(Killed):
            pretrain_train(pretrain_cfg(*overrides))
    resumed = pretrain_train(pretrain_cfg(*overrides))
    assert resumed["global_step"] == whole["global_step"] == 8
    a = _float_state(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    b = _float_state(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert any("queue" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed["final_loss"] == whole["final_loss"]
