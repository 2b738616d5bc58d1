"""Runtime helpers both stages share: the SyncBatchNorm rule, a checkpoint's run directory, the device."""

from __future__ import annotations

import pytest
import torch

from pretrain.core.run import precision
from pretrain.core.run.checkpoints import run_dir_of
from pretrain.core.run.precision import resolve_device
from pretrain.core.run.trainer import use_sync_batchnorm

GPU_DDP = {"strategy": "ddp", "accelerator": "gpu"}
CPU_DDP = {"strategy": "ddp", "accelerator": "cpu"}
PRETRAIN = ("bn", "syncbn")  # the norms pretraining syncs; fine-tuning asks by norm: ("syncbn",)


@pytest.mark.parametrize(
    ("trainer", "norm", "norms", "expected"),
    [
        # pretraining (BN family: bn, syncbn): SyncBN under GPU DDP only
        (GPU_DDP, "bn", PRETRAIN, True),
        (GPU_DDP, "syncbn", PRETRAIN, True),
        (GPU_DDP, "gn", PRETRAIN, False),
        ({"strategy": "ddp_find_unused_parameters_true", "accelerator": "cuda"}, "bn", PRETRAIN, True),
        (CPU_DDP, "bn", PRETRAIN, False),  # gloo: SyncBN is GPU-only
        ({"strategy": "auto", "accelerator": "gpu"}, "bn", PRETRAIN, False),  # one process
        ({**GPU_DDP, "sync_batchnorm": False}, "bn", PRETRAIN, False),  # explicit off wins
        # fine-tuning asks for it by norm: syncbn converts, bn / frozen_bn / gn stay per process
        (GPU_DDP, "syncbn", ("syncbn",), True),
        (GPU_DDP, "bn", ("syncbn",), False),
        (GPU_DDP, "frozen_bn", ("syncbn",), False),
        (CPU_DDP, "syncbn", ("syncbn",), False),
        ({**GPU_DDP, "sync_batchnorm": True}, "gn", ("syncbn",), True),  # explicit on, on a GPU, wins
        ({**CPU_DDP, "sync_batchnorm": True}, "bn", ("bn",), False),  # not on a CPU
    ],
)
def test_sync_batchnorm_decision_table(trainer, norm, norms, expected) -> None:
    assert use_sync_batchnorm(trainer, norm, norms=norms) is expected


@pytest.mark.parametrize("cuda", [True, False])
def test_sync_batchnorm_with_accelerator_auto_follows_cuda(monkeypatch, cuda) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert use_sync_batchnorm({"strategy": "ddp", "accelerator": "auto"}, "bn") is cuda


def test_run_dir_of_a_checkpoint(tmp_path) -> None:
    """One rule for export, evaluate and predict: ``<run>/checkpoints/x.ckpt`` belongs to ``<run>``."""
    assert run_dir_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == tmp_path / "run"
    assert run_dir_of("run/checkpoints/best.ckpt").as_posix() == "run"
    assert run_dir_of(tmp_path / "elsewhere" / "model.ckpt") == tmp_path / "elsewhere"


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision.torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
