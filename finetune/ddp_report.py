"""What each process of a distributed run trained on, and whether the ranks ended in agreement.

Under DDP every rank holds a full copy of the module's detectors (each weight set it names, see
``DetectionModule.weight_sets``) and its own shard of the data. :class:`DistributedReport` counts
the images of each stream of the batches each rank trained on (``labeled``, and the other streams a
stage's batches carry), keeps the labeled image ids of the first epoch (the shards must not overlap),
and at the end of training compares a checksum of every rank's weight sets. Rank 0 writes the result
into metrics.json as ``distributed``: a user sees that the global batch is the sum over ranks and
that no rank drifted, instead of trusting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback


def weights_checksum(module: torch.nn.Module, prefix: str = "") -> float:
    """Sum of every float entry of ``module``'s state dict under ``prefix`` in float64: equal on ranks
    holding equal weights."""
    total = torch.zeros((), dtype=torch.float64)
    for k, t in module.state_dict().items():
        if k.startswith(prefix) and t.is_floating_point():
            total += t.detach().double().sum().cpu()
    return float(total)


def images_in(part: Any) -> int:
    """Images in one stream of a batch: ``(images, targets)``, or a mapping of views (its first list)."""
    if isinstance(part, Mapping):
        return len(next(iter(part.values()))) if part else 0
    return len(part[0])


class DistributedReport(Callback):
    """Per-rank image counts and a weights agreement check; ``report`` is set on every rank."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}  # per stream of the batches: labeled, and any other
        self.first_epoch_ids: list[int] = []
        self.report: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        streams = dict(batch) if isinstance(batch, Mapping) else {"labeled": batch}
        for name, part in streams.items():
            self.images[name] = self.images.get(name, 0) + images_in(part)
        _, targets = streams["labeled"]
        if trainer.current_epoch == 0:
            self.first_epoch_ids += [int(t["image_id"]) for t in targets]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sets = getattr(pl_module, "weight_sets", lambda: {"prefixes": {"student": "model."}})()["prefixes"]
        mine = {
            "images": dict(self.images),
            "first_epoch_ids": self.first_epoch_ids,
            "checksums": {name: weights_checksum(pl_module, prefix) for name, prefix in sets.items()},
        }
        ranks: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        ids = [set(r["first_epoch_ids"]) for r in ranks]
        overlap = set.intersection(*ids) if len(ids) > 1 else set()

        def agree(name: str) -> bool:
            values = [r["checksums"][name] for r in ranks]
            return all(abs(v - values[0]) <= 1e-6 * max(1.0, abs(values[0])) for v in values)

        streams = sorted({s for r in ranks for s in r["images"]})
        self.report = {
            "world_size": len(ranks),
            **{f"{s}_images_per_rank": [r["images"].get(s, 0) for r in ranks] for s in streams},
            "labeled_images_total": sum(r["images"].get("labeled", 0) for r in ranks),
            "first_epoch_shards_overlap": sorted(overlap),
            **{f"{name}_weights_agree": agree(name) for name in sorted(ranks[0]["checksums"])},
        }
