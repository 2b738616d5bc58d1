"""Pseudo-label score thresholds (a fixed score, or Consistent Teacher's per-class GMM) and the
per-image limits applied after them.

Labels are 1..K; per-class tensors are indexed by ``label - 1``.

GMM (Wang et al., "Consistent-Teacher", CVPR 2023; Adamdad/ConsistentTeacher,
``ssod/models/consistent_teacher.py``, ``extract_teacher_info`` and ``gmm_policy`` with policy "high"):

- per image, class-agnostic, only the top ``k = int(sum of the image's scores + 0.5) + 1`` detections
  are candidates (their code: ``num_gt = min(int(scores.sum() + 0.5), len(scores) - 1)`` and a
  threshold just below ``scores[num_gt]``): the image's score mass estimates its object count. The
  candidates feed the per-class score queues *and* bound the kept pseudo-labels;
- per class, a FIFO of the last 100 candidate scores; a two-component 1-D Gaussian mixture is fitted
  (means initialised at the min and max score, weights at 1/2, variances at 1: their
  ``precisions_init`` of 1) and the threshold is the score of the high component's most likely sample;
- a class with fewer than 4 scores gets a fixed fallback threshold (``gmm_policy``'s
  ``given_gt_thr``, whose default is 0.5; their training call passes 0, which with the top-k above
  still bounds what is kept). Here ``semi.gmm_fallback``, 0.5: without it a class the teacher has
  barely seen keeps every detection the detector returns (its test-time ``score_thresh``, 0.05).

scikit-learn is not a dependency for one 1-D EM, so :func:`fit_gmm_1d` writes it out.

After the threshold, every kind applies the per-image limits ``semi.pseudo_nms_iou`` (class-agnostic
NMS over the kept boxes) and ``semi.max_pseudo_per_image`` (the highest-scoring N), see
:func:`limit_per_image`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.ops import nms

log = logging.getLogger(__name__)


def score_mass_k(scores: torch.Tensor) -> int:
    """Consistent Teacher's per-image candidate count: ``int(sum(scores) + 0.5) + 1``, at most ``len(scores)``."""
    return min(int(float(scores.float().sum()) + 0.5) + 1, int(scores.numel()))


def limit_per_image(d: dict[str, torch.Tensor], nms_iou: float | None = None,
                    max_per_image: int | None = None) -> dict[str, torch.Tensor]:
    """One image's pseudo-labels after class-agnostic NMS at ``nms_iou`` and a cap of the
    ``max_per_image`` highest-scoring boxes (None: that step is off).

    Class-agnostic because the duplicates that matter are one object under two labels: a detector
    unsure between colour twins (chess's white and black pieces) scores the same box for both, and
    per-class NMS, which the detector already ran, keeps both. The cap follows the Unbiased Teacher
    author's advice for custom data (facebookresearch/unbiased-teacher issue 46): as many pseudo-boxes
    as the labeled images have boxes, or fewer.

    Returns:
        The same keys, the kept boxes in descending score order when a step ran.
    """
    boxes, scores = d["boxes"].reshape(-1, 4), d["scores"]
    if scores.numel() == 0 or (nms_iou is None and max_per_image is None):
        return d
    if nms_iou is not None:
        keep = nms(boxes.float(), scores.float(), float(nms_iou))  # sorted by decreasing score
    else:
        keep = scores.argsort(descending=True, stable=True)
    if max_per_image is not None:
        keep = keep[:max_per_image]
    return {k: (v.reshape(-1, 4) if k == "boxes" else v)[keep] for k, v in d.items()}


def _cap_kind(spec: Any) -> str | None:
    """``auto`` or ``labeled_max`` for a cap given by the labeled set's box counts, else None."""
    kind = spec.strip().lower() if isinstance(spec, str) else None
    return kind if kind in ("auto", "labeled_max") else None


def _cap_figure(spec: Any, labeled_boxes_per_image: float | None, labeled_max_boxes: int | None) -> float | None:
    """The labeled set's figure a cap of kind ``spec`` scales: the mean for ``auto``, the most for ``labeled_max``."""
    return labeled_max_boxes if _cap_kind(spec) == "labeled_max" else labeled_boxes_per_image


