"""Softmax focal loss on Faster R-CNN's RoI classifier, as Unbiased Teacher trains it.

Unbiased Teacher (Liu et al., ICLR 2021; facebookresearch/unbiased-teacher, ``ROI_HEADS.LOSS:
FocalLoss``) replaces the RoI head's cross-entropy with a softmax focal loss (gamma 1.5) for
supervised and pseudo-labeled images alike, against the foreground/background imbalance of
pseudo-labels. torchvision's RoIHeads calls the module-level ``fastrcnn_loss``: assigning
``roi_heads.fastrcnn_loss`` does nothing, and patching the module global would change every model
in the process. So :class:`FocalRoIHeads` overrides the training path of ``forward``, and
:func:`use_focal_roi_heads` gives one model such a head built from its own submodules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads


def softmax_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 1.5,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over RoIs of ``(1 - p_t)^gamma * CE``, or its weighted mean.

    Args:
        logits: (N, C) class logits, background at index 0.
        labels: (N,) int64 targets in 0..C-1.
        gamma: focusing exponent; 0 gives torchvision's mean cross-entropy exactly.
        weights: (N,) per-RoI weights (no gradient): the loss is then ``sum(w * l) / max(sum(w), 1)``,
            Soft Teacher's normalisation of its background-weighted RoI loss.

    Returns:
        A scalar; 0 (still attached to ``logits``) when N is 0.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    per_roi = (1.0 - p_t) ** gamma * ce
    if weights is None:
        return per_roi.mean()
    weights = weights.detach().to(per_roi.dtype)
    return (weights * per_roi).sum() / weights.sum().clamp(min=1.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over RoIs of ``-sum_c q_c log p_c``: the cross-entropy against a class distribution ``q``
    per RoI (a one-hot ``q`` gives torchvision's cross-entropy). Its optimum is ``p = q``; a focal
    factor ``(1 - p_c)^gamma`` would move it (at gamma 1.5, q = (0.9, 0.1) is best met by p =
    (0.73, 0.27)), so soft targets take none.

    Args:
        logits: (N, C) class logits, background at index 0.
        targets: (N, C) target distributions (rows summing to 1; no gradient), e.g. a teacher's softmax.

    Returns:
        A scalar; 0 (still attached to ``logits``) when N is 0.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}")
    return -(targets.detach().float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class FocalRoIHeads(RoIHeads):
    """torchvision's box-only RoIHeads whose training classification loss is :func:`softmax_focal_loss`.

    Takes RoIHeads' constructor arguments; ``focal_gamma`` (default 1.5) is set afterwards, as
    :func:`use_focal_roi_heads` does. Box regression stays torchvision's (smooth L1, beta 1/9,
    summed over positives and divided by the number of sampled RoIs).

    ``background_weights``, when set (only for the pass over pseudo-labeled images, see
    :func:`finetune.semi.soft.soft_background`), maps the sampled proposals and the image shapes to
    one weight per RoI; background RoIs take it, foreground RoIs weight 1, and the classification
    loss is their weighted mean (Soft Teacher).

    ``soft_targets``, when set (the pseudo-labeled pass with ``semi.soft_classes``, see
    :func:`finetune.semi.soft.soft_classes`), maps the sampled proposals and the image shapes to one
    class distribution per RoI (the teacher's); the RoIs that ``soft_targets_on`` names train against
    it (:func:`soft_cross_entropy`, whatever ``focal_gamma``), the others against their sampled label
    as one-hot targets: ``background``, the
    RoIs sampled as background (an object the teacher found but left below the pseudo-label
    threshold keeps the teacher's belief about its class instead of "background"); ``all``, every
    sampled RoI (Humble Teacher's soft targets).
    """

    focal_gamma: float = 1.5
    background_weights: Callable[[list[torch.Tensor], list[tuple[int, int]]], torch.Tensor] | None = None
    soft_targets: Callable[[list[torch.Tensor], list[tuple[int, int]]], torch.Tensor] | None = None
    soft_targets_on: str = "background"

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        _check_box_only(self)
        if targets is None:
            raise ValueError("FocalRoIHeads needs targets in training mode")
        for t in targets:  # the checks RoIHeads.forward makes before sampling
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        labels_all = torch.cat(labels, 0)
        regression_all = torch.cat(regression_targets, 0)
        weights = None
        if self.background_weights is not None and labels_all.numel():
            bg = self.background_weights(proposals, image_shapes)
            weights = torch.where(labels_all > 0, torch.ones_like(bg), bg)
        if self.soft_targets is not None and labels_all.numel():
            wanted = self._soft_targets(proposals, image_shapes, labels_all, class_logits.shape[-1])
            loss_cls = soft_cross_entropy(class_logits, wanted)
        else:
            loss_cls = softmax_focal_loss(class_logits, labels_all, self.focal_gamma, weights)
        # Box regression as torchvision's fastrcnn_loss: smooth L1 on each positive's own class
        # deltas, summed and divided by the number of sampled RoIs (max 1: no NaN on zero RoIs).
        pos = torch.where(labels_all > 0)[0]
        deltas = box_regression.reshape(class_logits.shape[0], box_regression.shape[-1] // 4, 4)[pos, labels_all[pos]]
        loss_box = F.smooth_l1_loss(deltas, regression_all[pos], beta=1 / 9, reduction="sum")
        loss_box = loss_box / max(1, labels_all.numel())
        return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def _soft_targets(self, proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]],
                      labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Each sampled RoI's target distribution: the teacher's where ``soft_targets_on`` says, else
        the one-hot of its sampled label."""
        assert self.soft_targets is not None
        teacher = self.soft_targets(proposals, image_shapes).float()
        if teacher.shape != (labels.numel(), num_classes):
            raise ValueError(f"soft targets of shape {tuple(teacher.shape)} for {labels.numel()} RoIs of "
                             f"{num_classes} classes")
        if self.soft_targets_on == "all":
            return teacher
        if self.soft_targets_on != "background":
            raise ValueError(f"soft_targets_on={self.soft_targets_on!r} must be 'background' or 'all'")
        hard = F.one_hot(labels, num_classes).to(teacher.dtype)
        return torch.where((labels > 0)[:, None], hard, teacher)


def _check_box_only(heads: RoIHeads) -> None:
    if heads.has_mask() or heads.has_keypoint():
        raise NotImplementedError("the focal RoI head supports box-only Faster R-CNN; a Mask or Keypoint R-CNN "
                                  "keeps torchvision's RoI loss (set semi.roi_focal_gamma=null)")


def use_focal_roi_heads(model: FasterRCNN, gamma: float = 1.5) -> FasterRCNN:
    """Replace ``model.roi_heads`` by a :class:`FocalRoIHeads` holding the same submodules and settings.

    The box RoI pool, head and predictor are the same module objects, and the proposal matcher,
    fg/bg sampler and box coder the same objects, so the state dict's keys and weights and the
    test-time settings (score_thresh, nms_thresh, detections_per_img) are unchanged.

    Args:
        model: a torchvision Faster R-CNN (box-only).
        gamma: the focal exponent (Unbiased Teacher: 1.5).

    Returns:
        ``model``, changed in place.
    """
    heads = model.roi_heads
    if not isinstance(heads, RoIHeads):
        raise TypeError(f"expected a torchvision RoIHeads in model.roi_heads, got {type(heads).__name__}")
    if type(heads) not in (RoIHeads, FocalRoIHeads):
        # Its own forward would be replaced by ours and silently lost.
        raise TypeError(f"model.roi_heads is a {type(heads).__name__}, a RoIHeads subclass: only torchvision's "
                        "RoIHeads can switch to the focal loss")
    _check_box_only(heads)
    if not isinstance(heads, FocalRoIHeads):
        focal = FocalRoIHeads(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
        # The same helper objects, not rebuilt ones: any setting the constructor does not take
        # (allow_low_quality_matches, bbox_xform_clip) carries over as well.
        focal.proposal_matcher, focal.fg_bg_sampler, focal.box_coder = (
            heads.proposal_matcher, heads.fg_bg_sampler, heads.box_coder)
        focal.train(heads.training)
        model.roi_heads = focal
        heads = focal
    heads.focal_gamma = float(gamma)
    return model


@contextlib.contextmanager
def focal_gamma(model: torch.nn.Module, gamma: float | None) -> Iterator[None]:
    """Within the block, the focal RoI head of ``model`` uses ``gamma`` (None: as it is); restored after."""
    heads = getattr(model, "roi_heads", None)
    if gamma is None or not isinstance(heads, FocalRoIHeads):
        yield
        return
    before = heads.focal_gamma
    heads.focal_gamma = float(gamma)
    try:
        yield
    finally:
        heads.focal_gamma = before
