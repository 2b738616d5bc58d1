"""SimCLR: NT-Xent contrast between two views, negatives from the (global) batch.

- [0] Chen et al., A Simple Framework for Contrastive Learning of Visual Representations,
  ICML 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from omegaconf import DictConfig
from torch import Tensor

from pretrain.methods.base import SSLMethod


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
