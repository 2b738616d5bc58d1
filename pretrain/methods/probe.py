"""The kNN probe of every SSL method, as a mixin of :class:`pretrain.methods.base.SSLMethod`.

Each validation epoch embeds the labeled box crops of ``data.knn_val_json`` and reports the
leave-one-out kNN top-1 (:func:`pretrain.knn.knn_top1`), gathered over DDP processes; once, at
step 0 of a fresh run, the same probe on the untrained backbone gives the random-features
reference that the later values are read against. The host module provides ``forward``,
``config``, ``world_size``, ``knn_step0`` and ``knn_history``.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import pytorch_lightning as pl
import torch
from torch import Tensor

from pretrain.knn import knn_top1

log = logging.getLogger(__name__)


class KnnProbe(pl.LightningModule):
    """Validation = the kNN probe; plus the step-0 random-features reference."""

    config: dict[str, Any]
    _val_features: list[Tensor]
    _val_labels: list[Tensor]
    _val_index: list[Tensor]
    knn_step0: float | None
    knn_history: list[dict[str, Any]]
    knn_reference_loader: Any  # the kNN loader for the step-0 reference (pretrain.train hands it over)

    @property
    def world_size(self) -> int:
        """Processes training together (1 outside a trainer)."""
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def on_train_start(self) -> None:
        # The random-features reference: the probe on the backbone before its first update. Only on
        # a fresh run; a resumed one has it from its checkpoint (its weights are no longer random).
        if self.knn_step0 is None and self.global_step == 0:
            loader = self._knn_val_loader()
            if loader is not None:
                self.knn_step0 = self.knn_probe(loader)
                if self.trainer.is_global_zero:
                    log.info("kNN top-1 of the backbone at step 0 (random init): %.4f", self.knn_step0)
                for logger in self.loggers:  # (Lightning's loggers write on rank zero only)
                    logger.log_metrics({"knn_top1_step0": self.knn_step0}, step=0)

    def _knn_val_loader(self) -> Any:
        """The kNN probe's loader: the trainer's validation loader, set up before ``on_train_start``
        when validation is due in the first epoch; otherwise the loader the training entry point
        handed over (``knn_reference_loader``), so that a run validating every 100 epochs still gets
        its random-features reference. None when the run has no probe."""
        loaders = self.trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            loaders = getattr(self, "knn_reference_loader", None)
            if loaders is None and self.config.get("data", {}).get("knn_val_json"):
                log.info("no step-0 kNN reference: validation is not due in the first epoch and no "
                         "reference loader was given")
        return loaders

    @torch.no_grad()
    def knn_probe(self, loader: Any) -> float:
        """The kNN top-1 of the current backbone on ``loader``'s crops, outside a validation loop.

        The network runs in eval mode under the trainer's precision, as in validation; every
        module's train/eval mode is restored afterwards. Under DDP every process must call it.
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            feats, labels, index = [], [], []
            with self.trainer.precision_plugin.val_step_context():
                for images, y, i in loader:
                    # Moved by hand: the transfer hooks would make training views of a training-time batch.
                    feats.append(self.forward(images.to(self.device)).float())
                    labels.append(y.to(self.device))
                    index.append(torch.as_tensor(i, device=self.device))
            return self._knn_accuracy(torch.cat(feats), torch.cat(labels), torch.cat(index))
        finally:
            for m, mode in modes:
                m.training = mode

    def on_validation_epoch_start(self) -> None:
        self._val_features, self._val_labels, self._val_index = [], [], []

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        images, labels, index = batch
        self._val_features.append(self.forward(images).float())
        self._val_labels.append(labels)
        self._val_index.append(index)

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        acc = self._knn_accuracy(torch.cat(self._val_features), torch.cat(self._val_labels),
                                 torch.cat(self._val_index))
        # Every process computed the same value from the gathered set.
        self.log("knn_top1", acc, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.knn_history.append({"step": int(self.global_step), "epoch": int(self.current_epoch),
                                     "knn_top1": float(acc)})
        self._val_features, self._val_labels, self._val_index = [], [], []

    def _knn_accuracy(self, feats: Tensor, labels: Tensor, index: Tensor) -> float:
        """Leave-one-out kNN top-1 over the crops of every process (see :func:`pretrain.knn.knn_top1`)."""
        if self.world_size > 1:
            feats, labels, index = (cast(Tensor, self.all_gather(t)).flatten(0, 1) for t in (feats, labels, index))
            # DistributedSampler pads with repeats; a duplicate would be its own nearest neighbour.
            order = torch.argsort(index, stable=True)
            first = torch.ones_like(order, dtype=torch.bool)
            first[1:] = index[order][1:] != index[order][:-1]
            keep = order[first]
            feats, labels = feats[keep], labels[keep]
        kcfg = self.config.get("knn", {})
        return knn_top1(
            feats, labels, k=int(kcfg.get("k", 20)), vote=str(kcfg.get("vote", "weighted")),
            temperature=float(kcfg.get("temperature", 0.07)),
        )
