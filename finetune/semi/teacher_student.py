"""The pseudo-label step that Unbiased Teacher and Mean Teacher share.

The teacher (eval mode, no gradients) predicts on the weak views; the threshold (fixed or GMM,
:mod:`finetune.semi.thresholds`) keeps its confident boxes as pseudo-labels; the student trains on
the strong views against them, its BatchNorm running statistics untouched by those views. Without
``semi.unsup_box_loss`` only the classification terms count (RPN objectness and RoI classification;
RetinaNet's classification), as Unbiased Teacher does. With ``semi.soft_background`` (a detector
with RoI heads) the student's background RoIs on pseudo-labeled images weigh the teacher's
background probability (Soft Teacher, :mod:`finetune.semi.soft`); with ``semi.soft_classes`` they
(or every sampled RoI) train against the teacher's class distribution for the box instead of a
thresholded label (:func:`finetune.semi.soft.soft_classes`). With ``semi.rpn_threshold`` (a
two-stage detector) the RPN trains on its own pseudo-boxes, the teacher's detections above that
score whatever their class, while the RoI head keeps ``semi.threshold``'s (:func:`two_target_losses`).
With ``semi.teacher_flip`` (a two-stage detector) the teacher's RoI head also sees each weak view's
mirror image and its outputs are averaged, for the pseudo-labels and the soft targets (Humble
Teacher's teacher ensemble, :func:`finetune.detectors.roi_ensemble.teacher_forward`). ``semi.extra_teachers``
(checkpoints or run dirs of Faster R-CNNs trained on the same classes, e.g. the labeled set with
other seeds) joins frozen detectors to that ensemble: their RoI heads score the teacher's proposals
too. They are loaded at setup (``weights_only``), never trained, and not part of the run's
checkpoints (a resumed run loads them again from the same paths).
The two modes differ only in their settings (``conf/finetune/semi/``) and files.

Unlabeled images without a pseudo-box train as all background. One rule for every detector
(``semi.empty_weight``, :func:`empty_weight`): when fewer than half the batch's images have a
pseudo-box, the unsupervised loss is multiplied by it. The boxes counted are the RoI head's (after
``semi.strong_scale``'s crop: the boxes trained on), or the RPN's when ``semi.soft_classes`` and
``semi.rpn_threshold`` are both set (the RoIs then carry the teacher's belief, not "background").
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torchvision.models.detection import FasterRCNN

from finetune.detectors import capabilities_of, require
from finetune.semi.base import (
    SemiMode,
    SemiStep,
    UnsupOutput,
    running_stats_frozen,
)
from finetune.semi.dense_norm import batch_normalised
from finetune.semi.focal import focal_gamma, use_focal_roi_heads
from finetune.semi.soft import soft_background, soft_classes, teacher_forward, transform_and_features
from finetune.semi.thresholds import ScoreThreshold, max_pseudo_per_image, pseudo_label_filter
from finetune.semi.views import map_boxes
from finetune.transforms import STRONG_VIEWS

log = logging.getLogger(__name__)

# Box-regression terms of torchvision's loss dicts (left out of the unsupervised loss when
# semi.unsup_box_loss is false, as Unbiased Teacher does: pseudo-boxes are poor regression targets).
BOX_TERMS = ("loss_box_reg", "loss_rpn_box_reg", "bbox_regression")

# Settings that act only on a teacher and its pseudo-labels, with the value that leaves them off: a
# run without a teacher refuses them when set (they would silently do nothing).
TEACHER_OPTIONS: dict[str, Any] = {"soft_background": False, "pseudo_nms_iou": None, "max_pseudo_per_image": None,
                                   "ema_ramp": False, "ema_time_constant": None, "strong_view": "unbiased_teacher",
                                   "rpn_threshold": None, "soft_classes": None, "strong_scale": None,
                                   "teacher_flip": False, "extra_teachers": None}

SOFT_CLASSES = ("background", "all")  # semi.soft_classes: which sampled RoIs take the teacher's distribution

EMPTY_WEIGHT = 0.01  # Consistent Teacher's background_weight


def load_extra_teachers(paths: Sequence[str] | None, module: SemiStep) -> list[FasterRCNN]:
    """``semi.extra_teachers``' detectors, frozen in eval mode: each a checkpoint or a run dir (its best,
    else last checkpoint) of a Faster R-CNN with the run's classes.

    Raises:
        FileNotFoundError: a path without a checkpoint.
        TypeError: a detector that is not a Faster R-CNN (or a run that is not).
        ValueError: a detector with other classes than the run.
    """
    from finetune.api import resolve_checkpoint
    from finetune.checkpoint import load_detection_checkpoint

    out = []
    for path in paths or []:
        ckpt = resolve_checkpoint(path)
        other = load_detection_checkpoint(ckpt)
        if not isinstance(other.model, FasterRCNN) or not isinstance(module.model, FasterRCNN):
            raise TypeError(f"semi.extra_teachers: {ckpt} holds a {type(other.model).__name__} for a "
                             f"{type(module.model).__name__} run; both must be Faster R-CNNs (RoI heads)")
        mine, theirs = module.label_map, other.label_map
        if (mine.cat_ids, mine.class_names) != (theirs.cat_ids, theirs.class_names):
            raise ValueError(f"semi.extra_teachers: {ckpt} detects {theirs.class_names} (ids {theirs.cat_ids}), "
                             f"the run {mine.class_names} (ids {mine.cat_ids}): an ensemble needs the same classes")
        out.append(other.model.eval().requires_grad_(False))
        log.info("semi.extra_teachers: %s (%s weights) joins the teacher ensemble", ckpt, other.deployed_weights)
    return out


def teacher_options_set(settings: Mapping[str, Any]) -> list[str]:
    """The :data:`TEACHER_OPTIONS` that ``settings`` turns on, as ``key=value``."""
    return [f"semi.{k}={settings.get(k)}" for k, off in TEACHER_OPTIONS.items() if settings.get(k, off) != off]


def empty_weight(settings: Mapping[str, Any], warn: bool = False) -> float:
    """The factor of a batch's unsupervised loss when fewer than half its images have a pseudo-box.

    Consistent Teacher (Adamdad/ConsistentTeacher, ``ConsistentTeacher.bbox_loss``) multiplies it by
    its ``background_weight``, 0.01, in that case; 0 drops such a batch's unsupervised loss, as
    mmdetection's ``SemiBaseDetector.loss_by_pseudo_instances`` does for a batch without any
    pseudo-instance. ``semi.empty_batch_weight``, the RetinaNet-only key this replaces, is still read
    when set (``warn``: say so).
    """
    old = settings.get("empty_batch_weight")
    if old is not None:
        if warn:
            log.warning("semi.empty_batch_weight is deprecated: use semi.empty_weight (it now applies to every "
                        "detector); using %s", old)
        return float(old)
    value = settings.get("empty_weight")
    return EMPTY_WEIGHT if value is None else float(value)


def _number(settings: Mapping[str, Any], key: str) -> float | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"semi.{key} must be a number, got {value!r}")
    return float(value)


def as_targets(pseudo: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Pseudo-labels as torchvision training targets (float xyxy boxes, int64 labels)."""
    return [{"boxes": p["boxes"].reshape(-1, 4).float(), "labels": p["labels"].long()} for p in pseudo]


