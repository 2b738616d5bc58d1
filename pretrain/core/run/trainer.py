"""The Lightning trainer every entry point builds: precision and devices from the config, the
checkpoint IO, the guards and the loggers; SyncBN where it applies."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pretrain.core.run import precision
from pretrain.core.run.checkpoints import AtomicCheckpointIO, last_checkpoint_callbacks
from pretrain.core.run.guards import SaveOnSigterm, StopOnNonFiniteLoss
from pretrain.core.run.logs import ResumingCSVLogger, extra_loggers

log = logging.getLogger(__name__)


def use_sync_batchnorm(trainer_cfg: Mapping[str, Any], norm: str, norms: tuple[str, ...] = ("bn", "syncbn")) -> bool:
    """Whether Lightning should convert BatchNorm to SyncBatchNorm: the one rule of both stages.

    An explicit ``trainer.sync_batchnorm`` wins, except on CPUs; otherwise SyncBN exactly when several
    GPU processes train (DDP) a backbone whose ``norm`` is one of ``norms`` (pretraining: bn and
    syncbn, since per-GPU batches are small and BN statistics over them alone are noisy;
    fine-tuning: syncbn, the norm that asks for it). torch's SyncBatchNorm runs on GPUs only, so
    CPU DDP (gloo) keeps per-process BN.
    """
    ddp = str(trainer_cfg.get("strategy", "auto")).startswith("ddp")
    gpu = precision.training_device(trainer_cfg.get("accelerator", "auto")) == "cuda"
    explicit = trainer_cfg.get("sync_batchnorm")
    if explicit is not None:
        if explicit and not gpu:
            log.warning("trainer.sync_batchnorm=true ignored: torch's SyncBatchNorm runs on GPUs only")
        return bool(explicit) and gpu
    return ddp and gpu and norm in norms


def build_trainer(
    trainer_cfg: DictConfig | dict,
    run_dir: str | Path,
    callbacks: Iterable[Callback] = (),
    checkpoint: ModelCheckpoint | None = None,
    nonfinite_loss: str = "stop",
    loggers: Iterable[Mapping[str, Any]] = (),
) -> pl.Trainer:
    """A Lightning Trainer writing checkpoints, CSV logs and progress into ``run_dir``.

    ``trainer_cfg`` is passed through to ``pl.Trainer`` (any Trainer argument is a
    Hydra override: ``trainer.max_epochs=100 trainer.precision=bf16-mixed``).
    ``nonfinite_loss``: stop (default) or skip, see :class:`StopOnNonFiniteLoss`.
    ``loggers``: the ``logger.extra`` config, Lightning loggers beside the CSV one (see :func:`extra_loggers`).
    """
    run_dir = Path(run_dir)
    kwargs: dict[str, Any] = (
        dict(OmegaConf.to_container(trainer_cfg, resolve=True))  # type: ignore[arg-type]
        if isinstance(trainer_cfg, DictConfig)
        else dict(trainer_cfg)
    )
    if str(kwargs.get("precision", "auto")) == "auto":
        precision.apply(kwargs)
    ckpt = checkpoint or last_checkpoint_callbacks(run_dir)[0]
    cbs = [ckpt, StopOnNonFiniteLoss(nonfinite_loss), SaveOnSigterm(run_dir), pl.callbacks.LearningRateMonitor("step"),
           *callbacks]
    plugins = kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=[ResumingCSVLogger(str(run_dir), name="logs", version=""), *extra_loggers(loggers, run_dir)],
        callbacks=cbs,
        plugins=plugins,
        **kwargs,
    )
