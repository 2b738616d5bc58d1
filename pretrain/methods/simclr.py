"""SimCLR: NT-Xent contrast between two views, negatives from the (global) batch.

- [0] Chen et al., A Simple Framework for Contrastive Learning of Visual Representations,
  ICML 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from omegaconf import DictConfig
from torch import Tensor

from pretrain.callbacks import LossNearValueWarning
from pretrain.methods.base import SSLMethod


class UniformSimilarityWarning(LossNearValueWarning):
    """SimCLR's loss stuck at ln(2N - 1), N the images contrasted per step over all processes: every
    view is as similar to its positive as to the 2N - 2 negatives, the loss of constant embeddings.
    The value is set when fitting starts (it needs the number of processes)."""

    def __init__(self, batch_size: int, margin: float, patience: int) -> None:
        super().__init__(value=math.nan, margin=margin, patience=patience, message="")
        self.batch_size = batch_size

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        n = self.batch_size * int(trainer.world_size)
        self.target = math.log(2 * n - 1)
        self.message = (
            f"SimCLR loss has stayed near ln(2N - 1) = {self.target:.3f} (N = {n} images per step): positives "
            "are no more similar than negatives, the embeddings have collapsed. The two views of an image "
            "must share content the other images lack: on images that all look alike (cells, textures) "
            "raise method.transform.min_scale so the crops overlap, or use a dense objective "
            "(method=densecl, method=detcon). When it collapsed early, lengthen the warmup: "
            "scheduler.warmup_epochs counts epochs, and on a few hundred images one epoch is a few steps "
            "(BCCD's 205 photographs at batch 64 collapsed with 3 warmup steps and not with 150); a lower "
            "LR helps when it collapsed after learning."
        )


class SimCLR(SSLMethod):
    """SimCLR with an MLP projection head; under DDP every process contrasts against all batches."""

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        self.projection_head = SimCLRProjectionHead(
            self.feature_dim, int(m["projection_hidden_dim"]), int(m["projection_dim"]),
            num_layers=int(m.get("projection_layers", 2)),
        )
        self.criterion = NTXentLoss(
            temperature=float(m["temperature"]),
            gather_distributed=dist.is_available(),  # only acts under a process group
        )

    def method_callbacks(self) -> list[pl.Callback]:
        m = self.method_cfg
        return [UniformSimilarityWarning(int(self.config["data"]["batch_size"]),
                                         margin=float(m.get("collapse_margin", 0.02)),
                                         patience=int(m.get("collapse_patience", 200)))]

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes two views per image, got {len(views)}")
        # Both views in one pass (the reference code concatenates them: BN sees 2B samples).
        feats = self.embed_grouped(views)
        z = self.projection_head(torch.cat(feats)).float()
        z0, z1 = z.chunk(2)
        with torch.autocast(self.device.type, enabled=False):
            loss = self.criterion(z0, z1)
        return loss, {}
