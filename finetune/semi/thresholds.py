"""Pseudo-label score thresholds: a fixed score, or Consistent Teacher's per-class GMM.

Labels are 1..K; per-class tensors are indexed by ``label - 1``.

GMM (Wang et al., "Consistent-Teacher", CVPR 2023): per class, a FIFO of the teacher's last 100
scores (per image, the top-k of that class's scores with k = int(sum of its scores) + 1); a
two-component 1-D Gaussian mixture is fitted (means initialised at the min and max score) and the
threshold is the score of the high component's most likely sample. A class with fewer than 4
scores keeps everything (threshold 0).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


class ScoreThreshold:
    """Per-class thresholds; ``update`` sees the teacher's raw detections, ``filter`` applies them."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self._thr = torch.zeros(num_classes)

    def thresholds(self) -> torch.Tensor:
        return self._thr.clone()

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        pass

    def filter(self, detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for d in detections:
            boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
            thr = self._thr.to(scores.device)[(labels - 1).clamp(min=0)] if labels.numel() else scores
            keep = scores >= thr if labels.numel() else torch.zeros(0, dtype=torch.bool, device=scores.device)
            out.append({"boxes": boxes[keep].reshape(-1, 4).float(), "scores": scores[keep],
                        "labels": labels[keep].long()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": [float(t) for t in self._thr]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._thr = torch.tensor(state["thresholds"], dtype=torch.float32)


class FixedThreshold(ScoreThreshold):
    def __init__(self, num_classes: int, value: float) -> None:
        super().__init__(num_classes)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a score threshold must be in [0, 1], got {value}")
        self._thr = torch.full((num_classes,), float(value))


class GMMThreshold(ScoreThreshold):
    def __init__(self, num_classes: int, queue_size: int = 100, min_scores: int = 4) -> None:
        super().__init__(num_classes)
        self.queue_size = queue_size
        self.min_scores = min_scores
        self.queues: list[deque[float]] = [deque(maxlen=queue_size) for _ in range(num_classes)]

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self.queues]

    def update(self, detections: list[dict[str, torch.Tensor]]) -> None:
        for d in detections:
            scores, labels = d["scores"].detach().float().cpu(), d["labels"].cpu()
            for c in labels.unique().tolist():
                s = scores[labels == c]
                k = min(int(s.sum()) + 1, s.numel())
                self.queues[int(c) - 1].extend(s.topk(k).values.tolist())
        self._thr = torch.tensor([gmm_threshold(torch.tensor(list(q))) if len(q) >= self.min_scores else 0.0
                                  for q in self.queues], dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "queues": [list(q) for q in self.queues]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queues = [deque(q, maxlen=self.queue_size) for q in state["queues"]]


def build_threshold(spec: float | str, num_classes: int) -> ScoreThreshold:
    """``gmm`` -> :class:`GMMThreshold`; a number -> :class:`FixedThreshold`."""
    if isinstance(spec, str) and spec.strip().lower() == "gmm":
        return GMMThreshold(num_classes)
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"semi.threshold must be a score in [0, 1] or 'gmm', got {spec!r}") from None
    return FixedThreshold(num_classes, value)


def fit_gmm_1d(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-component 1-D Gaussian mixture by EM: (weights, means, variances), means started at min and max."""
    x = x.double().flatten()
    reg = 1e-6  # as scikit-learn's reg_covar: keeps a collapsed component's variance positive
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mu = torch.stack([x.min(), x.max()])
    var = torch.full((2,), float(x.var(unbiased=False)) + reg, dtype=torch.float64)
    prev = -math.inf
    for _ in range(iters):
        logp = _log_gauss(x, mu, var) + w.log()  # (n, 2)
        ll = torch.logsumexp(logp, 1)
        resp = (logp - ll[:, None]).exp()
        nk = resp.sum(0) + 1e-12
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
    """The score of the high component's most likely sample; 0 with too few scores or no high sample."""
    x = scores.double().flatten()
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
