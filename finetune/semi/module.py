"""Teacher-student detection training: Unbiased Teacher, Mean Teacher and consistency, in one module.

:class:`SemiDetectionModule` extends the fine-tuning module. Each training batch holds labeled
images with their boxes and unlabeled images (a weak and a strong view of each, see
:mod:`finetune.semi.data`). The step:

1. supervised loss of the student on the labeled images (every mode, every step);
2. burn-in: for ``semi.burn_in`` steps (or ``semi.burn_in_epochs`` epochs of the labeled set)
   nothing else; then the teacher becomes an exact copy of the student;
3. teacher-student modes: the teacher (eval mode, no gradients) predicts on the weak views, the
   threshold (fixed or GMM, :mod:`finetune.semi.thresholds`) keeps its confident boxes as
   pseudo-labels, and the student trains on the strong views against them. Unbiased Teacher
   (``semi.unsup_box_loss=false``) keeps only the classification terms (RPN objectness and RoI
   classification; RetinaNet classification), Mean Teacher all of them;
   ``loss = sup + unsup_weight * unsup``; with ``semi.soft_background`` (Faster R-CNN) the student's
   background RoIs on pseudo-labeled images are weighted by the teacher's background probability
   (Soft Teacher, :mod:`finetune.semi.soft`);
4. consistency (``semi=consistency`` or ``semi.consistency_weight > 0``): CSD consistency between
   two perturbed views of the unlabeled images, one flipped (:mod:`finetune.semi.consistency`);
5. after the optimizer step, the EMA update of the teacher (every ``teacher_update_every`` steps).

Validation scores the student and the teacher; ``val/AP`` (which picks the best checkpoint) is
the deployed model's: the teacher once it exists. Pseudo-label health (boxes per image, per class,
thresholds, precision/recall against hidden ground truth when the unlabeled set has it) is logged
each validation and kept in the history that ends up in metrics.json.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune.module import DetectionModule
from finetune.semi.consistency import ConsistencyLoss
from finetune.semi.ema import copy_weights, ema_update, freeze_teacher, make_teacher
from finetune.semi.focal import use_focal_roi_heads
from finetune.semi.health import LossWatch, PseudoLabelHealth
from finetune.semi.soft import soft_background, teacher_forward
from finetune.semi.thresholds import build_threshold

log = logging.getLogger(__name__)

TEACHER_MODES = ("unbiased_teacher", "mean_teacher")
SEMI_MODES = ("none", *TEACHER_MODES, "consistency", "self_training")
# Box-regression terms of torchvision's loss dicts (left out of the unsupervised loss when
# semi.unsup_box_loss is false, as Unbiased Teacher does: pseudo-boxes are poor regression targets).
BOX_TERMS = ("loss_box_reg", "loss_rpn_box_reg", "bbox_regression")


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics but leave their running statistics as
    they are (momentum 0), for the student's pass over the strong views: colour-jittered, grayscale
    and erased images are not the distribution the model is evaluated on, and with trainable BN
    their statistics would otherwise drift into the running ones that validation and the teacher use."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class SemiDetectionModule(DetectionModule):
    """Fine-tuning plus a teacher and an unlabeled stream; see the module docstring.

    Args are those of :class:`DetectionModule`; ``cfg["semi"]`` holds the semi settings
    (``conf/finetune/semi/``). ``labeled_boxes_per_image`` is the labeled set's mean box count,
    the reference the pseudo-box counts are logged against.
    """

    def __init__(self, cfg: dict[str, Any], label_map: dict[str, Any], backbone_info: dict[str, Any],
                 num_classes: int | None = None, resnet: nn.Module | None = None,
                 labeled_boxes_per_image: float | None = None) -> None:
        super().__init__(cfg, label_map, backbone_info, num_classes=num_classes, resnet=resnet)
        s = dict(cfg["semi"])
        self.semi = s
        self.mode = str(s["mode"])
        if self.mode not in SEMI_MODES or self.mode in ("none", "self_training"):
            raise ValueError(f"SemiDetectionModule runs semi.mode in {TEACHER_MODES + ('consistency',)}, "
                             f"got {self.mode!r}")
        self.detector = str(cfg["detector"]["name"])
        self.soft_background = bool(s.get("soft_background", False))
        if self.soft_background and (self.detector != "fasterrcnn" or self.mode not in TEACHER_MODES):
            raise ValueError("semi.soft_background=true weights Faster R-CNN's pseudo-labeled RoI loss by the "
                             f"teacher: it needs detector=fasterrcnn and a teacher mode {TEACHER_MODES}, got "
                             f"detector={self.detector} semi.mode={self.mode}")
        gamma = s.get("roi_focal_gamma")
        if self.soft_background and gamma is None:
            gamma = 0.0  # the weighting lives in the focal head; gamma 0 is cross-entropy
        if gamma is not None and self.detector == "fasterrcnn":
            use_focal_roi_heads(self.model, float(gamma))  # type: ignore[arg-type]
        self.teacher: nn.Module | None = make_teacher(self.model) if self.mode in TEACHER_MODES else None
        k = self.label_map.num_classes
        self.threshold = build_threshold(s["threshold"], k)
        self.health = PseudoLabelHealth(k, self.class_names)
        self.watch = LossWatch(patience=int(s.get("warn_patience", 50)))
        cw = float(s.get("consistency_weight", 0.0))
        self.consistency_weight = cw if self.mode != "consistency" else (cw or 1.0)
        self.consistency = (ConsistencyLoss(**dict(s.get("consistency") or {}))
                            if self.consistency_weight > 0 else None)
        self.labeled_boxes_per_image = labeled_boxes_per_image
        self.teacher_started = False
        self.burn_in_steps: int | None = None
        self._val_teacher: dict[int, list[dict[str, Any]]] = {}
        self._unsup_sum = 0.0
        self._sup_sum = 0.0
        self._semi_steps = 0

    # ------------------------------------------------------------------------ teacher state
    def train(self, mode: bool = True) -> SemiDetectionModule:
        super().train(mode)
        if self.teacher is not None:  # Lightning switches every submodule to train mode each epoch
            self.teacher.eval()
        return self

    def resolve_burn_in(self) -> int:
        """Burn-in in student steps: ``semi.burn_in_epochs`` of the labeled loader if set, else ``semi.burn_in``."""
        if self.burn_in_steps is None:
            epochs = self.semi.get("burn_in_epochs")
            if epochs is not None:
                per_epoch = int(self.trainer.num_training_batches) // max(1, int(self.trainer.accumulate_grad_batches))
                self.burn_in_steps = round(float(epochs) * per_epoch)
            else:
                self.burn_in_steps = int(self.semi.get("burn_in", 0))
            log.info("semi %s: burn-in %d steps, then %s", self.mode, self.burn_in_steps,
                     "the teacher starts as a copy of the student" if self.teacher is not None
                     else "consistency on the unlabeled images")
        return self.burn_in_steps

    def start_teacher(self) -> None:
        assert self.teacher is not None
        copy_weights(self.teacher, self.model)
        freeze_teacher(self.teacher)
        self.teacher_started = True
        log.info("step %d: burn-in over, the teacher is now a copy of the student", self.global_step)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The student's step, then the teacher's EMA update.

        Here rather than in ``on_train_batch_end``: Lightning runs the callbacks' hook (the step
        checkpoint) before the module's, so a checkpoint would hold a teacher one update behind
        its student, and a resumed run would lose that update.
        """
        steps = self.trainer.global_step + 1  # student steps once this one is taken
        super().optimizer_step(*args, **kwargs)
        every = max(1, int(self.semi.get("teacher_update_every", 1)))
        if self.teacher is not None and self.teacher_started and steps % every == 0:
            # ema_decay is the keep rate per student step: with an update every n steps, decay^n.
            ema_update(self.teacher, self.model, float(self.semi["ema_decay"]) ** every)

    # -------------------------------------------------------------------------------- step
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        images, targets = batch["labeled"]
        self.count_skipped(targets)
        unl = batch["unlabeled"]
        sup_losses = self.model(list(images), self.model_targets(targets))
        sup = sum(sup_losses.values())
        n = len(images)
        logs: dict[str, Any] = {f"train/{k}": v.detach() for k, v in sup_losses.items()}
        loss = sup
        unsup = torch.zeros((), device=sup.device)
        num_pseudo = -1
        burn_in = self.global_step < self.resolve_burn_in()
        if self.teacher is not None and not burn_in:
            if not self.teacher_started:
                self.start_teacher()
            unsup, num_pseudo, unsup_logs = self.teacher_student_loss(unl)
            logs.update(unsup_logs)
            loss = loss + float(self.semi["unsup_weight"]) * unsup
        if self.consistency is not None:
            c = self.consistency(self.model, [im.to(self.device) for im in unl["weak"]], int(self.global_step))
            closs = c["consistency_cls"] + c["consistency_box"]
            loss = loss + self.consistency_weight * closs
            logs.update({"train/consistency_cls": c["consistency_cls"].detach(),
                         "train/consistency_box": c["consistency_box"].detach(),
                         "train/consistency_rampup": c["consistency_weight"].detach()})
        logs["train/sup_loss"] = sup.detach()
        logs["train/unsup_loss"] = unsup.detach()
        self.log_dict(logs, on_step=True, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if torch.isfinite(loss.detach()):  # a step nonfinite_loss=skip dropped is not averaged in
            self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
            self._loss_steps += 1
        if num_pseudo >= 0:
            self._sup_sum += float(sup.detach())
            self._unsup_sum += float(unsup.detach())
            self._semi_steps += 1
            for msg in self.watch.update(int(self.global_step), num_pseudo, float(sup.detach()),
                                         float(unsup.detach())):
                log.warning("semi (step %d): %s", self.global_step, msg)
        return loss  # type: ignore[return-value]

    def teacher_student_loss(self, unl: Mapping[str, Sequence[Any]]) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """Pseudo-labels from the teacher on the weak views; the student's loss on the strong views."""
        assert self.teacher is not None
        weak = [im.to(self.device) for im in unl["weak"]]
        strong = [im.to(self.device) for im in unl["strong"]]
        self.teacher.eval()
        tpass = None
        if self.soft_background:  # the teacher's features are kept to score the student's proposals
            tpass = teacher_forward(self.teacher, weak)  # type: ignore[arg-type]
            dets = tpass.detections
        else:
            with torch.no_grad():
                dets = self.teacher(weak)
        dets = [{k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in d.items()} for d in dets]
        self.threshold.update(dets)
        pseudo = self.threshold.filter(dets)
        gts = unl.get("ground_truth")
        self.health.update(pseudo, [g if g is None else {k: v.to(self.device) for k, v in g.items()} for g in gts]
                           if gts is not None and any(g is not None for g in gts) else None)
        targets = [{"boxes": p["boxes"].reshape(-1, 4).float(), "labels": p["labels"].long()} for p in pseudo]
        soft = (soft_background(self.model, self.teacher, tpass)  # type: ignore[arg-type]
                if tpass is not None else contextlib.nullcontext())
        with running_stats_frozen(self.model), soft:
            losses = self.model(strong, targets)
        keep_box = bool(self.semi.get("unsup_box_loss", False))
        terms = {k: v for k, v in losses.items() if keep_box or k not in BOX_TERMS}
        unsup = sum(terms.values())
        with_boxes = sum(int(t["boxes"].shape[0] > 0) for t in targets)
        num_pseudo = sum(int(t["boxes"].shape[0]) for t in targets)
        if self.detector == "retinanet" and with_boxes < len(targets) / 2:
            # torchvision's RetinaNet divides each image's loss by max(1, foreground anchors): an image
            # without pseudo-boxes adds its whole summed focal loss. Consistent Teacher scales the
            # unsupervised loss by 0.01 when fewer than half the batch has pseudo-boxes.
            unsup = unsup * float(self.semi.get("empty_batch_weight", 0.01))
        logs = {f"train/unsup_{k}": v.detach() for k, v in terms.items()}
        logs["semi/pseudo_boxes_per_image"] = torch.tensor(num_pseudo / max(1, len(targets)))
        logs["semi/images_with_pseudo"] = torch.tensor(with_boxes / max(1, len(targets)))
        return unsup, num_pseudo, logs  # type: ignore[return-value]

    # --------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_teacher = {}

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.teacher is not None and self.teacher_started:
            images, targets = batch
            student = self.model
            try:
                self.model = self.teacher  # predict_coco runs self.model
                self._val_teacher.update(self.predict_coco(images, targets, self._coco()))
            finally:
                self.model = student

    def _coco(self) -> Any:
        from finetune.module import _ground_truth

        return _ground_truth(self.trainer.val_dataloaders)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        student, _ids, preds = self.evaluate_predictions(self._val_predictions)
        teacher = self.evaluate_predictions(self._val_teacher)[0] if self._val_teacher else None
        deployed = teacher if teacher is not None else student
        self.log_dict({f"val/{k}": v for k, v in deployed.stats.items()}, sync_dist=True)
        self.log("val/student_AP", student.stats["AP"], sync_dist=True)
        if teacher is not None:
            self.log("val/teacher_AP", teacher.stats["AP"], sync_dist=True)
        health = self.health_summary()
        if health is not None:
            scalars = {f"semi/{k}": float(v) for k, v in health.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
            self.log_dict(scalars, sync_dist=True)
        self.history.append({
            **self.epoch_record(),
            **{f"val_{k}": v for k, v in deployed.stats.items()},
            "val_student_AP": student.stats["AP"], "val_student_AP50": student.stats["AP50"],
            "val_teacher_AP": teacher.stats["AP"] if teacher is not None else None,
            "val_teacher_AP50": teacher.stats["AP50"] if teacher is not None else None,
            "deployed": "teacher" if teacher is not None else "student",
            "sup_loss": self._sup_sum / self._semi_steps if self._semi_steps else None,
            "unsup_loss": self._unsup_sum / self._semi_steps if self._semi_steps else None,
            "pseudo_labels": health,
            "warnings": self.watch.counts(),
            "val_detections": len(preds),
        })
        self._sup_sum = self._unsup_sum = 0.0
        self._semi_steps = 0
        self.health.reset()
        if self.trainer.is_global_zero:
            msg = f"epoch {self.current_epoch}: val AP student {student.stats['AP']:.4f}"
            if teacher is not None:
                msg += f" teacher {teacher.stats['AP']:.4f}"
            if health is not None:
                pr = ("" if health.get("precision") is None else
                      f", precision {health['precision']:.3f} recall {health['recall']:.3f}")
                msg += f"; pseudo-boxes/image {health['pseudo_boxes_per_image']:.2f}{pr}"
            log.info(msg)

    def health_summary(self) -> dict[str, Any] | None:
        """This epoch's pseudo-label health, merged over DDP ranks; None before any pseudo-label."""
        if self.teacher is None or not self.teacher_started:
            return None
        state = self.health.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)
            merged = PseudoLabelHealth(self.label_map.num_classes, self.class_names)
            for part in gathered:
                merged.merge(part)
            return merged.summary(self.threshold.thresholds(), self.labeled_boxes_per_image)
        return self.health.summary(self.threshold.thresholds(), self.labeled_boxes_per_image)

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["semi"] = {
            "mode": self.mode,
            "teacher_started": self.teacher_started,
            "deploy": "teacher" if self.teacher is not None and self.teacher_started else "student",
            "threshold": self.threshold.state_dict(),
            "health": self.health.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        s = checkpoint.get("semi") or {}
        if s.get("mode") not in (None, self.mode):
            raise ValueError(f"the checkpoint was a semi.mode={s.get('mode')} run, this one is {self.mode}; "
                             "use another run dir (hydra.run.dir=...) or resume=false")
        self.teacher_started = bool(s.get("teacher_started", False))
        if "threshold" in s:
            self.threshold.load_state_dict(s["threshold"])
        if "health" in s:
            self.health.load_state_dict(s["health"])
        if self.teacher_started and self.teacher is not None:
            log.info("resumed with the teacher of step %s", checkpoint.get("global_step"))


def pseudo_label_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last epoch's pseudo-label health with its step, for metrics.json."""
    for entry in reversed(history):
        if entry.get("pseudo_labels"):
            return {"epoch": entry.get("epoch"), "step": entry.get("step"), **entry["pseudo_labels"]}
    return None


