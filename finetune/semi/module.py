"""The Lightning module of the semi stage: what every semi mode shares.

:class:`SemiDetectionModule` extends the fine-tuning module. Each training batch holds labeled
images with their boxes and unlabeled images (a weak view of each and, for modes that ask for it,
a strong one, see :mod:`finetune.semi.data`). The step:

1. supervised loss of the student on the labeled images (every mode, every step);
2. burn-in: for ``semi.burn_in`` steps (or ``semi.burn_in_epochs`` epochs of the labeled set) only
   the modes that do not wait for it (CSD consistency); then the teacher, for modes that need one,
   becomes an exact copy of the student;
3. each mode's unsupervised loss (:mod:`finetune.semi.base`; the mode of ``semi.mode`` plus any
   combinable mode whose weight is set), ``loss = sup + sum(weight * unsup)``; the teacher-student
   modes make their pseudo-labels through :meth:`SemiDetectionModule.pseudo_labels`, which applies
   the threshold and records the pseudo-label health;
4. after the optimizer step, the EMA update of the teacher (every ``teacher_update_every`` steps)
   with the decay of :meth:`SemiDetectionModule.update_decay` (``semi.ema_decay``, or one sized to the
   run by ``semi.ema_time_constant``; ramped up by ``semi.ema_ramp``), logged as ``semi/ema_decay``.

Validation scores the student and the teacher; ``val/AP`` (which picks the best checkpoint) and the
checkpoint's deployed weights are those of the model ``semi.deploy`` names (:func:`deployed_by`): the
teacher once it exists (``teacher``), the student (``student``), or the better of the two at that
validation (``best``). Pseudo-label health (boxes per image, per class, thresholds, precision/recall
against hidden ground truth when the unlabeled set has it) is logged at the semi phase's first step
and at each validation, and kept in the history that ends up in metrics.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune.module import DetectionModule
from finetune.semi.base import DEPLOY_CHOICES, burn_in_steps, modes_of
from finetune.semi.ema import copy_weights, ema_update, freeze_teacher, make_teacher
from finetune.semi.health import LossWatch, PseudoLabelHealth
from finetune.semi.thresholds import pseudo_label_filter
from pretrain.core.run.schedule import lr_factor

log = logging.getLogger(__name__)


def deployed_by(rule: str, student_ap: float, teacher_ap: float | None) -> str:
    """The model ``semi.deploy=rule`` deploys after a validation that scored the student at
    ``student_ap`` and the teacher at ``teacher_ap`` (None: no teacher yet, so the student).

    ``best`` takes the teacher on a tie: it is the peers' choice and usually the steadier model.
    """
    if rule not in DEPLOY_CHOICES:
        raise ValueError(f"semi.deploy={rule!r}: use one of {', '.join(DEPLOY_CHOICES)}")
    if teacher_ap is None or rule == "student":
        return "student"
    if rule == "best" and student_ap > teacher_ap:
        return "student"
    return "teacher"


def health_scalars(health: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a :meth:`PseudoLabelHealth.summary`, under ``semi/``."""
    return {f"semi/{k}": float(v) for k, v in health.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


class SemiDetectionModule(DetectionModule):
    """Fine-tuning plus a teacher and an unlabeled stream; see the module docstring.

    Args are those of :class:`DetectionModule`; ``cfg["semi"]`` holds the semi settings
    (``conf/finetune/semi/``). ``labeled_boxes_per_image`` is the labeled set's mean box count
    (``labeled_max_boxes`` its most boxes on one image, for ``semi.max_pseudo_per_image=labeled_max``),
    the reference the pseudo-box counts are logged against.
    """

    @property
    def run_kind(self) -> str:  # type: ignore[override]
        return f"semi:{self.mode}"

    def weight_sets(self) -> dict[str, Any]:
        """The student under ``model.``, the EMA teacher under ``teacher.``; ``deploy`` names
        :meth:`deployed`."""
        sets: dict[str, Any] = {"deploy": self.deployed(), "prefixes": {"student": "model."}}
        if self.teacher is not None:
            sets["prefixes"]["teacher"] = "teacher."
        return sets

    def deployed(self) -> str:
        """The model deployed now: the student until the teacher exists; then ``semi.deploy``'s
        (``best``: the winner of the last validation that scored both, the teacher before one has)."""
        if self.teacher is None or not self.teacher_started or self.deploy == "student":
            return "student"
        if self.deploy == "best" and self.best_choice is not None:
            return self.best_choice
        return "teacher"

    def __init__(self, cfg: dict[str, Any], label_map: dict[str, Any], backbone_info: dict[str, Any],
                 num_classes: int | None = None, resnet: nn.Module | None = None,
                 labeled_boxes_per_image: float | None = None, labeled_max_boxes: int | None = None) -> None:
        super().__init__(cfg, label_map, backbone_info, num_classes=num_classes, resnet=resnet)
        s = dict(cfg["semi"])
        self.semi = s
        self.mode = str(s["mode"])
        self.modes = modes_of(s)  # semi.mode's, then any combinable one with a weight
        if not self.modes[0].in_loop:
            raise ValueError(f"semi.mode={self.mode} does not train in a Lightning loop (it runs whole fine-tuning "
                             "runs): run it with `python -m finetune semi=...` or finetune.run.run")
        self.labeled_boxes_per_image = labeled_boxes_per_image
        self.labeled_max_boxes = labeled_max_boxes
        for m in self.modes:
            m.setup(self)
        self.teacher: nn.Module | None = (make_teacher(self.model) if any(m.needs_teacher for m in self.modes)
                                          else None)
        k = self.label_map.num_classes
        self.threshold = pseudo_label_filter(s, k, labeled_boxes_per_image, labeled_max_boxes)
        self.health = PseudoLabelHealth(k, self.class_names)
        self.watch = LossWatch(patience=int(s.get("warn_patience", 50)))
        self.deploy = str(s.get("deploy") or "teacher")
        if self.deploy not in DEPLOY_CHOICES:
            raise ValueError(f"semi.deploy={self.deploy!r}: use one of {', '.join(DEPLOY_CHOICES)}")
        self.best_choice: str | None = None  # deploy=best: the last validation's winner
        self.teacher_started = False
        self.burn_in_steps: int | None = None
        self.ema_updates = 0  # EMA updates since the teacher started (semi.ema_ramp's t)
        self._ema_decay: float | None = None  # the keep rate per student step, resolved at the first update
        self.last_decay: float | None = None  # the decay of the last EMA update
        self.first_health: dict[str, Any] | None = None  # pseudo-label health at the semi phase's first step
        # Steps whose unsupervised loss had semi.empty_weight's rule to apply, and those it scaled:
        # over the run (checkpointed) and since the last validation.
        self.empty_scaled_steps = [0, 0]
        self._empty_scaled_epoch = [0, 0]
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
            per_epoch = int(self.trainer.num_training_batches) // max(1, int(self.trainer.accumulate_grad_batches))
            self.burn_in_steps = burn_in_steps(self.semi, per_epoch)
            log.info("semi %s: burn-in %d steps, then %s", self.mode, self.burn_in_steps,
                     "the teacher starts as a copy of the student" if self.teacher is not None
                     else "the unsupervised loss on the unlabeled images")
        return self.burn_in_steps

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.global_step == 0:
            self.warn_semi_lr_tail()

    def warn_semi_lr_tail(self, below: float = 0.5) -> float | None:
        """The mean LR factor over the semi phase (None without a semi phase inside this run); a
        warning when it is under ``below``. Burn-in inside one decaying schedule (cosine) gives the
        semi phase the low-LR tail: at burn-in 150 of 300 cosine steps (warmup 20) it runs at a mean
        0.21 of the peak, a fifth of the run's LR mass (the default step schedule's milestones at 0.67
        and 0.89 of the run: 0.39), where Unbiased, Soft and Consistent Teacher run
        theirs at constant LR for ~180k steps."""
        total = int(self.trainer.estimated_stepping_batches)
        burn_in = self.resolve_burn_in()
        if not 0 < burn_in < total:
            return None
        sched = dict(self.cfg["scheduler"])
        factors = [lr_factor(step, total, **sched) for step in range(total)]
        mean = sum(factors[burn_in:]) / (total - burn_in)
        if mean < below:
            log.warning("semi: the semi phase (steps %d-%d) runs at a mean %.2f of the peak LR under scheduler=%s "
                        "(%.0f%% of the run's LR mass): the references keep their semi phase at a constant LR. "
                        "Use scheduler=constant or later milestones (scheduler=step scheduler.milestones=[0.9]), "
                        "or converge first and continue from it "
                        "(init_from=<its best.ckpt> semi.burn_in=0)", burn_in, total, mean, sched.get("name"),
                        100 * sum(factors[burn_in:]) / max(1e-12, sum(factors)))
        return mean

    def start_teacher(self) -> None:
        assert self.teacher is not None
        copy_weights(self.teacher, self.model)
        freeze_teacher(self.teacher)
        self.teacher_started = True
        log.info("step %d: burn-in over, the teacher is now a copy of the student", self.global_step)

    def ema_decay(self) -> float:
        """The teacher's keep rate per student step: ``semi.ema_decay``, or with
        ``semi.ema_time_constant=f`` the decay whose time constant is ``f`` of the semi phase,
        ``1 - 1 / (f * semi_steps)`` with ``semi_steps`` = the run's steps - burn-in (a keep rate tuned
        for COCO's 180k steps, 0.9996, leaves a teacher of a few hundred steps where burn-in put it).
        Resolved once, when the trainer knows the run's length."""
        if self._ema_decay is None:
            fraction = self.semi.get("ema_time_constant")
            if fraction is None:
                self._ema_decay = float(self.semi["ema_decay"])
            else:
                semi_steps = max(1, int(self.trainer.estimated_stepping_batches) - self.resolve_burn_in())
                steps = float(fraction) * semi_steps
                if steps < 1:
                    log.warning("semi.ema_time_constant=%s of %d semi steps is under one step: the teacher copies "
                                "the student at each update (decay 0)", fraction, semi_steps)
                self._ema_decay = max(0.0, 1.0 - 1.0 / steps)
                log.info("semi: EMA decay %.6g per step (a time constant of %.1f steps, %s of the %d semi steps; "
                         "semi.ema_decay is not used)", self._ema_decay, steps, fraction, semi_steps)
        return self._ema_decay

    def update_decay(self) -> float:
        """The decay of the teacher's next EMA update: :meth:`ema_decay` to the power of
        ``teacher_update_every`` (the keep rate is per student step), and with ``semi.ema_ramp``
        at most ``1 - 1/(t + 1)`` at the ``t``-th update since the teacher started (t from 0): the
        teacher is the plain average of the students so far until the EMA weighs more. Mean Teacher's
        ``update_ema_variables`` (Tarvainen & Valpola 2017: "use the true average until the
        exponential average is more correct"); Soft Teacher's MeanTeacher hook (microsoft/SoftTeacher)
        warms up as ``min(momentum, 1 - (1 + warm_up) / (step + 1 + warm_up))``, which is this at warm_up 0."""
        every = max(1, int(self.semi.get("teacher_update_every", 1)))
        decay = self.ema_decay() ** every
        if bool(self.semi.get("ema_ramp", False)):
            decay = min(decay, 1.0 - 1.0 / (self.ema_updates + 1))
        return decay

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
            decay = self.update_decay()
            ema_update(self.teacher, self.model, decay)
            self.ema_updates += 1
            self.last_decay = decay
            self.log("semi/ema_decay", decay, on_step=True, on_epoch=False)

    # -------------------------------------------------------------------------------- step
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        images, targets = batch["labeled"]
        unl = batch["unlabeled"]
        sup, sup_losses = self.supervised_loss(images, targets)
        n = len(images)
        logs: dict[str, Any] = {f"train/{k}": v.detach() for k, v in sup_losses.items()}
        loss = sup
        unsup = torch.zeros((), device=sup.device)  # the pseudo-label modes' loss (unweighted)
        num_pseudo = -1
        scaled: bool | None = None  # semi.empty_weight's rule applied this step
        started_now = False
        burn_in = self.global_step < self.resolve_burn_in()
        if not burn_in and unl.get("skipped"):  # placeholders past burn-in (cannot happen: BurnInSampler counts
            log.warning("step %d: the unlabeled batch is burn-in placeholders; this step trains labeled only",
                        self.global_step)  # batches, and the global step never runs ahead of them)
            burn_in = True
        for mode in self.modes:
            if mode.after_burn_in and burn_in:
                continue
            if mode.needs_teacher and not self.teacher_started:
                self.start_teacher()
                started_now = True
            out = mode.loss(self, unl)
            logs.update(out.logs)
            loss = loss + mode.weight() * out.loss
            if out.num_pseudo is not None:
                unsup = unsup + out.loss
                num_pseudo = max(num_pseudo, 0) + out.num_pseudo
            if out.empty_scaled is not None:
                scaled = bool(scaled) or out.empty_scaled
        logs["train/sup_loss"] = sup.detach()
        logs["train/unsup_loss"] = unsup.detach()
        self.record_step(loss, logs, n)
        if started_now:
            self.log_first_step_health()
        if scaled is not None:
            for counts in (self.empty_scaled_steps, self._empty_scaled_epoch):
                counts[0] += int(scaled)
                counts[1] += 1
            # The epoch's mean: the fraction of its semi steps whose unsupervised loss was scaled.
            self.log("semi/empty_scaled", float(scaled), on_step=False, on_epoch=True, batch_size=n)
        if num_pseudo >= 0:
            self._sup_sum += float(sup.detach())
            self._unsup_sum += float(unsup.detach())
            self._semi_steps += 1
            for msg in self.watch.update(int(self.global_step), num_pseudo, float(sup.detach()),
                                         float(unsup.detach()), scaled=bool(scaled)):
                log.warning("semi (step %d): %s", self.global_step, msg)
        return loss  # type: ignore[return-value]

    def log_first_step_health(self) -> None:
        """The pseudo-label health of the semi phase's first step (its pseudo-labels only), logged then
        and kept for metrics.json: a teacher that keeps far more or fewer boxes than the labeled images
        have shows before the first validation, not after an epoch of training on them.

        Straight to the loggers, at this step: ``self.log(on_step=True)`` would repeat the values in
        every later step's row of the epoch (Lightning keeps a logged key's last value)."""
        health = self.health_summary()
        if health is None:
            return
        self.first_health = health
        for logger in self.loggers:
            logger.log_metrics(health_scalars(health), step=int(self.global_step))
        if self.trainer.is_global_zero:
            pr = ("" if health.get("precision") is None else
                  f", precision {health['precision']:.3f} recall {health['recall']:.3f}")
            labeled = health.get("labeled_boxes_per_image")
            thr = self.threshold.thresholds()
            log.info("step %d, the semi phase's first: pseudo-boxes/image %.2f (labeled images: %s), %.0f%% of the "
                     "images without any%s; thresholds %.3g..%.3g", self.global_step, health["pseudo_boxes_per_image"],
                     "?" if labeled is None else f"{labeled:.2f}", 100 * health["images_without_pseudo"], pr,
                     float(thr.min()), float(thr.max()))

    def empty_scaled_fraction(self) -> float | None:
        """The fraction of the run's semi steps whose unsupervised loss ``semi.empty_weight`` scaled."""
        scaled, steps = self.empty_scaled_steps
        return scaled / steps if steps else None

    def pseudo_labels(self, detections: list[dict[str, torch.Tensor]],
                      ground_truth: Sequence[Mapping[str, torch.Tensor] | None] | None = None
                      ) -> list[dict[str, torch.Tensor]]:
        """The teacher's detections kept by the threshold (which first sees them all, for GMM), with
        the pseudo-label health updated against the hidden ground truth where there is one."""
        self.threshold.update(detections)
        pseudo = self.threshold.filter(detections)
        gts = ground_truth
        self.health.update(pseudo, [g if g is None else {k: v.to(self.device) for k, v in g.items()} for g in gts]
                           if gts is not None and any(g is not None for g in gts) else None)
        return pseudo

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
                self._val_teacher.update(self.predict_coco(images, targets, self.val_ground_truth()))
            finally:
                self.model = student

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        student, _ids, preds = self.evaluate_predictions(self._val_predictions)
        teacher = self.evaluate_predictions(self._val_teacher)[0] if self._val_teacher else None
        if teacher is not None and self.deploy == "best":
            self.best_choice = deployed_by(self.deploy, student.stats["AP"], teacher.stats["AP"])
        name = self.deployed() if teacher is not None else "student"
        deployed = teacher if name == "teacher" and teacher is not None else student
        self.log_dict({f"val/{k}": v for k, v in deployed.stats.items()}, sync_dist=True)
        self.log("val/student_AP", student.stats["AP"], sync_dist=True)
        if teacher is not None:
            self.log("val/teacher_AP", teacher.stats["AP"], sync_dist=True)
            self.log("val/teacher_deployed", float(name == "teacher"), sync_dist=True)
        health = self.health_summary()
        if health is not None:
            self.log_dict(health_scalars(health), sync_dist=True)
        scaled, steps = self._empty_scaled_epoch
        self.history.append({
            **self.epoch_record(),
            **{f"val_{k}": v for k, v in deployed.stats.items()},
            "val_student_AP": student.stats["AP"], "val_student_AP50": student.stats["AP50"],
            "val_teacher_AP": teacher.stats["AP"] if teacher is not None else None,
            "val_teacher_AP50": teacher.stats["AP50"] if teacher is not None else None,
            "deployed": name,
            "ema_decay": self.last_decay,
            "empty_scaled": scaled / steps if steps else None,
            "sup_loss": self._sup_sum / self._semi_steps if self._semi_steps else None,
            "unsup_loss": self._unsup_sum / self._semi_steps if self._semi_steps else None,
            "pseudo_labels": health,
            "warnings": self.watch.counts(),
            "val_detections": len(preds),
        })
        self._sup_sum = self._unsup_sum = 0.0
        self._semi_steps = 0
        self._empty_scaled_epoch = [0, 0]
        self.health.reset()
        if self.trainer.is_global_zero:
            msg = f"epoch {self.current_epoch}: val AP student {student.stats['AP']:.4f}"
            if teacher is not None:
                msg += f" teacher {teacher.stats['AP']:.4f} (deployed: {name})"
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
            "deploy": self.deployed(),
            "deploy_rule": self.deploy,
            "best_choice": self.best_choice,
            "ema_updates": self.ema_updates,
            "empty_scaled_steps": list(self.empty_scaled_steps),
            "first_health": self.first_health,
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
        # A run resumed under another semi.deploy keeps its own rule; the last winner only means
        # something to the rule that chose it.
        self.best_choice = s.get("best_choice") if s.get("deploy_rule") == self.deploy else None
        self.ema_updates = int(s.get("ema_updates", 0))
        self.empty_scaled_steps = [int(v) for v in s.get("empty_scaled_steps", [0, 0])]
        self.first_health = s.get("first_health")
        if "threshold" in s:
            self.threshold.load_state_dict(s["threshold"])
        if "health" in s:
            self.health.load_state_dict(s["health"])
        if self.teacher_started and self.teacher is not None:
            log.info("resumed with the teacher of step %s", checkpoint.get("global_step"))

