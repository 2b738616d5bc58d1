"""Softmax focal loss on Faster R-CNN's RoI classifier, as Unbiased Teacher trains it.

Unbiased Teacher (Liu et al., ICLR 2021) replaces the RoI head's cross-entropy with a softmax focal
loss for supervised and pseudo-labeled images alike, against the foreground/background imbalance of
pseudo-labels. torchvision's RoIHeads calls the module-level ``fastrcnn_loss``: assigning
``roi_heads.fastrcnn_loss`` does nothing, and patching the module global would change every model
in the process. So :class:`FocalRoIHeads` overrides the training path of ``forward``, and
:func:`use_focal_roi_heads` switches one model's head to it, keeping its submodules and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads


def softmax_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 1.5) -> torch.Tensor:
    """Mean over RoIs of ``(1 - p_t)^gamma * CE`` (gamma 0 is torchvision's mean cross-entropy)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    return ((1.0 - p_t) ** gamma * ce).mean()


class FocalRoIHeads(RoIHeads):
    """RoIHeads whose training classification loss is :func:`softmax_focal_loss` (``focal_gamma``)."""

    focal_gamma: float = 1.5

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[no-untyped-def, override]
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_mask() or self.keypoint_roi_pool is not None:
            raise NotImplementedError("FocalRoIHeads supports box-only Faster R-CNN (no mask or keypoint head)")
        if targets is None:
            raise ValueError("training needs targets")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        labels = torch.cat(labels, 0)
        regression_targets = torch.cat(regression_targets, 0)
        loss_cls = softmax_focal_loss(class_logits, labels, self.focal_gamma)
        # Box regression exactly as torchvision's fastrcnn_loss: smooth L1 (beta 1/9) on the positives'
        # own class, summed and divided by the number of sampled RoIs.
        pos = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
        loss_box = F.smooth_l1_loss(box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9,
                                    reduction="sum") / max(1, labels.numel())
        return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


def use_focal_roi_heads(model: FasterRCNN, gamma: float = 1.5) -> FasterRCNN:
    """Switch ``model.roi_heads`` to :class:`FocalRoIHeads` in place (same submodules, same state dict)."""
    heads = model.roi_heads
    if not isinstance(heads, RoIHeads):
        raise TypeError(f"expected a torchvision RoIHeads, got {type(heads).__name__}")
    heads.__class__ = FocalRoIHeads
    heads.focal_gamma = float(gamma)
    return model
