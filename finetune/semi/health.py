"""Pseudo-label health: boxes per image and class, and precision/recall against hidden ground truth.

What users of the teacher-student repos ask for and do not get: how many pseudo-boxes the teacher
keeps against the labeled set's boxes per image, per class, and, when the unlabeled images carry
hidden ground truth (the splitter's protocol), how many of them are right (IoU >= 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import box_iou


class PseudoLabelHealth:
    """Accumulates pseudo-labels (and their hidden ground truth) until :meth:`reset`."""

    def __init__(self, num_classes: int, class_names: Sequence[str], iou: float = 0.5) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.iou = iou
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.images = 0
        self.images_without_pseudo = 0
        self.images_with_gt = 0
        self.boxes = [0] * k
        self.tp = [0] * k
        self.fp = [0] * k
        self.fn = [0] * k

    def update(self, pseudo: list[dict[str, torch.Tensor]],
               ground_truth: list[dict[str, torch.Tensor] | None] | None = None) -> None:
        for i, p in enumerate(pseudo):
            labels = p["labels"].cpu()
            self.images += 1
            self.images_without_pseudo += int(labels.numel() == 0)
            for c in labels.tolist():
                self.boxes[int(c) - 1] += 1
            gt = ground_truth[i] if ground_truth is not None else None
            if gt is None:
                continue
            self.images_with_gt += 1
            boxes, scores = p["boxes"].detach().float().cpu(), p["scores"].detach().float().cpu()
            g_boxes, g_labels = gt["boxes"].float().cpu().reshape(-1, 4), gt["labels"].cpu()
            for c in range(1, self.num_classes + 1):
                pb = boxes[labels == c][scores[labels == c].argsort(descending=True)]
                gb = g_boxes[g_labels == c]
                tp = _greedy_matches(pb, gb, self.iou)
                self.tp[c - 1] += tp
                self.fp[c - 1] += pb.shape[0] - tp
                self.fn[c - 1] += gb.shape[0] - tp

    def summary(self, thresholds: torch.Tensor | None = None,
                labeled_boxes_per_image: float | None = None) -> dict[str, Any]:
        n = max(1, self.images)
        scored = self.images_with_gt > 0
        per_class = {}
        for c, name in enumerate(self.class_names):
            entry: dict[str, Any] = {"pseudo_boxes_per_image": self.boxes[c] / n}
            if thresholds is not None:
                entry["threshold"] = float(thresholds[c])
            if scored:
                entry.update(precision=_ratio(self.tp[c], self.tp[c] + self.fp[c]),
                             recall=_ratio(self.tp[c], self.tp[c] + self.fn[c]),
                             tp=self.tp[c], fp=self.fp[c], fn=self.fn[c])
            per_class[name] = entry
        tp, fp, fn = sum(self.tp), sum(self.fp), sum(self.fn)
        per_image = sum(self.boxes) / n
        return {
            "images": self.images,
            "pseudo_boxes_per_image": per_image,
            "labeled_boxes_per_image": labeled_boxes_per_image,
            "pseudo_to_labeled_ratio": per_image / labeled_boxes_per_image if labeled_boxes_per_image else None,
            "images_without_pseudo": self.images_without_pseudo / n,
            "precision": _ratio(tp, tp + fp) if scored else None,
            "recall": _ratio(tp, tp + fn) if scored else None,
            "iou": self.iou,
            "per_class": per_class,
        }

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("images", "images_without_pseudo", "images_with_gt", "boxes", "tp",
                                                "fp", "fn")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if isinstance(v, list) else int(v))

    def merge(self, other: dict[str, Any]) -> None:
        """Add another accumulator's counts (another DDP rank's ``state_dict()``)."""
        for k, v in other.items():
            cur = getattr(self, k)
            setattr(self, k, [a + b for a, b in zip(cur, v)] if isinstance(cur, list) else cur + int(v))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _greedy_matches(pred: torch.Tensor, gt: torch.Tensor, iou: float) -> int:
    """True positives of score-sorted predictions, each ground-truth box matched at most once."""
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return 0
    ious = box_iou(pred, gt)
    used = torch.zeros(gt.shape[0], dtype=torch.bool)
    tp = 0
    for row in ious:
        row = row.masked_fill(used, -1.0)
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            tp += 1
    return tp


class LossWatch:
    """Warnings for the failure modes the peers' users report: no pseudo-boxes, dead or exploding unsup loss."""

    def __init__(self, patience: int = 50, ratio: float = 100.0) -> None:
        self.patience = patience
        self.ratio = ratio
        self._no_boxes = 0
        self._zero = 0
        self._active: set[str] = set()
        self._counts = {"no_pseudo_boxes": 0, "unsup_loss_zero": 0, "unsup_loss_exploding": 0}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def update(self, step: int, num_pseudo_boxes: int, sup_loss: float, unsup_loss: float,
               scaled: bool = False) -> list[str]:
        """One step's counts; the warnings that start this step. ``scaled``: ``semi.empty_weight``
        scaled this step's unsupervised loss (to zero with weight 0), which neither extends nor ends a
        run of zero losses."""
        self._no_boxes = self._no_boxes + 1 if num_pseudo_boxes == 0 else 0
        if not scaled:
            self._zero = self._zero + 1 if num_pseudo_boxes > 0 and unsup_loss == 0.0 else 0
        conditions = {
            "no_pseudo_boxes": (self._no_boxes >= self.patience,
                                (f"no pseudo-box for {self._no_boxes} steps: the threshold is above every teacher "
                                "score (lower semi.threshold, or semi.rpn_threshold where semi.soft_classes "
                                "counts the RPN's boxes; try semi.threshold=gmm, or burn in longer)")),
            "unsup_loss_zero": (self._zero >= self.patience,
                                f"unsupervised loss at zero for {self._zero} steps although pseudo-boxes exist"),
            "unsup_loss_exploding": (unsup_loss > self.ratio * max(sup_loss, 1e-12),
                                     (f"unsupervised loss {unsup_loss:.3g} is over {self.ratio:g}x the supervised "
                                     f"{sup_loss:.3g}: lower semi.unsup_weight or the LR (peers report collapse/NaN)")),
        }
        out = []
        for name, (on, msg) in conditions.items():
            if on and name not in self._active:
                self._active.add(name)
                self._counts[name] += 1
                out.append(msg)
            elif not on:
                self._active.discard(name)
        return out
