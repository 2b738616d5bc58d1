"""What each process of a distributed run trained on, and whether the ranks ended in agreement.

Under DDP every rank holds a full copy of the detector (and of the teacher in semi modes) and
its own shard of the data. :class:`DistributedReport` counts the labeled and unlabeled images
each rank trained on, keeps the labeled image ids of the first epoch (the shards must not
overlap), and at the end of training compares a checksum of every rank's weights. Rank 0 writes
the result into metrics.json as ``distributed``: a user sees that the global batch is the sum
over ranks and that no rank drifted, instead of trusting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback


def weights_checksum(module: torch.nn.Module) -> float:
    """Sum of every float parameter and buffer in float64: equal on ranks holding equal weights."""
    total = torch.zeros((), dtype=torch.float64)
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            total += t.detach().double().sum().cpu()
    return float(total)


class DistributedReport(Callback):
    """Per-rank image counts and a weights agreement check; ``report`` is set on every rank."""

    def __init__(self) -> None:
        self.labeled = 0
        self.unlabeled = 0
        self.first_epoch_ids: list[int] = []
        self.report: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        labeled, unlabeled = (batch["labeled"], batch["unlabeled"]) if isinstance(batch, Mapping) else (batch, None)
        _, targets = labeled
        self.labeled += len(targets)
        if trainer.current_epoch == 0:
            self.first_epoch_ids += [int(t["image_id"]) for t in targets]
        if unlabeled:
            self.unlabeled += len(unlabeled["strong"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = {
            "labeled_images": self.labeled,
            "unlabeled_images": self.unlabeled,
            "first_epoch_ids": self.first_epoch_ids,
            "student": weights_checksum(pl_module.model),  # type: ignore[arg-type]
            "teacher": weights_checksum(teacher) if isinstance(teacher := getattr(pl_module, "teacher", None),
                                                               torch.nn.Module) else None,
        }
        ranks: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        ids = [set(r["first_epoch_ids"]) for r in ranks]
        overlap = set.intersection(*ids) if len(ids) > 1 else set()

        def agree(key: str) -> bool | None:
            values = [r[key] for r in ranks]
            if values[0] is None:
                return None
            return all(abs(v - values[0]) <= 1e-6 * max(1.0, abs(values[0])) for v in values)

        self.report = {
            "world_size": len(ranks),
            "labeled_images_per_rank": [r["labeled_images"] for r in ranks],
            "unlabeled_images_per_rank": [r["unlabeled_images"] for r in ranks],
            "labeled_images_total": sum(r["labeled_images"] for r in ranks),
            "first_epoch_shards_overlap": sorted(overlap),
            "student_weights_agree": agree("student"),
            "teacher_weights_agree": agree("teacher"),
        }
