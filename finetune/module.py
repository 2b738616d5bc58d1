"""Lightning module for detection fine-tuning: a torchvision detector, its optimiser and COCO val AP.

The checkpoint carries everything needed to rebuild the model (nanoGPT-style): the resolved
config, the label map, the resolved backbone description and input normalisation, all as plain
containers, so ``torch.load(ckpt, weights_only=True)`` reads it and
:func:`load_detection_checkpoint` rebuilds the detector without the original backbone file
(the backbone weights are in ``state_dict``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from finetune.backbone import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported)
from finetune.bn_recalibrate import image_batches, recalibrate_bn
from finetune.coco_eval import evaluate_coco
from finetune.coco_results import detections_to_coco
from finetune.detectors import build_detector
from finetune.inference import detect
from finetune.optim import backbone_norms, freeze_parts, linear_probe_factors, param_groups
from finetune.transforms import strong_augment
from pretrain.core.backbone.resnet import build_resnet
from pretrain.core.data.coco import LabelMap
from pretrain.core.run.resume import mix
from pretrain.core.run.schedule import ResumableLambdaLR, lr_factor

log = logging.getLogger(__name__)

# Detector keys of the config that are build_detector arguments (the rest: name, kwargs).
_DETECTOR_ARGS = ("box_head", "box_loss", "min_size", "max_size", "anchor_sizes", "score_thresh",
                  "detections_per_img")


def build_model(cfg: Mapping[str, Any], num_classes: int, backbone_info: Mapping[str, Any],
                resnet: nn.Module | None = None) -> nn.Module:
    """The torchvision detector described by ``cfg`` on ``resnet`` (a random one of the recorded arch if None)."""
    bb = cfg["backbone"]
    det = cfg["detector"]
    if resnet is None:
        resnet = build_resnet(backbone_info["arch"], bb["norm"], bb.get("gn_groups", 32))
    kwargs = {k: det[k] for k in _DETECTOR_ARGS if k in det}
    if isinstance(kwargs.get("min_size"), (list, tuple)):
        kwargs["min_size"] = [int(s) for s in kwargs["min_size"]]
    return build_detector(
        det["name"],
        resnet,  # type: ignore[arg-type]
        backbone_info["arch"],
        num_classes,
        trainable_layers=int(bb["trainable_layers"]),
        image_mean=backbone_info["image_mean"],
        image_std=backbone_info["image_std"],
        **kwargs,
        **dict(det.get("kwargs") or {}),
    )


class DetectionModule(pl.LightningModule):
    """Fine-tunes a torchvision Faster R-CNN / RetinaNet and reports COCO val AP every epoch.

    Args:
        cfg: the resolved run config as plain containers (``backbone``, ``detector``,
            ``optimizer``, ``scheduler``, ``eval`` are read).
        label_map: ``LabelMap.to_json()`` of the training set (labels 1..K, category ids, names).
        backbone_info: the resolved backbone: ``arch``, ``image_mean``/``image_std`` and the
            LoadReport summary (checkpoint, method, epochs, ...) for the metrics.
        resnet: the loaded ResNet to build on; None builds a random one of ``backbone_info["arch"]``
            (when the weights come from this module's own checkpoint). Not saved as a hyperparameter.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        label_map: dict[str, Any],
        backbone_info: dict[str, Any],
        num_classes: int | None = None,
        resnet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.label_map = LabelMap.from_json(label_map)
        if num_classes is not None and num_classes != self.label_map.num_classes:
            raise ValueError(f"num_classes={num_classes} but the label map has {self.label_map.num_classes} classes")
        num_classes = self.label_map.num_classes
        # Plain containers only (the resnet module is not a hyperparameter), so the checkpoint
        # loads with weights_only=True and rebuilds the model by itself.
        self.save_hyperparameters(ignore=["resnet"])
        self.cfg = cfg
        self.model = build_model(cfg, num_classes, backbone_info, resnet)
        # Frozen now, not in configure_optimizers: by then Lightning may have wrapped the model in DDP.
        freeze_parts(self.model, cfg.get("lr_multipliers"), bool(cfg.get("freeze_backbone", False)))
        self.history: list[dict[str, Any]] = []
        # Val detections per image id (COCO results), collected over an epoch.
        self._val_predictions: dict[int, list[dict[str, Any]]] = {}
        self._loss_sum = torch.zeros(())
        self._loss_steps = 0
        # Set by load_detection_checkpoint: where the weights came from.
        self.checkpoint_epoch: int | None = None
        self.checkpoint_step: int | None = None
        self.deployed_weights = "student"  # which of a checkpoint's named weight sets was loaded
        # Labeled images the dataset could not decode and replaced (CocoDetection bad_images="skip"):
        # reason strings naming the files, counted here in the main process, kept across resumes.
        self.skipped_images: dict[str, None] = {}

    # What kind of run trained this module: a checkpoint of another kind is not resumed by it.
    run_kind = "finetune"

    def weight_sets(self) -> dict[str, Any]:
        """The detectors a checkpoint of this module holds and which one it deploys.

        ``{"deploy": name, "prefixes": {name: state_dict key prefix}}``; plain fine-tuning has one,
        ``student`` under ``model.``. A subclass that trains more than one detector (a layer on top of
        fine-tuning) names its own, and :func:`load_detection_checkpoint` loads them by name without
        knowing what they are.
        """
        return {"deploy": "student", "prefixes": {"student": "model."}}

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.class_names)

    # ------------------------------------------------------------------------------- forward
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.model(images, targets)

    @staticmethod
    def model_targets(targets: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Boxes and labels as plain tensors, the only target keys torchvision's detectors use."""
        return [
            {"boxes": t["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4), "labels": t["labels"]}
            for t in targets
        ]

    # ------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_steps = 0

    def on_train_start(self) -> None:
        """``backbone.recalibrate_bn=N``: on a fresh run, the backbone's BatchNorm statistics re-estimated
        on N batches of the training images at the detector's resolution (:mod:`finetune.bn_recalibrate`)."""
        n = int((self.cfg.get("backbone") or {}).get("recalibrate_bn") or 0)
        if n and self.global_step == 0:
            recalibrate_bn(self.model, image_batches(self.trainer.train_dataloader), n)

    @property
    def probe_steps(self) -> int:
        """``linear_probe_steps``: LP-FT's head-only steps before the backbone trains (0: none)."""
        return int(self.cfg.get("linear_probe_steps") or 0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """During LP-FT's probe the backbone's BatchNorm layers keep their statistics (eval mode), so
        that the heads train on the pretrained features as they are; Lightning sets train mode each epoch."""
        if self.probe_steps:
            probing = self.global_step < self.probe_steps
            for m in backbone_norms(self.model):
                m.train(not probing)

    def count_skipped(self, targets: Sequence[Mapping[str, Any]]) -> None:
        """Record the unreadable images the dataset replaced by the ones in this batch."""
        for t in targets:
            for reason in t.get("skipped", ()):
                if reason not in self.skipped_images:
                    self.skipped_images[reason] = None
                    log.warning("unreadable labeled image skipped (%d so far): %s", len(self.skipped_images), reason)

    def supervised_loss(self, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The detector's summed loss on labeled images and its terms (skipped images counted)."""
        self.count_skipped(targets)
        images, targets = self.with_strong_copies(images, targets)
        losses = self.model(list(images), self.model_targets(targets))
        return sum(losses.values()), losses  # type: ignore[return-value]

    def with_strong_copies(self, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]]
                           ) -> tuple[list[torch.Tensor], list[Mapping[str, Any]]]:
        """``augment.strong_copy``: each labeled image trains twice in its step, as it is and as its
        strong photometric view with the same boxes (:func:`finetune.transforms.strong_augment`; Liu
        et al., ICLR 2021, concatenate both views of every labeled image in the supervised loss). The
        copies are drawn from a generator seeded by (seed, step, rank): a resumed run draws the same."""
        if not bool((self.cfg.get("augment") or {}).get("strong_copy", False)):
            return list(images), list(targets)
        g = torch.Generator().manual_seed(mix(int(self.cfg.get("seed", 0)), int(self.global_step),
                                              int(self.global_rank), 7))
        return ([*images, *(strong_augment(im, g) for im in images)], [*targets, *targets])

    def record_step(self, loss: torch.Tensor, logs: Mapping[str, Any], batch_size: int) -> None:
        """Log a step's terms and loss, and add a finite loss to the epoch's running mean (the step
        ``nonfinite_loss=skip`` drops is not averaged in). Every training step ends here."""
        self.log_dict(dict(logs), on_step=True, batch_size=batch_size)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        if torch.isfinite(loss.detach()):
            self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
            self._loss_steps += 1

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss, losses = self.supervised_loss(images, targets)
        self.record_step(loss, {f"train/{k}": v.detach() for k, v in losses.items()}, len(images))
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        opt_cfg = dict(self.cfg["optimizer"])
        groups = param_groups(
            self.model,
            base_lr=float(opt_cfg["lr"]),
            weight_decay=float(opt_cfg.get("weight_decay", 0.0)),
            multipliers=self.cfg.get("lr_multipliers"),
            freeze_backbone=bool(self.cfg.get("freeze_backbone", False)),
        )
        # _convert_="all": plain lists (AdamW betas) in the optimizer state, or the checkpoint
        # would pickle OmegaConf objects and no longer load with weights_only=True.
        optimizer = hydra.utils.instantiate(opt_cfg, _convert_="all")(groups)
        sched_cfg = dict(self.cfg["scheduler"])
        total = int(self.trainer.estimated_stepping_batches)
        factors = linear_probe_factors(groups, partial(lr_factor, total_steps=total, **sched_cfg), self.probe_steps)
        scheduler = ResumableLambdaLR(optimizer, factors)
        log.info("optimizer %s, %d steps, groups: %s", type(optimizer).__name__, total,
                 ", ".join(f"{g['name']}={g['lr']:.3g}" for g in groups))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_predictions = {}

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        images, targets = batch
        self._val_predictions.update(self.predict_coco(images, targets, self.val_ground_truth()))

    @torch.no_grad()
    def predict_coco(self, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]],
                     coco: Any, tta: str | None = None) -> dict[int, list[dict[str, Any]]]:
        """COCO results per image id for a batch (the model in eval mode): original category ids,
        boxes in the annotation file's frame (``coco.imgs[id]`` gives its size). Validation and
        :func:`finetune.evaluate.predict_dataset` both predict through this; ``tta``: see
        :mod:`finetune.inference`."""
        outputs = detect(self.model, [im.to(self.device) for im in images], tta)
        lookup = self.label_map.label_to_cat_id
        return {
            int(t["image_id"]): detections_to_coco(int(t["image_id"]), out["boxes"], out["scores"], out["labels"],
                                                   lookup, scale=original_scale(coco.imgs[int(t["image_id"])], image))
            for image, out, t in zip(images, outputs, targets)
        }

    def val_ground_truth(self) -> Any:
        """The validation set's COCO ground truth (its dataset's ``.coco``)."""
        return _ground_truth(self.trainer.val_dataloaders)

    def evaluate_predictions(self, by_image: dict[int, list[dict[str, Any]]]) -> tuple[Any, list[int], list[Any]]:
        """COCO-evaluate val predictions per image id, gathered over DDP ranks: (result, ids, predictions)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, by_image)
            # DistributedSampler pads ranks with repeated images: each image counts once.
            by_image = {}
            for part in gathered:
                for iid, dets in part.items():
                    by_image.setdefault(iid, dets)
        ids = sorted(by_image)
        preds = [p for iid in ids for p in by_image[iid]]
        coco = self.val_ground_truth()
        backend = (self.cfg.get("eval") or {}).get("backend", "pycocotools")
        result = evaluate_coco(coco, preds, image_ids=ids, backend=backend,
                               class_names=dict(zip(self.label_map.cat_ids, self.label_map.class_names)))
        return result, ids, preds

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a few batches are no measure of AP
            return
        result, ids, preds = self.evaluate_predictions(self._val_predictions)
        # Every rank computed the same numbers from the gathered predictions, so the sync
        # (a mean of equal values) changes nothing; it only keeps Lightning's DDP check quiet.
        self.log_dict({f"val/{k}": v for k, v in result.stats.items()}, sync_dist=True)
        self.history.append({**self.epoch_record(), **{f"val_{k}": v for k, v in result.stats.items()},
                             "val_detections": len(preds)})
        if self.trainer.is_global_zero:
            log.info("epoch %d: val AP %.4f AP50 %.4f (%d detections on %d images)", self.current_epoch,
                     result.stats["AP"], result.stats["AP50"], len(preds), len(ids))

    def epoch_record(self) -> dict[str, Any]:
        """Epoch, step, mean training loss and LR: the start of a history entry."""
        epoch_loss = (self._loss_sum / self._loss_steps).item() if self._loss_steps else None
        lrs = self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []
        return {"epoch": int(self.current_epoch), "step": int(self.global_step), "train_loss": epoch_loss,
                "lr": max((g["lr"] for g in lrs), default=None), "skipped_images": len(self.skipped_images)}

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_kind"] = self.run_kind
        checkpoint["weight_sets"] = self.weight_sets()
        checkpoint["history"] = list(self.history)
        checkpoint["skipped_images"] = list(self.skipped_images)
        # The running epoch's loss, so a mid-epoch resume reports the whole epoch's mean.
        checkpoint["epoch_loss"] = {"sum": float(self._loss_sum), "n": int(self._loss_steps)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("history", []))
        self.skipped_images = dict.fromkeys(checkpoint.get("skipped_images", []))
        running = checkpoint.get("epoch_loss") or {}
        self._loss_sum = torch.tensor(float(running.get("sum", 0.0)))
        self._loss_steps = int(running.get("n", 0))


def original_scale(info: Mapping[str, Any], image: torch.Tensor) -> tuple[float, float]:
    """(sx, sy) from the pixels the model saw to the annotation file's image frame."""
    h, w = image.shape[-2:]
    return float(info["width"]) / w, float(info["height"]) / h


def _ground_truth(loaders: Any) -> Any:
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    coco = getattr(getattr(loader, "dataset", None), "coco", None)
    if coco is None:
        raise TypeError("the validation dataloader's dataset needs a `.coco` ground truth (use CocoDetection)")
    return coco