def max_pseudo_per_image(spec: int | str | None, factor: float = 1.0,
                         labeled_boxes_per_image: float | None = None,
                         labeled_max_boxes: int | None = None) -> int | None:
    """``semi.max_pseudo_per_image`` as a number: ``auto`` is ``ceil(labeled boxes per image * factor)``
    (the labeled set's mean), ``labeled_max`` is ``ceil(the most boxes on one labeled image * factor)``
    (both at least 1), an integer is itself, None is no cap.

    A cap at the mean cuts every image more crowded than the average: on chess (12.7 labeled boxes per
    image, boards of 2 to 32 pieces) it kept 7 of the converged teacher's 11 boxes per unlabeled image
    above 0.5 and its recall fell from 0.84 to 0.56 (2026-12-06), the pieces it dropped trained as
    background. ``labeled_max`` only bounds an image by the most crowded labeled one.

    Raises:
        ValueError: anything else, or ``auto`` / ``labeled_max`` without the labeled set's figure.
    """
    if spec is None:
        return None
    if _cap_kind(spec) is not None:
        figure = _cap_figure(spec, labeled_boxes_per_image, labeled_max_boxes)
        if figure is None:
            raise ValueError(f"semi.max_pseudo_per_image={spec} needs the labeled set's "
                             f"{'most boxes on one image' if _cap_kind(spec) == 'labeled_max' else 'boxes per image'}")
        return max(1, math.ceil(float(figure) * float(factor) - 1e-9))
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise ValueError(f"semi.max_pseudo_per_image must be auto, labeled_max, an integer >= 1 or null, got {spec!r}")
    return spec


