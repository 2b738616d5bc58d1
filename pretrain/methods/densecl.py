"""DenseCL: MoCo v2's global contrast plus a dense one between matched locations of the two views.

- [0] Wang et al., Dense Contrastive Learning for Self-Supervised Visual Pre-Training, CVPR 2021,
  https://arxiv.org/abs/2011.09157 (COCO-pretrained DenseCL: +2.0 VOC detection AP over MoCo v2)
- [1] MoCo v2, https://arxiv.org/abs/2003.04297 (the global half, see pretrain/methods/moco.py)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.modules import DenseCLProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, select_most_similar
from omegaconf import DictConfig
from torch import Tensor, nn

from pretrain.methods.moco import MoCoV2


def locations(feature_map: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``: one row per location, row-major."""
    return feature_map.flatten(2).transpose(1, 2)


def match_keys(query_map: Tensor, key_map: Tensor, key_dense: Tensor) -> Tensor:
    """For every query location, the dense key of the key view's most similar location.

    The correspondence is read from the backbone's feature maps (cosine similarity), not from the
    projections that are being trained ([0], Sec. 3.3).

    Args:
        query_map: ``(B, C, H, W)`` backbone features of the query view.
        key_map: ``(B, C, H', W')`` backbone features of the key view.
        key_dense: ``(B, H'*W', D)`` dense key projections, rows in :func:`locations` order.

    Returns:
        ``(B, H*W, D)``: row ``j`` is the key of the location most similar to query location ``j``.
    """
    return select_most_similar(locations(query_map), locations(key_map), key_dense)


def dense_info_nce(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE of every query location against its matched key and a queue of negatives.

    lightly's NTXentLoss enqueues the positives it is given, but DenseCL's dense queue holds one
    pooled key per image ([0]'s ``queue2``) while its positives are per location; hence this.

    Args:
        query: ``(N, D)`` dense queries (all locations of all images).
        positive: ``(N, D)`` the matched key of each.
        negatives: ``(K, D)`` the queue.
        temperature: softmax temperature.
    """
    q, p, n = F.normalize(query, dim=1), F.normalize(positive, dim=1), F.normalize(negatives, dim=1)
    logits = torch.cat([(q * p).sum(1, keepdim=True), q @ n.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class DenseCL(MoCoV2):
    """DenseCL on MoCo v2 ([0]): ``loss = (1 - dense_lambda) * global + dense_lambda * dense``.

    The global half is MoCo v2 as in :class:`~pretrain.methods.moco.MoCoV2` (its head, queue,
    momentum encoder and schedule). The dense half projects every location of the last feature
    map with a 1x1-conv MLP (lightly's ``DenseCLProjectionHead`` applied per location); each query
    location's positive is the momentum encoder's dense key at the key view's most similar location
    (:func:`match_keys`), its negatives a second queue of per-image mean dense keys, sized as the
    first (``method.queue_size``).
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        self.dense_lambda = float(m["dense_lambda"])
        if not 0.0 <= self.dense_lambda <= 1.0:
            raise ValueError(f"method.dense_lambda={self.dense_lambda} must be in [0, 1] (the paper's 0.5)")
        if not self.queue_auto and int(m["queue_size"]) == 0:
            raise ValueError("method.queue_size=0: DenseCL's dense negatives come from its queue; "
                             "give a length or auto")
        dim = int(m["projection_dim"])
        self.dense_head = DenseCLProjectionHead(self.feature_dim, int(m["projection_hidden_dim"]), dim)
        self.dense_head_momentum = copy.deepcopy(self.dense_head)
        deactivate_requires_grad(self.dense_head_momentum)
        self.dense_queue = MemoryBankModule(
            size=self.criterion.memory_bank.size, gather_distributed=dist.is_available(), feature_dim_first=False
        )

    def queues(self) -> list[MemoryBankModule]:
        return [self.criterion.memory_bank, self.dense_queue]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.dense_head, self.dense_head_momentum)]

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 2:
            raise ValueError(f"DenseCL takes two views per image, got {len(views)}")
        momentum = self.update_momentum_encoders()
        q_map = self.feature_maps(views[0])
        q_global = self.projection_head(q_map.mean(dim=(2, 3)))
        q_dense = self.dense_head(locations(q_map))
        with torch.no_grad():
            distributed = self.world_size > 1
            shuffled, order = batch_shuffle(views[1], distributed=distributed)
            k_map = batch_unshuffle(self.feature_maps(shuffled, self.backbone_momentum), order,
                                    distributed=distributed)
            k_global = self.projection_head_momentum(k_map.mean(dim=(2, 3)))
            k_dense = self.dense_head_momentum(locations(k_map))
            k_matched = match_keys(q_map.detach().float(), k_map.float(), k_dense)
        with torch.autocast(self.device.type, enabled=False):
            loss_global = self.criterion(q_global.float(), k_global.float())
            # The queue's keys as they were before this batch's are the negatives, as for the global half.
            _, negatives = self.dense_queue(F.normalize(k_dense.float().mean(dim=1), dim=1),
                                            update=q_dense.requires_grad)
            loss_dense = dense_info_nce(q_dense.flatten(0, 1).float(), k_matched.flatten(0, 1).float(),
                                        negatives, float(self.method_cfg["temperature"]))
        loss = (1 - self.dense_lambda) * loss_global + self.dense_lambda * loss_dense
        return loss, {"densecl_global_loss": loss_global.detach(), "densecl_dense_loss": loss_dense.detach(),
                      "densecl_momentum": momentum}
