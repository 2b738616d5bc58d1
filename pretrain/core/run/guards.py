"""What keeps a run's work when it goes wrong: SIGTERM saves ``last.ckpt`` and exits 143, a non-finite
loss stops the run (or skips the step, counted), and :func:`fit` turns both into clear exits."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pretrain.core.run.checkpoints import CKPT_DIR, LAST

log = logging.getLogger(__name__)


class SaveOnSigterm(Callback):
    """SIGTERM (what SLURM, Kubernetes and ``timeout`` send) ends the run after the current step
    with ``last.ckpt`` saved; :func:`fit` then exits with status 143 and a message, no traceback.

    Lightning notices SIGTERM in its own handler but, in a single process, acts on it only at the
    end of the epoch, and then without a checkpoint. Under DDP it stops every rank at the start
    of the next step; either way the exception reaches :meth:`on_exception`, which saves.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / CKPT_DIR / LAST

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if getattr(trainer, "received_sigterm", False) and trainer.world_size == 1:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception) -> None:  # type: ignore[override]
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                log.warning("SIGTERM at global step %d: saved %s", trainer.global_step, self.path)


class Terminated(SystemExit):
    """Raised by :func:`fit` after SIGTERM: exit status 143 (128 + SIGTERM), the checkpoint saved."""


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit`` that turns a SIGTERM stop into a clean exit (status 143, no traceback)."""
    try:
        with warnings.catch_warnings():
            # pretrain.core.run.resume.DeterministicResume resumes the samplers mid-epoch itself.
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            trainer.fit(*args, **kwargs)
    except SIGTERMException:
        folder = Path(trainer.default_root_dir) / CKPT_DIR
        print(f"stopped by SIGTERM at global step {trainer.global_step}; the checkpoint is in {folder}. "
              "Re-run the same command to resume.", flush=True)
        raise Terminated(143) from None


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(Callback):
    """Stop with a clear message on a NaN/inf training loss, or skip that step (``mode="skip"``).

    stop (the default): the checkpoint callbacks run after this one (Lightning orders them last),
    so ``last.ckpt`` stays the last good state; resume from it after fixing the cause (lower LR,
    precision=32, ...).

    skip: the step's gradients are dropped before the optimizer sees them (no weight, momentum or
    Adam moment changes; the LR schedule still advances), a warning names the step, and the count
    is kept in ``skipped_steps`` (saved in checkpoints, reported in metrics.json). More than
    ``max_consecutive`` skips in a row is a diverged run, not a bad batch: it stops as above.
    """

    def __init__(self, mode: str = "stop", max_consecutive: int = 10) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss={mode!r}: use stop or skip")
        self.mode = mode
        self.max_consecutive = int(max_consecutive)
        self.skipped_steps: list[int] = []
        self._consecutive = 0
        self._step = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[override]
        self._step = trainer.global_step  # optimizer steps done before this batch's

    def _stop(self, trainer: pl.Trainer, what: str, step: int) -> NonFiniteLossError:
        why = (f" after {self._consecutive} skipped steps in a row (nonfinite_loss=skip allows "
               f"{self.max_consecutive})" if self.mode == "skip" else "")
        return NonFiniteLossError(
            f"non-finite {what} at global step {step}{why}; "
            f"the last good checkpoint is kept in {Path(trainer.default_root_dir) / CKPT_DIR}. "
            "Lower the learning rate, use trainer.precision=32, or check the data"
            + (" (or skip such steps: nonfinite_loss=skip)." if self.mode == "stop" else ".")
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        # skip decides on the gradients the optimizer is about to use: summed over an accumulation
        # window and, under DDP, averaged over the ranks, so every rank takes the same decision.
        if self.mode != "skip" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # 16-mixed: the GradScaler skips steps with inf/NaN gradients itself and lowers its scale
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._consecutive = 0
            return
        step = trainer.global_step  # optimizer steps done before this one
        if self._consecutive >= self.max_consecutive:
            raise self._stop(trainer, "gradients", step)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
        self._consecutive += 1
        self.skipped_steps.append(step)
        log.warning("non-finite loss or gradients at global step %d: step skipped, weights unchanged "
                    "(%d skipped so far, %d in a row; nonfinite_loss=skip)", step, len(self.skipped_steps),
                    self._consecutive)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if self.mode == "skip":
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            # Checkpoint callbacks run after this one: last.ckpt stays at the step before this batch.
            raise self._stop(trainer, f"training loss ({loss.item()})", self._step)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])]


def skipped_nonfinite_steps(trainer: pl.Trainer) -> list[int]:
    """The global steps whose update ``nonfinite_loss=skip`` dropped (over resumes too)."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StopOnNonFiniteLoss):
            return list(cb.skipped_steps)
    return []
