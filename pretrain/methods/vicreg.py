"""VICReg: variance-invariance-covariance regularisation of two views' embeddings.

- [0] Bardes, Ponce, LeCun, VICReg, ICLR 2022, https://arxiv.org/abs/2105.04906
- [1] https://github.com/facebookresearch/vicreg
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from pretrain.callbacks import MetricBelowWarning
from pretrain.methods.base import SSLMethod


class VICReg(SSLMethod):
    """VICReg with an MLP expander; variance and covariance terms over the global batch under DDP."""

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        self.projection_head = VICRegProjectionHead(
            self.feature_dim, int(m["expander_hidden_dim"]), int(m["expander_dim"]), int(m["expander_layers"])
        )
        self.criterion = VICRegLoss(
            lambda_param=float(m["invariance_coeff"]),
            mu_param=float(m["variance_coeff"]),
            nu_param=float(m["covariance_coeff"]),
            gather_distributed=dist.is_available(),  # only acts under a process group
        )

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 2:
            raise ValueError(f"VICReg takes two views per image, got {len(views)}")
        # Each view through the networks on its own, as in [1] (BN statistics per view).
        z_a, z_b = (self.projection_head(self.forward(v)).float() for v in views)
        with torch.autocast(self.device.type, enabled=False):
            loss = self.criterion(z_a, z_b)
        with torch.no_grad():
            std = torch.sqrt(z_a.var(dim=0) + 1e-4).mean()
        return loss, {"vicreg_std": std}

    def method_callbacks(self) -> list[Callback]:
        m = self.method_cfg
        return [
            MetricBelowWarning(
                metric="vicreg_std",
                threshold=float(m.get("std_threshold", 0.05)),
                patience=int(m.get("collapse_patience", 200)),
                message=(
                    "VICReg embedding std is near zero (collapse). Raise method.variance_coeff, lower "
                    "the learning rate, or check that the two views differ (augmentations)."
                ),
            )
        ]
