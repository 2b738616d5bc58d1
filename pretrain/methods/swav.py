"""SwAV: swapped prediction of online cluster assignments across multi-crop views.

- [0] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments, NeurIPS 2020, https://arxiv.org/abs/2006.09882
- [1] https://github.com/facebookresearch/swav (main_swav.py)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.loss.swav_loss import sinkhorn
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from pretrain.callbacks import LossNearValueWarning
from pretrain.methods.base import SSLMethod


class SwAV(SSLMethod):
    """SwAV with multi-crop, frozen-then-trained prototypes, distributed Sinkhorn and a queue.

    The high-resolution crops (the first ``crop_counts[0]`` views) get codes from Sinkhorn;
    every other view predicts them. Once ``queue_start_epoch`` is reached, their embeddings
    also enter a queue (``queue_length`` is global, split over the processes); when it is full,
    its scores join the Sinkhorn step, which keeps the equipartition meaningful with small
    batches ([0], appendix A.1).
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        counts = m["transform"]["crop_counts"]
        self.num_high = int(counts[0])
        if sum(counts) < 2:
            raise ValueError(f"SwAV needs at least two views; crop_counts={counts}")
        self.num_prototypes = int(m["num_prototypes"])
        self.freeze_prototypes_iters = int(m.get("freeze_prototypes_iters", 0))
        self.queue_start_epoch = int(m.get("queue_start_epoch", 0))
        dim = int(m["projection_dim"])

        self.projection_head = SwaVProjectionHead(self.feature_dim, int(m["projection_hidden_dim"]), dim)
        self.prototypes = SwaVPrototypes(dim, self.num_prototypes)
        # The paper's prototypes are a bias-free linear layer on the unit sphere, so that the
        # scores are cosines; lightly's layer has a bias, which is removed here.
        for head in self.prototypes.heads:
            head.bias = None
        self.prototypes.normalize()
        self.criterion = SwaVLoss(
            temperature=float(m["temperature"]),
            sinkhorn_iterations=int(m["sinkhorn_iterations"]),
            sinkhorn_epsilon=float(m["sinkhorn_epsilon"]),
            # Only takes effect when a process group exists (DDP): then Q is normalised over
            # the global batch, as in [1].
            sinkhorn_gather_distributed=dist.is_available(),
        )
        # Registered buffers, so the queue is in every checkpoint and a resumed run continues it.
        queue_length = int(m.get("queue_length", 0))
        self.queue: Tensor
        self.queue_count: Tensor
        self.register_buffer("queue", torch.zeros(self.num_high, queue_length, dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def setup(self, stage: str) -> None:
        # The world size is known now, before a checkpoint is restored into the buffers.
        self.size_queue(self.world_size)

    def size_queue(self, world_size: int) -> None:
        """Hold ``method.queue_length / world_size`` embeddings in this process: the configured
        length is the global queue of the paper (3840 = 4 processes x 960)."""
        total = int(self.method_cfg.get("queue_length", 0))
        if total % world_size:
            raise ValueError(f"method.queue_length={total} is not divisible by the {world_size} processes; "
                             f"use a multiple of {world_size}")
        per = total // world_size
        batch = int(self.config["data"]["batch_size"])
        if 0 < per < batch:
            raise ValueError(f"method.queue_length={total} over {world_size} processes holds {per} "
                             f"embeddings per process, fewer than one batch ({batch}); use 0 (no queue) "
                             f"or >= {batch * world_size}")
        if per != self.queue_length:
            self.queue = torch.zeros(self.num_high, per, self.queue.shape[2], device=self.queue.device)
            self.queue_count.zero_()

    @property
    def queue_length(self) -> int:
        return int(self.queue.shape[1])

    @property
    def queue_active(self) -> bool:
        """Whether the queue is being filled (from ``queue_start_epoch`` on)."""
        return self.queue_length > 0 and self.current_epoch >= self.queue_start_epoch

    @property
    def queue_full(self) -> bool:
        return self.queue_length > 0 and int(self.queue_count) >= self.queue_length

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        self.prototypes.normalize()
        feats = self.embed_grouped(views)
        sizes = [f.shape[0] for f in feats]
        # One head pass over every crop (BN over all of them), as in [1].
        z = F.normalize(self.projection_head(torch.cat(feats)).float(), dim=1)
        # Scores and Sinkhorn in fp32: exp(score / epsilon) leaves the bf16/fp16 comfort zone.
        with torch.autocast(self.device.type, enabled=False):
            scores = list(self.prototypes(z).split(sizes))
            queue_scores = None
            used = self.queue_active and self.queue_full
            if used:
                queue_scores = [self.prototypes(self.queue[i]).detach() for i in range(self.num_high)]
            if self.queue_active:
                self._enqueue(z.split(sizes)[: self.num_high])
            loss = self.criterion(scores[: self.num_high], scores[self.num_high :], queue_scores)
            collapse = self._collapse_stats(z[: sizes[0]].detach(), scores[0].detach())
            stats = {"swav_queue_used": float(used), **collapse}
        return loss.squeeze(), stats

    def _collapse_stats(self, z: Tensor, scores: Tensor) -> dict[str, Tensor | float]:
        """What tells SwAV's collapse apart from slow learning, on the first high-resolution view:
        ``swav_embedding_cos``, the mean cosine between *different* images' embeddings (towards 1
        when every image maps to the same point), and ``swav_code_entropy``, the Sinkhorn codes'
        entropy over ln(num_prototypes) (towards 1 when the assignments are uniform)."""
        n = z.shape[0]
        if n < 2:
            return {}
        cos = (z @ z.t()).fill_diagonal_(0).sum() / (n * (n - 1))
        q = sinkhorn(scores, self.criterion.sinkhorn_iterations, self.criterion.sinkhorn_epsilon)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(1).mean() / math.log(self.num_prototypes)
        return {"swav_embedding_cos": cos, "swav_code_entropy": entropy}

    @torch.no_grad()
    def _enqueue(self, embeddings: Sequence[Tensor]) -> None:
        # Newest first, oldest dropped: the shift of [1] (queue[i, bs:] = queue[i, :-bs]).
        for i, e in enumerate(embeddings):
            e = e.detach()[: self.queue_length]
            n = e.shape[0]
            self.queue[i, n:] = self.queue[i, :-n].clone()
            self.queue[i, :n] = e
        self.queue_count.add_(embeddings[0].shape[0]).clamp_(max=self.queue_length)

    def on_after_backward(self) -> None:
        # Frozen prototypes, as in [1]: drop their gradients for the first iterations, so the
        # optimiser skips them (and their weight decay) while the rest of the network moves.
        if self.global_step < self.freeze_prototypes_iters:
            for p in self.prototypes.parameters():
                p.grad = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.queue_length and self.current_epoch >= self.queue_start_epoch:
            n_images = self.config["data"]["batch_size"] * self.trainer.num_training_batches
            if self.queue_length > n_images:
                rank_zero_warn(f"SwAV queue_length {self.queue_length} exceeds the images one "
                           f"process sees per epoch ({n_images}); the queue holds stale copies of "
                           "the same images: shorten method.queue_length")

    def method_callbacks(self) -> list[Callback]:
        m = self.method_cfg
        return [
            LossNearValueWarning(
                value=math.log(self.num_prototypes),
                margin=float(m.get("collapse_margin", 0.05)),
                patience=int(m.get("collapse_patience", 500)),
                message=(
                    f"SwAV loss has stayed near ln(num_prototypes) = {math.log(self.num_prototypes):.3f}: "
                    "the assignments are uniform (collapse). Start the queue later "
                    "(method.queue_start_epoch) or shorten it (method.queue_length), lower the learning "
                    "rate, or freeze the prototypes longer (method.freeze_prototypes_iters). Early in "
                    "short runs on small data: softer predictions (method.temperature=0.3) and views "
                    "that share content (larger crops, grayscale when colour is a shortcut); see "
                    "conf/pretrain/experiment/demo_swav.yaml."
                ),
            )
        ]
