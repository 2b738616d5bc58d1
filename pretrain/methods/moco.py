"""MoCo v2: contrast queries with momentum-encoder keys and a queue of past keys.

- [0] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  CVPR 2020, https://arxiv.org/abs/1911.05722
- [1] Chen et al., Improved Baselines with Momentum Contrastive Learning (MoCo v2), 2020,
  https://arxiv.org/abs/2003.04297
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from omegaconf import DictConfig
from torch import Tensor

from pretrain.methods.base import SSLMethod


class MoCoV2(SSLMethod):
    """MoCo v2: the online (query) encoder is ``backbone``; its EMA copy is ``backbone_momentum``.

    The key encoder's EMA momentum is the paper's constant 0.999 (``momentum_schedule=constant``;
    [0] and its code keep m fixed), or rises from ``momentum_start`` to ``momentum_end`` on a cosine
    schedule over the run (``momentum_schedule=cosine``, as BYOL and MoCo v3 do). Keys are computed
    with shuffled BN across processes under DDP ([0], Sec. 3.3).
    The queue lives in lightly's memory bank; the base class saves it in checkpoints.
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        dim = int(m["projection_dim"])
        self.projection_head = MoCoProjectionHead(self.feature_dim, int(m["projection_hidden_dim"]), dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(
            temperature=float(m["temperature"]),
            memory_bank_size=(int(m["queue_size"]), dim),
            gather_distributed=dist.is_available(),  # keys of all processes enter the queue
        )

    def momentum(self) -> float:
        """The EMA momentum at the current step."""
        m = self.method_cfg
        schedule = str(m.get("momentum_schedule", "constant"))
        if schedule == "constant":
            return float(m["momentum_start"])
        if schedule != "cosine":
            raise ValueError(f"method.momentum_schedule={schedule!r}; choose constant or cosine")
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        return cosine_schedule(min(self.global_step, total), total, float(m["momentum_start"]),
                               float(m["momentum_end"]))

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 2:
            raise ValueError(f"MoCo takes two views per image, got {len(views)}")
        momentum = self.momentum()
        update_momentum(self.backbone, self.backbone_momentum, momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, momentum)
        query = self.projection_head(self.forward(views[0]))
        with torch.no_grad():
            distributed = self.world_size > 1
            shuffled, order = batch_shuffle(views[1], distributed=distributed)
            key = self.projection_head_momentum(self.backbone_momentum(self.prepare_input(shuffled)))
            key = batch_unshuffle(key, order, distributed=distributed)
        with torch.autocast(self.device.type, enabled=False):
            loss = self.criterion(query.float(), key.float())
        return loss, {"moco_momentum": momentum}
