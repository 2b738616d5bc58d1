"""Pseudo-label score thresholds: a fixed score, or Consistent Teacher's per-class GMM.

Labels are 1..K; per-class tensors are indexed by ``label - 1``.

GMM (Wang et al., "Consistent-Teacher", CVPR 2023, their ``gmm_policy`` with policy "high"): per
class, a FIFO of the teacher's last 100 scores (per image, the top-k of that class's scores with
k = int(sum of its scores) + 1); a two-component 1-D Gaussian mixture is fitted (means initialised at
the min and max score) and the threshold is the score of the high component's most likely sample.
A class with fewer than 4 scores keeps everything (threshold 0, as issue 12 asks). scikit-learn is
not a dependency for one 1-D EM, so :func:`fit_gmm_1d` writes it out.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


class ScoreThreshold:
    """Per-class score thresholds; ``update`` sees the teacher's raw detections, ``filter`` applies them.

    Args:
        num_classes: K, the number of foreground classes (labels 1..K).
    """

    kind = "base"

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self._thr = torch.zeros(num_classes)

    def thresholds(self) -> torch.Tensor:
        """The current (K,) per-class thresholds (a copy)."""
        return self._thr.clone()

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        """See one batch of teacher detections before thresholding (fixed thresholds ignore them)."""

    def filter(self, detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Keep each image's detections with ``score >= thresholds()[label - 1]``.

        Empty images come back with boxes (0, 4) float, scores (0,) and labels (0,) int64, the
        negatives torchvision's detectors train on.
        """
        out = []
        for d in detections:
            boxes, scores, labels = d["boxes"].reshape(-1, 4), d["scores"], d["labels"].long()
            thr = self._thr.to(device=scores.device, dtype=scores.dtype)
            keep = scores >= thr[labels - 1]
            out.append({"boxes": boxes[keep].float(), "scores": scores[keep], "labels": labels[keep]})
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
    """

    kind = "fixed"

    def __init__(self, num_classes: int, value: float) -> None:
        super().__init__(num_classes)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a score threshold must be in [0, 1], got {value}")
        self._thr = torch.full((num_classes,), float(value))


class GMMThreshold(ScoreThreshold):
    """Consistent Teacher's adaptive per-class threshold from a FIFO of recent teacher scores.

    Args:
        num_classes: K.
        queue_size: scores kept per class (Consistent Teacher: 100).
        min_scores: below this many scores a class keeps everything (threshold 0).
    """

    kind = "gmm"

    def __init__(self, num_classes: int, queue_size: int = 100, min_scores: int = 4) -> None:
        super().__init__(num_classes)
        if queue_size < 1 or min_scores < 1:
            raise ValueError(f"queue_size and min_scores must be >= 1, got {queue_size} and {min_scores}")
        self.queue_size = queue_size
        self.min_scores = min_scores
        self.queues: list[deque[float]] = [deque(maxlen=queue_size) for _ in range(num_classes)]

    def queue_lengths(self) -> list[int]:
        """How many scores each class's FIFO holds."""
        return [len(q) for q in self.queues]

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        """Push each image's per-class top-k scores into the FIFOs and refit every class's threshold."""
        for d in detections:
            scores, labels = d["scores"].detach().float().cpu(), d["labels"].detach().cpu()
            for c in labels.unique().tolist():
                s = scores[labels == c]
                # Consistent Teacher's per-image top-k: roughly as many scores as the class's
                # expected object count, so one image's crowd of low scores cannot flood the FIFO.
                k = min(int(s.sum()) + 1, s.numel())
                self.queues[int(c) - 1].extend(s.topk(k).values.tolist())
        self._refit()

    def _refit(self) -> None:
        self._thr = torch.tensor([gmm_threshold(torch.tensor(list(q)), self.min_scores) for q in self.queues],
                                 dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """Thresholds and FIFO contents (plain lists of floats)."""
        return {**super().state_dict(), "queues": [list(q) for q in self.queues]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore thresholds and FIFOs, so that a resumed run keeps filling the same queues."""
        super().load_state_dict(state)
        self.queues = [deque((float(s) for s in q), maxlen=self.queue_size) for q in state["queues"]]


def build_threshold(spec: float | str, num_classes: int) -> ScoreThreshold:
    """``"gmm"`` -> :class:`GMMThreshold`; a number or numeric string -> :class:`FixedThreshold`."""
    if isinstance(spec, str) and spec.strip().lower() == "gmm":
        return GMMThreshold(num_classes)
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"semi.threshold must be a score in [0, 1] or 'gmm', got {spec!r}") from None
    return FixedThreshold(num_classes, value)


def fit_gmm_1d(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a two-component 1-D Gaussian mixture by EM.

    Means start at ``x.min()`` and ``x.max()``, weights at 1/2, variances at the data variance.
    Stops when the mean log-likelihood changes by less than ``tol``.

    Returns:
        (weights (2,), means (2,), variances (2,)), float64.
    """
    x = x.double().flatten()
    reg = 1e-6  # as scikit-learn's reg_covar: keeps a collapsed component's variance positive
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mu = torch.stack([x.min(), x.max()])
    var = torch.full((2,), float(x.var(unbiased=False)) + reg, dtype=torch.float64)
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


def gmm_threshold(scores: torch.Tensor, min_scores: int = 4) -> float:
    """Consistent Teacher's "high" GMM policy on one class's scores.

    Each score goes to its most probable component; among the scores of the component with the
    larger mean, the one of highest mixture log-likelihood is the threshold.

    Returns:
        The threshold; 0.0 (keep everything) with fewer than ``min_scores`` scores or no score in
        the high component.
    """
    x = scores.double().flatten()
    # Identical scores have no second mode: both components coincide and none is "high", which is
    # Consistent Teacher's fallback (here 0) as well.
    if x.numel() < min_scores or float(x.max() - x.min()) < 1e-9:
        return 0.0
    w, mu, var = fit_gmm_1d(x)
    logp = _log_gauss(x, mu, var) + w.log()
    high = int(mu.argmax())
    assigned = logp.argmax(1) == high
    if not assigned.any():
        return 0.0
    density = torch.logsumexp(logp, 1).masked_fill(~assigned, -math.inf)
    return float(x[int(density.argmax())])
