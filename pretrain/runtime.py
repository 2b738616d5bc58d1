"""Run-directory, resume and trainer plumbing shared by every entry point."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


def hydra_run_dir() -> Path:
    """The current Hydra run (or multirun job) directory, or cwd outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """``last.ckpt`` of an earlier run in ``run_dir``, if any: re-running resumes from it."""
    p = Path(run_dir) / CKPT_DIR / "last.ckpt"
    return p if p.exists() else None


def write_json(path: str | Path, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_jsonable))
    return p


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (DictConfig,)):
        return OmegaConf.to_container(o, resolve=True)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def save_config(cfg: DictConfig, run_dir: str | Path) -> None:
    """Write the resolved config as ``config.yaml`` (Hydra also keeps .hydra/)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_dir) / "config.yaml", resolve=True)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(Callback):
    """Stop with a clear message on a NaN/inf training loss.

    The checkpoint callback only ever writes after finite steps, so ``last.ckpt``
    stays the last good state; resume from it after fixing the cause (lower LR,
    precision=32, ...).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {trainer.global_step}; "
                f"the last good checkpoint is kept in {Path(trainer.default_root_dir) / CKPT_DIR}. "
                "Lower the learning rate, use trainer.precision=32, or check the data."
            )


def build_trainer(
    trainer_cfg: DictConfig | dict,
    run_dir: str | Path,
    callbacks: Iterable[Callback] = (),
    checkpoint: ModelCheckpoint | None = None,
) -> pl.Trainer:
    """A Lightning Trainer writing checkpoints, CSV logs and progress into ``run_dir``.

    ``trainer_cfg`` is passed through to ``pl.Trainer`` (any Trainer argument is a
    Hydra override: ``trainer.max_epochs=100 trainer.precision=bf16-mixed``).
    """
    run_dir = Path(run_dir)
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig) else dict(trainer_cfg)
    ckpt = checkpoint or ModelCheckpoint(dirpath=run_dir / CKPT_DIR, save_last=True, save_top_k=0)
    cbs = [ckpt, StopOnNonFiniteLoss(), pl.callbacks.LearningRateMonitor("step"), *callbacks]
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=CSVLogger(str(run_dir), name="logs", version=""),
        callbacks=cbs,
        **kwargs,
    )
