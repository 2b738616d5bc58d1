"""RetinaNet's losses normalised by the batch's foreground anchors, for the pseudo-labeled pass.

torchvision's RetinaNet divides each image's summed focal (and box) loss by that image's own number
of foreground anchors, then averages over the images. On pseudo-labels that weighs an image with
one pseudo-box and ten thousand background anchors as much as one with twenty boxes: the sparse
image's background term, divided by 1, dominates the batch. mmdetection's dense heads (and so Soft
and Consistent Teacher) divide the batch's summed loss by the batch's foreground anchors instead
(``avg_factor``). :func:`batch_normalised` switches a RetinaNet to that within a block; the labeled
pass keeps torchvision's normalisation, as plain fine-tuning does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MethodType
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import _box_loss
from torchvision.ops import sigmoid_focal_loss


def _classification_loss(self: Any, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor],
                         matched_idxs: list[torch.Tensor]) -> torch.Tensor:
    total = head_outputs["cls_logits"].new_zeros(())
    foreground = 0
    for target, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs):
        fg = matched >= 0
        foreground += int(fg.sum())
        onehot = torch.zeros_like(logits)
        onehot[fg, target["labels"][matched[fg]]] = 1.0
        valid = matched != self.BETWEEN_THRESHOLDS  # anchors between the IoU thresholds are ignored
        total = total + sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum")
    return total / max(1, foreground)


def _regression_loss(self: Any, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor],
                     anchors: list[torch.Tensor], matched_idxs: list[torch.Tensor]) -> torch.Tensor:
    total = head_outputs["bbox_regression"].new_zeros(())
    foreground = 0
    for target, deltas, anchors_i, matched in zip(targets, head_outputs["bbox_regression"], anchors, matched_idxs):
        fg = torch.where(matched >= 0)[0]
        foreground += fg.numel()
        beta = getattr(self, "beta", None)  # SmoothL1RegressionHead's (torchvision's own head passes none: 1.0)
        total = total + _box_loss(self._loss_type, self.box_coder, anchors_i[fg], target["boxes"][matched[fg]],
                                  deltas[fg], cnf=None if beta is None else {"beta": beta})
    return total / max(1, foreground)


@contextlib.contextmanager
def batch_normalised(model: nn.Module) -> Iterator[bool]:
    """Within the block, a torchvision RetinaNet's classification and box losses are the batch's sums
    over its foreground anchors (mmdetection's ``avg_factor``); yields whether it applied (False for
    any other detector, whose losses stay as they are)."""
    if not isinstance(model, RetinaNet):
        yield False
        return
    heads = (model.head.classification_head, model.head.regression_head)
    heads[0].compute_loss = MethodType(_classification_loss, heads[0])  # type: ignore[method-assign]
    heads[1].compute_loss = MethodType(_regression_loss, heads[1])  # type: ignore[method-assign]
    try:
        yield True
    finally:
        for h in heads:
            del h.compute_loss  # the class's method again