class ScoreThreshold:
    """Per-class score thresholds; ``update`` sees the teacher's raw detections, ``filter`` applies them.

    Args:
        num_classes: K, the number of foreground classes (labels 1..K).
        nms_iou: class-agnostic NMS IoU over each image's kept boxes (None: off).
        max_per_image: keep at most this many boxes per image, the highest-scoring (None: no cap).
    """

    kind = "base"

    def __init__(self, num_classes: int, nms_iou: float | None = None, max_per_image: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"semi.pseudo_nms_iou must be in (0, 1] or null, got {nms_iou}")
        if max_per_image is not None and max_per_image < 1:
            raise ValueError(f"the pseudo-box cap per image must be >= 1 or null, got {max_per_image}")
        self.num_classes = num_classes
        self.nms_iou = nms_iou
        self.max_per_image = max_per_image
        self._thr = torch.zeros(num_classes)

    def thresholds(self) -> torch.Tensor:
        """The current (K,) per-class thresholds (a copy)."""
        return self._thr.clone()

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        """Replace the (K,) per-class thresholds (scores in [0, 1])."""
        t = torch.as_tensor(thresholds, dtype=torch.float32).detach().cpu().reshape(-1)
        if t.numel() != self.num_classes or not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"need {self.num_classes} thresholds in [0, 1], got {t.tolist()}")
        self._thr = t.clone()

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        """See one batch of teacher detections before thresholding (fixed thresholds ignore them)."""

    def keep_mask(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One image's detections that pass: ``score >= thresholds()[label - 1]``."""
        thr = self._thr.to(device=scores.device, dtype=scores.dtype)
        return scores >= thr[labels - 1]

    def filter(self, detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Each image's detections that pass :meth:`keep_mask`, then the per-image limits
        (:func:`limit_per_image`).

        Empty images come back with boxes (0, 4) float, scores (0,) and labels (0,) int64, the
        negatives torchvision's detectors train on.
        """
        out = []
        for d in detections:
            boxes, scores, labels = d["boxes"].reshape(-1, 4), d["scores"], d["labels"].long()
            keep = self.keep_mask(scores, labels)
            kept = {"boxes": boxes[keep].float(), "scores": scores[keep], "labels": labels[keep]}
            out.append(limit_per_image(kept, self.nms_iou, self.max_per_image))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and strings only, so that a ``weights_only=True`` checkpoint load accepts it."""
        return {"kind": self.kind, "thresholds": [float(t) for t in self._thr]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a different kind or class count is an error."""
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"the checkpoint holds a {kind!r} score threshold, this run uses {self.kind!r}: "
                             "resume with the checkpoint's semi.threshold, or start a new run directory")
        if len(state["thresholds"]) != self.num_classes:
            raise ValueError(f"the checkpoint's thresholds are for {len(state['thresholds'])} classes, this "
                             f"run has {self.num_classes}: resume on the same labeled set's classes")
        self._thr = torch.tensor(state["thresholds"], dtype=torch.float32)


class FixedThreshold(ScoreThreshold):
    """One score for every class (Unbiased Teacher: 0.7).

    Args:
        num_classes: K.
        value: the score threshold, in [0, 1].
        **limits: ``nms_iou``, ``max_per_image`` (:class:`ScoreThreshold`).
    """

    kind = "fixed"

    def __init__(self, num_classes: int, value: float, **limits: Any) -> None:
        super().__init__(num_classes, **limits)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a score threshold must be in [0, 1], got {value}")
        self._thr = torch.full((num_classes,), float(value))


class GMMThreshold(ScoreThreshold):
    """Consistent Teacher's adaptive per-class threshold from a FIFO of recent teacher scores.

    Args:
        num_classes: K.
        queue_size: scores kept per class (Consistent Teacher: 100).
        min_scores: below this many scores a class's threshold is ``fallback``.
        fallback: the threshold of a class without a fit (too few scores, no second mode).
        **limits: ``nms_iou``, ``max_per_image`` (:class:`ScoreThreshold`).
    """

    kind = "gmm"

    def __init__(self, num_classes: int, queue_size: int = 100, min_scores: int = 4, fallback: float = 0.5,
                 **limits: Any) -> None:
        super().__init__(num_classes, **limits)
        if queue_size < 1 or min_scores < 1:
            raise ValueError(f"queue_size and min_scores must be >= 1, got {queue_size} and {min_scores}")
        if not 0.0 <= fallback <= 1.0:
            raise ValueError(f"semi.gmm_fallback must be a score in [0, 1], got {fallback}")
        self.queue_size = queue_size
        self.min_scores = min_scores
        self.fallback = float(fallback)
        self.queues: list[deque[float]] = [deque(maxlen=queue_size) for _ in range(num_classes)]
        self._thr = torch.full((num_classes,), self.fallback)

    def queue_lengths(self) -> list[int]:
        """How many scores each class's FIFO holds."""
        return [len(q) for q in self.queues]

    @staticmethod
    def candidates(scores: torch.Tensor) -> torch.Tensor:
        """Indices of one image's class-agnostic top-``k`` scores, ``k`` = :func:`score_mass_k` (highest first)."""
        if scores.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=scores.device)
        return scores.topk(score_mass_k(scores)).indices

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        """Push each image's candidates' scores into their classes' FIFOs and refit every class's threshold."""
        for d in detections:
            scores, labels = d["scores"].detach().float().cpu(), d["labels"].detach().cpu()
            top = self.candidates(scores)
            for score, label in zip(scores[top].tolist(), labels[top].tolist()):
                self.queues[int(label) - 1].append(score)
        self._refit()

    def keep_mask(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A candidate of its image (:meth:`candidates`) whose score reaches its class's threshold."""
        candidate = torch.zeros_like(scores, dtype=torch.bool)
        candidate[self.candidates(scores)] = True
        return candidate & super().keep_mask(scores, labels)

    def _refit(self) -> None:
        self._thr = torch.tensor([gmm_threshold(torch.tensor(list(q)), self.min_scores, self.fallback)
                                  for q in self.queues], dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """Thresholds and FIFO contents (plain lists of floats)."""
        return {**super().state_dict(), "queues": [list(q) for q in self.queues]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore thresholds and FIFOs, so that a resumed run keeps filling the same queues."""
        super().load_state_dict(state)
        self.queues = [deque((float(s) for s in q), maxlen=self.queue_size) for q in state["queues"]]


def build_threshold(spec: float | str, num_classes: int, gmm_fallback: float = 0.5, **limits: Any) -> ScoreThreshold:
    """``"gmm"`` -> :class:`GMMThreshold` (``gmm_fallback`` for classes without a fit); a number or
    numeric string -> :class:`FixedThreshold`. ``limits``: ``nms_iou``, ``max_per_image``."""
    if isinstance(spec, str) and spec.strip().lower() == "gmm":
        return GMMThreshold(num_classes, fallback=float(gmm_fallback), **limits)
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"semi.threshold must be a score in [0, 1] or 'gmm', got {spec!r}") from None
    return FixedThreshold(num_classes, value, **limits)


def fit_gmm_1d(x: torch.Tensor, iters: int = 100, tol: float = 1e-6,
               init_var: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a two-component 1-D Gaussian mixture by EM.

    Means start at ``x.min()`` and ``x.max()``, weights at 1/2, variances at ``init_var`` (1, as
    Consistent Teacher's ``precisions_init``: on scores in [0, 1] a wide start lets the first E-step
    share the samples out by distance alone). Stops when the mean log-likelihood changes by less
    than ``tol``.

    Returns:
        (weights (2,), means (2,), variances (2,)), float64.
    """
    x = x.double().flatten()
    reg = 1e-6  # as scikit-learn's reg_covar: keeps a collapsed component's variance positive
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mu = torch.stack([x.min(), x.max()])
    var = torch.full((2,), float(init_var), dtype=torch.float64)
    prev = -math.inf
    for _ in range(iters):
        logp = _log_gauss(x, mu, var) + w.log()  # (n, 2) joint log-densities
        ll = torch.logsumexp(logp, 1)
        resp = (logp - ll[:, None]).exp()
        nk = resp.sum(0) + 1e-12  # an emptied component must not divide by zero
        w = nk / x.numel()
        mu = (resp * x[:, None]).sum(0) / nk
        var = (resp * (x[:, None] - mu) ** 2).sum(0) / nk + reg
        cur = float(ll.mean())
        if abs(cur - prev) < tol:
            break
        prev = cur
    return w, mu, var


def _log_gauss(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x[:, None] - mu) ** 2 / var + var.log() + math.log(2 * math.pi))


def gmm_threshold(scores: torch.Tensor, min_scores: int = 4, fallback: float = 0.5) -> float:
    """Consistent Teacher's "high" GMM policy on one class's scores.

    Each score goes to its most probable component; among the scores of the component with the
    larger mean, the one of highest mixture log-likelihood is the threshold.

    Returns:
        The threshold; ``fallback`` with fewer than ``min_scores`` scores or no score in the high
        component (``gmm_policy``'s ``given_gt_thr``).
    """
    x = scores.double().flatten()
    # Identical scores have no second mode: both components coincide and none is "high", which is
    # Consistent Teacher's fallback as well.
    if x.numel() < min_scores or float(x.max() - x.min()) < 1e-9:
        return float(fallback)
    w, mu, var = fit_gmm_1d(x)
    logp = _log_gauss(x, mu, var) + w.log()
    high = int(mu.argmax())
    assigned = logp.argmax(1) == high
    if not assigned.any():
        return float(fallback)
    density = torch.logsumexp(logp, 1).masked_fill(~assigned, -math.inf)
    return float(x[int(density.argmax())])


def pseudo_label_filter(settings: Mapping[str, Any], num_classes: int,
                        labeled_boxes_per_image: float | None, labeled_max_boxes: int | None = None) -> ScoreThreshold:
    """``semi.threshold`` with the GMM fallback and the per-image limits (``semi.pseudo_nms_iou``,
    ``semi.max_pseudo_per_image``: ``auto`` needs ``labeled_boxes_per_image``, ``labeled_max``
    ``labeled_max_boxes``; a module rebuilt from a checkpoint without them, which does not train, gets
    no cap)."""
    cap = settings.get("max_pseudo_per_image")
    factor = float(settings.get("max_pseudo_factor") or 1.0)
    if isinstance(cap, str) and _cap_figure(cap, labeled_boxes_per_image, labeled_max_boxes) is None:
        log.warning("semi.max_pseudo_per_image=%s without the labeled set's box counts: no cap", cap)
        cap = None
    fallback = settings.get("gmm_fallback")
    iou = settings.get("pseudo_nms_iou")
    return build_threshold(settings["threshold"], num_classes,
                           gmm_fallback=0.5 if fallback is None else float(fallback),
                           nms_iou=None if iou is None else float(iou),
                           max_per_image=max_pseudo_per_image(cap, factor, labeled_boxes_per_image, labeled_max_boxes))