def two_target_losses(model: FasterRCNN, images: Sequence[torch.Tensor],
                      rpn_targets: Sequence[Mapping[str, torch.Tensor]],
                      roi_targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A two-stage detector's training losses (``GeneralizedRCNN.forward`` in training mode) with the
    RPN trained on ``rpn_targets`` and the RoI head on ``roi_targets``: Soft Teacher's separate RPN
    and RoI pseudo-label thresholds (its config: ``rpn_pseudo_threshold`` and ``cls_pseudo_threshold``).

    One resize for both: the two box sets are resized together, so they stay in the same frame.
    """
    sizes = [int(t["boxes"].shape[0]) for t in roi_targets]
    merged = [{"boxes": torch.cat([r["boxes"].reshape(-1, 4), p["boxes"].reshape(-1, 4)]),
               "labels": torch.cat([r["labels"], p["labels"]])} for r, p in zip(roi_targets, rpn_targets)]
    batch, features, resized = transform_and_features(model, images, merged)
    assert resized is not None
    rpn_t = [{"boxes": t["boxes"][n:], "labels": t["labels"][n:]} for t, n in zip(resized, sizes)]
    roi_t = [{"boxes": t["boxes"][:n], "labels": t["labels"][:n]} for t, n in zip(resized, sizes)]
    proposals, rpn_losses = model.rpn(batch, features, rpn_t)
    _, roi_losses = model.roi_heads(features, proposals, batch.image_sizes, roi_t)
    return {**roi_losses, **rpn_losses}


class TeacherStudentMode(SemiMode):
    """An EMA teacher's thresholded detections on the weak views train the student on the strong ones."""

    needs_teacher: ClassVar[bool] = True
    strong_view: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """The detector's capabilities, then the pseudo-label and EMA settings' values."""
        super().check(cfg)
        s = cfg.semi
        if str(s.get("dense_loss_norm", "batch")) not in ("batch", "image"):
            raise ValueError(f"semi.dense_loss_norm={s.get('dense_loss_norm')!r} must be 'batch' (the pseudo-labeled "
                             "losses over the batch's foreground anchors, mmdetection's) or 'image' (torchvision's)")
        if str(s.get("roi_focal_on", "all")) not in ("all", "unlabeled"):
            raise ValueError(f"semi.roi_focal_on={s.get('roi_focal_on')!r} must be 'all' (labeled and pseudo-labeled "
                             "RoI losses, Unbiased Teacher's) or 'unlabeled' (the labeled loss stays cross-entropy)")
        if str(s.get("strong_view", "unbiased_teacher")) not in STRONG_VIEWS:
            raise ValueError(f"semi.strong_view={s.get('strong_view')!r} must be one of {sorted(STRONG_VIEWS)}")
        zoom = s.get("strong_scale")
        if zoom is not None:
            values = list(zoom) if isinstance(zoom, Sequence) and not isinstance(zoom, str) else [zoom]
            if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                    or not 0 < float(values[0]) <= float(values[1])):
                raise ValueError(f"semi.strong_scale={zoom!r} must be a zoom range [min, max] with 0 < min <= max "
                                 "(e.g. [0.5, 1.5]), or null: the strong view keeps the weak view's geometry")
        soft_on = s.get("soft_classes")
        if soft_on is not None:
            if soft_on not in SOFT_CLASSES:
                raise ValueError(f"semi.soft_classes={soft_on!r} must be 'background' (the RoIs sampled as background "
                                 "train against the teacher's class distribution), 'all' (every sampled RoI) or null")
            require(str(cfg.detector.name), ("roi_heads",),
                    "semi.soft_classes (the teacher's class distribution per RoI)")
            if bool(s.get("soft_background", False)):
                raise ValueError("semi.soft_classes and semi.soft_background=true both act on the background RoIs of "
                                 "the pseudo-labeled pass (the distribution replaces the weight): set "
                                 "semi.soft_background=false")
            if s.get("roi_focal_gamma") is not None:
                raise ValueError(f"semi.soft_classes trains the pseudo-labeled RoIs with the cross-entropy against the "
                                 f"teacher's distribution; semi.roi_focal_gamma={s.get('roi_focal_gamma')} would act "
                                 "on that pass too, and a focal factor moves the loss's optimum away from the "
                                 "teacher's distribution: set semi.roi_focal_gamma=null")
        flip = s.get("teacher_flip", False)
        if not isinstance(flip, bool):
            raise TypeError(f"semi.teacher_flip must be true or false, got {flip!r}")
        if flip:
            require(str(cfg.detector.name), ("roi_heads",), "semi.teacher_flip (the teacher's RoI head averaged over "
                    "the view and its mirror image)")
        extra = s.get("extra_teachers")
        if extra is not None:
            if isinstance(extra, str) or not isinstance(extra, Sequence) or not extra:
                raise TypeError(f"semi.extra_teachers must be a non-empty list of checkpoints or run dirs, or null; "
                                f"got {extra!r}")
            require(str(cfg.detector.name), ("roi_heads",), "semi.extra_teachers (their RoI heads join the teacher's)")
        if bool(s.get("soft_background", False)):
            require(str(cfg.detector.name), ("roi_heads",), "semi.soft_background=true (it weights the pseudo-labeled "
                    "RoI loss by the teacher)")
        weight = empty_weight(s, warn=True)
        if not weight >= 0:
            raise ValueError(f"semi.empty_weight={weight} must be >= 0 (0 drops the unsupervised loss of a batch "
                             "where fewer than half the images have a pseudo-box; 1 keeps it)")
        iou = _number(s, "pseudo_nms_iou")
        if iou is not None and not 0.0 < iou <= 1.0:
            raise ValueError(f"semi.pseudo_nms_iou={iou} must be an IoU in (0, 1] (or null: no NMS over pseudo-boxes)")
        rpn = _number(s, "rpn_threshold")
        if rpn is not None:
            if not 0.0 <= rpn <= 1.0:
                raise ValueError(f"semi.rpn_threshold={rpn} must be a score in [0, 1] (or null: the RPN trains on "
                                 "semi.threshold's pseudo-boxes)")
            require(str(cfg.detector.name), ("roi_heads",), "semi.rpn_threshold (pseudo-boxes for an RPN)")
            roi = s.get("threshold")
            if isinstance(roi, (int, float)) and not isinstance(roi, bool) and rpn > float(roi):
                raise ValueError(f"semi.rpn_threshold={rpn} is above semi.threshold={roi}: the RPN would train the "
                                 "RoI head's pseudo-objects as background; use a score at or below it")
        factor = _number(s, "max_pseudo_factor")
        if factor is not None and not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"semi.max_pseudo_factor={factor} must be > 0 (the auto / labeled_max cap is the "
                             "labeled set's figure x it)")
        max_pseudo_per_image(s.get("max_pseudo_per_image"), factor or 1.0, 1.0, 1)  # raises on a bad value
        fallback = _number(s, "gmm_fallback")
        if fallback is not None and not 0.0 <= fallback <= 1.0:
            raise ValueError(f"semi.gmm_fallback={fallback} must be a score in [0, 1]")
        if not isinstance(s.get("ema_ramp", False), bool):
            raise TypeError(f"semi.ema_ramp must be true or false, got {s.get('ema_ramp')!r}")
        tau = _number(s, "ema_time_constant")
        if tau is not None and not 0.0 < tau <= 1.0:
            raise ValueError(f"semi.ema_time_constant={tau} must be a fraction of the semi phase's steps in (0, 1] "
                             "(or null: semi.ema_decay as given)")

    def setup(self, module: SemiStep) -> None:
        self.soft_background = bool(self.settings.get("soft_background", False))
        caps = capabilities_of(module.model)
        if self.soft_background and not caps.roi_heads:
            raise ValueError("semi.soft_background=true weights the pseudo-labeled RoI loss by the teacher: it needs "
                             f"a detector with roi_heads, not {type(module.model).__name__}")
        soft_on = self.settings.get("soft_classes")
        self.soft_classes: str | None = None if soft_on is None else str(soft_on)
        if self.soft_classes is not None and not caps.roi_heads:
            raise ValueError("semi.soft_classes trains RoIs against the teacher's class distribution: it needs a "
                             f"detector with roi_heads, not {type(module.model).__name__}")
        self.teacher_flip = bool(self.settings.get("teacher_flip", False))
        if self.teacher_flip and not caps.roi_heads:
            raise ValueError("semi.teacher_flip averages the teacher's RoI head over the view and its mirror image: "
                             f"it needs a detector with roi_heads, not {type(module.model).__name__}")
        self.extra_teachers = load_extra_teachers(self.settings.get("extra_teachers"), module)
        self.empty_weight = empty_weight(self.settings)
        # semi.rpn_threshold: the RPN's pseudo-boxes, class-agnostic, under the same per-image limits.
        rpn = _number(self.settings, "rpn_threshold")
        self.rpn_value = 1.0 if rpn is None else rpn
        self.rpn_filter: ScoreThreshold | None = None
        if rpn is not None:
            self.rpn_filter = pseudo_label_filter({**self.settings, "threshold": rpn}, module.label_map.num_classes,
                                                  module.labeled_boxes_per_image, module.labeled_max_boxes)
        gamma = self.settings.get("roi_focal_gamma")
        if (self.soft_background or self.soft_classes is not None) and gamma is None:
            gamma = 0.0  # the weighting and soft targets live in the focal head; gamma 0 is cross-entropy
        # semi.roi_focal_on=unlabeled: the labeled RoI loss stays the cross-entropy of plain
        # fine-tuning (gamma 0 is exactly it), the focal exponent acts on the pseudo-labeled pass only.
        self.unlabeled_gamma: float | None = None
        if gamma is not None and caps.roi_heads:
            on_unlabeled_only = str(self.settings.get("roi_focal_on", "all")) == "unlabeled"
            self.unlabeled_gamma = float(gamma) if on_unlabeled_only else None
            use_focal_roi_heads(module.model, 0.0 if on_unlabeled_only else float(gamma))  # type: ignore[arg-type]

    @staticmethod
    def _in_strong_view(targets: list[dict[str, torch.Tensor]], affines: Sequence[torch.Tensor] | None,
                        sizes: Sequence[tuple[int, int]] | None) -> list[dict[str, torch.Tensor]]:
        """Weak-view targets moved into the strong views (:func:`finetune.semi.views.map_boxes`)."""
        if affines is None or sizes is None:
            return targets
        out = []
        for t, a, size in zip(targets, affines, sizes):
            boxes, labels = map_boxes(t["boxes"], t["labels"], a, size)
            out.append({"boxes": boxes, "labels": labels})
        return out

    def loss(self, module: SemiStep, unlabeled: Mapping[str, Any]) -> UnsupOutput:
        teacher = module.teacher
        assert teacher is not None
        weak = [im.to(module.device) for im in unlabeled["weak"]]
        strong = [im.to(module.device) for im in unlabeled["strong"]]
        teacher.eval()
        tpass = None
        extra = [m.to(module.device) for m in self.extra_teachers]  # a no-op once there
        if self.soft_background or self.soft_classes is not None or self.teacher_flip or extra:
            # features kept to score the student's RoIs; with teacher_flip, the mirror images' too
            tpass = teacher_forward(teacher, weak, flip=self.teacher_flip, extra=extra)  # type: ignore[arg-type]
            dets = tpass.detections
            if not (self.soft_background or self.soft_classes is not None):
                tpass = None  # its features (both views') are not needed past the pseudo-labels
        else:
            with torch.no_grad():
                dets = teacher(weak)
        dets = [{k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in d.items()} for d in dets]
        pseudo = module.pseudo_labels(dets, unlabeled.get("ground_truth"))
        # semi.strong_scale: the strong views are zoomed and cropped; the pseudo-boxes (found on the
        # weak views, where the health figures measure them) move with them.
        affines = sizes = None
        if self.settings.get("strong_scale") is not None and unlabeled.get("strong_affine"):
            affines = list(unlabeled["strong_affine"])
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in strong]
        targets = self._in_strong_view(as_targets(pseudo), affines, sizes)
        if tpass is not None and affines is not None:
            tpass.strong_affines = affines
        soft: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if tpass is not None and self.soft_classes is not None:
            soft = soft_classes(module.model, teacher, tpass, self.soft_classes)  # type: ignore[arg-type]
        elif tpass is not None and self.soft_background:
            soft = soft_background(module.model, teacher, tpass)  # type: ignore[arg-type]
        norm = (batch_normalised(module.model) if str(self.settings.get("dense_loss_norm", "batch")) == "batch"
                else contextlib.nullcontext())
        rpn_targets = None
        if self.rpn_filter is not None:
            # Never above the RoI head's threshold of a class (GMM's move each step): the RPN's boxes
            # include the RoI head's, so no RoI pseudo-object is an RPN background anchor.
            self.rpn_filter.set_thresholds(module.threshold.thresholds().clamp(max=self.rpn_value))
            rpn_targets = self._in_strong_view(as_targets(self.rpn_filter.filter(dets)), affines, sizes)
        with running_stats_frozen(module.model), soft, focal_gamma(module.model, self.unlabeled_gamma), norm:
            losses = (module.model(strong, targets) if rpn_targets is None
                      else two_target_losses(module.model, strong, rpn_targets, targets))
        keep_box = bool(self.settings.get("unsup_box_loss", False))
        terms = {k: v for k, v in losses.items() if keep_box or k not in BOX_TERMS}
        unsup: torch.Tensor = sum(terms.values())  # type: ignore[assignment]
        num_pseudo = sum(int(t["boxes"].shape[0]) for t in targets)
        images_with = sum(int(t["boxes"].shape[0] > 0) for t in targets)
        # With soft class targets and the RPN's own pseudo-boxes, an image whose pieces all score
        # below semi.threshold is not "all background": its RPN trains on the boxes above
        # semi.rpn_threshold and its RoIs on the teacher's class belief. It counts by its RPN boxes.
        counted = rpn_targets if self.soft_classes is not None and rpn_targets is not None else targets
        with_boxes = sum(int(t["boxes"].shape[0] > 0) for t in counted)
        # Images without a pseudo-box train as all background: on a dense sigmoid detector each adds
        # its whole summed focal loss (torchvision divides an image's loss by max(1, foreground
        # anchors)), on Faster R-CNN every sampled RoI and anchor as background. When they are most
        # of the batch, the batch teaches mostly "nothing here": Consistent Teacher's rule, for both.
        scaled = with_boxes < len(counted) / 2
        if scaled:
            unsup = unsup * self.empty_weight
        logs: dict[str, Any] = {f"train/unsup_{k}": v.detach() for k, v in terms.items()}
        logs["semi/pseudo_boxes_per_image"] = torch.tensor(num_pseudo / max(1, len(targets)))
        logs["semi/images_with_pseudo"] = torch.tensor(images_with / max(1, len(targets)))
        if rpn_targets is not None:
            logs["semi/rpn_pseudo_boxes_per_image"] = torch.tensor(
                sum(int(t["boxes"].shape[0]) for t in rpn_targets) / max(1, len(rpn_targets)))
        # The "no pseudo-box" warning counts the same boxes as the empty-batch rule.
        return UnsupOutput(unsup, logs, sum(int(t["boxes"].shape[0]) for t in counted), empty_scaled=scaled)
