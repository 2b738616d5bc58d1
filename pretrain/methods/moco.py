"""MoCo v2: contrast queries with momentum-encoder keys and a queue of past keys.

- [0] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  CVPR 2020, https://arxiv.org/abs/1911.05722
- [1] Chen et al., Improved Baselines with Momentum Contrastive Learning (MoCo v2), 2020,
  https://arxiv.org/abs/2003.04297
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from pretrain.methods.base import SSLMethod

log = logging.getLogger(__name__)
# method.queue_size=auto: at most this fraction of the unlabeled images, and never above the papers' 65536.
AUTO_QUEUE_FRACTION = 0.1
MAX_QUEUE = 65536


def auto_queue_size(num_images: int, keys_per_step: int, fraction: float = AUTO_QUEUE_FRACTION,
                    cap: int = MAX_QUEUE) -> int:
    """The queue length ``method.queue_size=auto`` gives: ``min(cap, fraction * num_images)`` rounded
    down to a multiple of ``keys_per_step``, and at least ``keys_per_step``.

    The papers' 65536 keys were sized for ImageNet's 1.28M images, where a key is 5% of an epoch
    old when it leaves the queue. With 1000 images every image's key would sit in it ~65 times,
    as negatives of its own later views, from encoders up to 65 epochs old. A multiple of the keys
    enqueued per step (the global batch) keeps lightly's ring buffer from dropping keys at the wrap.
    """
    if num_images < 1 or keys_per_step < 1:
        raise ValueError(f"need positive num_images and keys_per_step, got {num_images} and {keys_per_step}")
    size = min(cap, int(num_images * fraction)) // keys_per_step * keys_per_step
    return max(size, keys_per_step)


def resize_queue(bank: MemoryBankModule, length: int) -> None:
    """Give a lightly memory bank ``length`` fresh random unit keys (its device and dtype kept)."""
    if length != bank.size[0]:
        bank.size = (int(length), *bank.size[1:])
        bank._init_memory_bank(bank.size)


class MoCoV2(SSLMethod):
    """MoCo v2: the online (query) encoder is ``backbone``; its EMA copy is ``backbone_momentum``.

    The key encoder's EMA momentum is the paper's constant 0.999 (``momentum_schedule=constant``;
    [0] and its code keep m fixed), or rises from ``momentum_start`` to ``momentum_end`` on a cosine
    schedule over the run (``momentum_schedule=cosine``, as BYOL and MoCo v3 do). Keys are computed
    with shuffled BN across processes under DDP ([0], Sec. 3.3).
    The queue lives in lightly's memory bank; the base class saves it in checkpoints. Its length,
    ``method.queue_size``, is an integer or ``auto`` (:func:`auto_queue_size` of the training set,
    fixed when training starts and kept by resumes).
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__(config)
        m = self.method_cfg
        dim = int(m["projection_dim"])
        self.queue_auto = str(m["queue_size"]) == "auto"
        if not self.queue_auto and not (isinstance(m["queue_size"], int) and m["queue_size"] >= 0):
            raise ValueError(f"method.queue_size={m['queue_size']!r}: give a number of keys (0: no queue, "
                             "in-batch negatives) or auto (10% of the images, at most 65536)")
        # auto: one batch until on_train_start knows the data (or a checkpoint brings its queue).
        queue = int(self.config["data"]["batch_size"]) if self.queue_auto else int(m["queue_size"])
        self._queue_restored = False
        self.projection_head = MoCoProjectionHead(self.feature_dim, int(m["projection_hidden_dim"]), dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(
            temperature=float(m["temperature"]),
            memory_bank_size=(queue, dim),
            gather_distributed=dist.is_available(),  # keys of all processes enter the queue
        )

    # ------------------------------------------------------------------------------- queues
    def queues(self) -> list[MemoryBankModule]:
        """The key queues that ``method.queue_size`` sizes."""
        return [self.criterion.memory_bank]

    def resolved_settings(self) -> dict[str, Any]:
        return {"queue_length": int(self.queues()[0].size[0])}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, EMA copy)`` module pairs the momentum update moves."""
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    def on_train_start(self) -> None:
        super().on_train_start()
        try:
            num_images = len(self.trainer.train_dataloader.dataset)  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError):  # a loader without a sized dataset
            num_images = 0
        keys_per_step = int(self.config["data"]["batch_size"]) * self.world_size
        name = self.method_cfg["name"]
        if not num_images:
            if self.queue_auto and not self._queue_restored:
                rank_zero_warn(f"{name}: method.queue_size=auto needs a training set of known size; the queue "
                               f"stays at one batch ({self.queues()[0].size[0]} keys): give an integer")
            return
        if self.queue_auto and not self._queue_restored:
            length = auto_queue_size(num_images, keys_per_step)
            for bank in self.queues():
                resize_queue(bank, length)
            if self.trainer.is_global_zero:
                log.info("%s queue: %d keys (method.queue_size=auto: %.0f%% of %d images, a multiple of the %d "
                         "keys per step, at most %d)", name, length, 100 * AUTO_QUEUE_FRACTION, num_images,
                         keys_per_step, MAX_QUEUE)
        elif self.queues()[0].size[0] > num_images:
            length = self.queues()[0].size[0]
            rank_zero_warn(f"{name} queue of {length} keys is longer than the {num_images} training images: "
                           f"every image's key sits in it ~{length / num_images:.0f} times as a negative of its "
                           "own later views. method.queue_size=auto sizes it to the data")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("memory_banks", {})
        if self.queue_auto and saved:
            # auto was resolved when the run started: keep that queue (and its keys) on a resume.
            for name, module in self.named_modules():
                if isinstance(module, MemoryBankModule) and name in saved:
                    resize_queue(module, int(saved[name]["bank"].shape[0]))
            self._queue_restored = True
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------------------ training
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

    def update_momentum_encoders(self) -> float:
        """Move every EMA copy towards its online module; returns the momentum used."""
        momentum = self.momentum()
        for online, ema in self.momentum_pairs():
            update_momentum(online, ema, momentum)
        return momentum

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 2:
            raise ValueError(f"MoCo takes two views per image, got {len(views)}")
        momentum = self.update_momentum_encoders()
        query = self.projection_head(self.forward(views[0]))
        with torch.no_grad():
            distributed = self.world_size > 1
            shuffled, order = batch_shuffle(views[1], distributed=distributed)
            key = self.projection_head_momentum(self.backbone_momentum(self.prepare_input(shuffled)))
            key = batch_unshuffle(key, order, distributed=distributed)
        with torch.autocast(self.device.type, enabled=False):
            loss = self.criterion(query.float(), key.float())
        return loss, {"moco_momentum": momentum}
