"""The pseudo-label step that Unbiased Teacher and Mean Teacher share.

The teacher (eval mode, no gradients) predicts on the weak views; the threshold (fixed or GMM,
:mod:`finetune.semi.thresholds`) keeps its confident boxes as pseudo-labels; the student trains on
the strong views against them, its BatchNorm running statistics untouched by those views. Without
``semi.unsup_box_loss`` only the classification terms count (RPN objectness and RoI classification;
RetinaNet's classification), as Unbiased Teacher does. With ``semi.soft_background`` (a detector
with RoI heads) the student's background RoIs on pseudo-labeled images weigh the teacher's
background probability (Soft Teacher, :mod:`finetune.semi.soft`). The two modes differ only in
their settings (``conf/finetune/semi/``) and files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from finetune.detectors import capabilities_of, require
from finetune.semi.base import SemiMode, SemiStep, UnsupOutput
from finetune.semi.focal import use_focal_roi_heads
from finetune.semi.soft import soft_background, teacher_forward

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


class TeacherStudentMode(SemiMode):
    """An EMA teacher's thresholded detections on the weak views train the student on the strong ones."""

    needs_teacher: ClassVar[bool] = True
    strong_view: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        super().check(cfg)
        if bool(cfg.semi.get("soft_background", False)):
            require(str(cfg.detector.name), ("roi_heads",), "semi.soft_background=true (it weights the pseudo-labeled "
                    "RoI loss by the teacher)")

    def setup(self, module: SemiStep) -> None:
        self.soft_background = bool(self.settings.get("soft_background", False))
        caps = capabilities_of(module.model)
        if self.soft_background and not caps.roi_heads:
            raise ValueError("semi.soft_background=true weights the pseudo-labeled RoI loss by the teacher: it needs "
                             f"a detector with roi_heads, not {type(module.model).__name__}")
        # An image without pseudo-boxes adds a dense sigmoid detector's whole summed focal loss
        # (torchvision divides each image's loss by max(1, foreground anchors)).
        self.damp_empty = caps.sigmoid_classes
        gamma = self.settings.get("roi_focal_gamma")
        if self.soft_background and gamma is None:
            gamma = 0.0  # the weighting lives in the focal head; gamma 0 is cross-entropy
        if gamma is not None and caps.roi_heads:
            use_focal_roi_heads(module.model, float(gamma))  # type: ignore[arg-type]

    def loss(self, module: SemiStep, unlabeled: Mapping[str, Any]) -> UnsupOutput:
        teacher = module.teacher
        assert teacher is not None
        weak = [im.to(module.device) for im in unlabeled["weak"]]
        strong = [im.to(module.device) for im in unlabeled["strong"]]
        teacher.eval()
        tpass = None
        if self.soft_background:  # the teacher's features are kept to score the student's proposals
            tpass = teacher_forward(teacher, weak)  # type: ignore[arg-type]
            dets = tpass.detections
        else:
            with torch.no_grad():
                dets = teacher(weak)
        dets = [{k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in d.items()} for d in dets]
        pseudo = module.pseudo_labels(dets, unlabeled.get("ground_truth"))
        targets = [{"boxes": p["boxes"].reshape(-1, 4).float(), "labels": p["labels"].long()} for p in pseudo]
        soft = (soft_background(module.model, teacher, tpass)  # type: ignore[arg-type]
                if tpass is not None else contextlib.nullcontext())
        with running_stats_frozen(module.model), soft:
            losses = module.model(strong, targets)
        keep_box = bool(self.settings.get("unsup_box_loss", False))
        terms = {k: v for k, v in losses.items() if keep_box or k not in BOX_TERMS}
        unsup: torch.Tensor = sum(terms.values())  # type: ignore[assignment]
        with_boxes = sum(int(t["boxes"].shape[0] > 0) for t in targets)
        num_pseudo = sum(int(t["boxes"].shape[0]) for t in targets)
        if self.damp_empty and with_boxes < len(targets) / 2:
            # Consistent Teacher scales the unsupervised loss by 0.01 when fewer than half the batch
            # has pseudo-boxes.
            unsup = unsup * float(self.settings.get("empty_batch_weight", 0.01))
        logs: dict[str, Any] = {f"train/unsup_{k}": v.detach() for k, v in terms.items()}
        logs["semi/pseudo_boxes_per_image"] = torch.tensor(num_pseudo / max(1, len(targets)))
        logs["semi/images_with_pseudo"] = torch.tensor(with_boxes / max(1, len(targets)))
        return UnsupOutput(unsup, logs, num_pseudo)
