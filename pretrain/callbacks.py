"""Warnings for training that goes wrong without crashing: collapse shows up as flat numbers.

A non-finite loss is handled by :class:`pretrain.core.run.guards.StopOnNonFiniteLoss` (it stops the run
and keeps the last good checkpoint); these callbacks only warn, once per episode, with advice.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("loss")
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


class _StreakWarning(Callback):
    """Warn once when a condition on a per-step value holds for ``patience`` consecutive steps."""

    def __init__(self, patience: int, message: str) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.message = message
        self.streak = 0
        self.warned = False

    def value(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        raise NotImplementedError

    def condition(self, value: float) -> bool:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        v = self.value(trainer, outputs)
        if v is None:
            return
        if self.condition(v):
            self.streak += 1
        else:
            self.streak, self.warned = 0, False  # a new episode may warn again
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            rank_zero_warn(f"step {trainer.global_step}: {self.message} (value {v:.4g} for {self.streak} steps)")


class LossNearValueWarning(_StreakWarning):
    """Warn when the training loss stays within ``margin`` of ``value`` (e.g. SwAV's ln K)."""

    def __init__(self, value: float, margin: float, patience: int, message: str) -> None:
        super().__init__(patience, message)
        self.target = value
        self.margin = margin

    def value(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        return _scalar(outputs)

    def condition(self, value: float) -> bool:
        return abs(value - self.target) < self.margin


class MetricBelowWarning(_StreakWarning):
    """Warn when a logged per-step metric (e.g. VICReg's embedding std) stays below ``threshold``."""

    def __init__(self, metric: str, threshold: float, patience: int, message: str) -> None:
        super().__init__(patience, message)
        self.metric = metric
        self.threshold = threshold

    def value(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        return _scalar(trainer.callback_metrics.get(self.metric))

    def condition(self, value: float) -> bool:
        return value < self.threshold
