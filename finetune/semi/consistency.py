"""CSD consistency regularisation (Jeong et al., "Consistency-based Semi-supervised Learning for
Object Detection", NeurIPS 2019) for RetinaNet and for Faster R-CNN's RPN.

Each unlabeled image is seen twice: view A = perturb(image), view B = perturb(mirror(image)). The
mirror is applied to the padded batch tensor after the detector's own resize/normalise, so the
feature grid mirrors at the tensor level and anchor (l, y, x, a) of A corresponds to
(l, y, W_l - 1 - x, a) of B. torchvision places anchor centres at x * stride (not (x + 0.5) *
stride) and pads to a multiple of 32, so in pixels the match is off by up to one stride; CSD
accepts the same approximation. Per kept anchor, the loss is the Jensen-Shannon divergence of the
two views' class probabilities (RetinaNet: one Bernoulli per class; RPN: objectness) plus the MSE
of the box deltas with B's dx negated. Background elimination (CSD): only anchors whose highest
class probability in view A reaches ``background_threshold`` count; the mask is detached.
Gradients flow through both views, as in CSD. The weight ramps up as exp(-5 (1 - t)^2).

``semi=consistency`` (:class:`Consistency`) trains it alone, without a teacher, from the first step;
``semi.consistency_weight > 0`` adds it to a teacher-student mode's step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finetune.detectors import capabilities_of
from finetune.semi.base import SemiMode, SemiStep, UnsupOutput, register_semi_mode, running_stats_frozen


def mirror_index(grid_sizes: Sequence[tuple[int, int]], num_anchors: int, device=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Index of each flattened anchor's mirror (levels concatenated, per level (y, x, a) row-major)."""
    parts, offset = [], 0
    for h, w in grid_sizes:
        y, x, a = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                 torch.arange(num_anchors, device=device), indexing="ij")
        parts.append((offset + (y * w + (w - 1 - x)) * num_anchors + a).reshape(-1))
        offset += h * w * num_anchors
    return torch.cat(parts)


def perturb(images: torch.Tensor, noise_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise plus a per-image contrast (x0.8-1.2) and brightness (+-0.2) change; no geometry."""
    n = images.shape[0]
    shape = (n,) + (1,) * (images.dim() - 1)
    dev = images.device
    contrast = 0.8 + 0.4 * torch.rand(shape, generator=generator).to(dev)
    bright = 0.4 * torch.rand(shape, generator=generator).to(dev) - 0.2
    out = images * contrast + bright
    if noise_std > 0:
        out = out + noise_std * torch.randn(images.shape, generator=generator).to(dev)
    return out


def js_divergence_bernoulli(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise Jensen-Shannon divergence between Bernoulli(p) and Bernoulli(q) (nats)."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def consistency_terms(cls_a: torch.Tensor, cls_b: torch.Tensor, box_a: torch.Tensor, box_b: torch.Tensor,
                      mirror: torch.Tensor, background_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(class JS, box MSE) between view A's per-anchor outputs and view B's mirrored ones.

    ``cls_*``: (N, anchors, K) logits; ``box_*``: (N, anchors, 4) deltas (dx, dy, dw, dh).
    """
    p_a = torch.sigmoid(cls_a)
    p_b = torch.sigmoid(cls_b[:, mirror])
    b_b = box_b[:, mirror]
    b_b = torch.cat([-b_b[..., :1], b_b[..., 1:]], -1)
    keep = (p_a.detach().amax(-1) >= background_threshold)
    zero = (cls_a.sum() + cls_b.sum() + box_a.sum() + box_b.sum()) * 0.0
    if not keep.any():
        return zero, zero
    js = js_divergence_bernoulli(p_a[keep], p_b[keep]).sum(-1).mean()
    mse = F.mse_loss(box_a[keep], b_b[keep])
    return js + zero, mse + zero


def rampup_weight(step: int, rampup_steps: int) -> float:
    """CSD's Gaussian ramp-up exp(-5 (1 - t)^2), t = min(1, step / rampup_steps); 1 without ramp-up."""
    if rampup_steps <= 0:
        return 1.0
    t = min(1.0, step / rampup_steps)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class ConsistencyLoss(nn.Module):
    """CSD consistency of a (K-class) RetinaNet or of a Faster R-CNN's RPN on unlabeled images."""

    def __init__(self, noise_std: float = 0.05, background_threshold: float = 0.5, box_weight: float = 1.0,
                 rampup_steps: int = 0) -> None:
        super().__init__()
        self.noise_std = noise_std
        self.background_threshold = background_threshold
        self.box_weight = box_weight
        self.rampup_steps = rampup_steps

    def forward(self, model: nn.Module, images: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        batch, _ = model.transform(images)  # type: ignore[operator]
        x = batch.tensors
        both = torch.cat([perturb(x, self.noise_std), perturb(x.flip(-1), self.noise_std)])
        cls, box, grid, num_anchors = _anchor_outputs(model, both)
        n = x.shape[0]
        mirror = mirror_index(grid, num_anchors, device=x.device)
        js, mse = consistency_terms(cls[:n], cls[n:], box[:n], box[n:], mirror, self.background_threshold)
        w = rampup_weight(step, self.rampup_steps)
        return {"consistency_cls": w * js, "consistency_box": w * self.box_weight * mse,
                "consistency_weight": torch.tensor(w)}


def _anchor_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], int]:
    """Per-anchor class logits (N, anchors, C) and deltas (N, anchors, 4), grid sizes, anchors per location,
    from the detector's registered ``anchor_outputs`` (RetinaNet's head, Faster R-CNN's RPN)."""
    outputs = capabilities_of(model).anchor_outputs
    if outputs is None:
        raise TypeError(f"consistency needs per-anchor outputs, which {type(model).__name__} does not register")
    return outputs(model, x)


@register_semi_mode("consistency")
class Consistency(SemiMode):
    """CSD on the weak views of the unlabeled images; no teacher, no pseudo-labels, no burn-in wait."""

    requires: ClassVar[tuple[str, ...]] = ("anchor_outputs",)
    after_burn_in: ClassVar[bool] = False
    weight_key: ClassVar[str] = "consistency_weight"
    combinable: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.criterion = ConsistencyLoss(**dict(self.settings.get("consistency") or {}))

    def weight(self) -> float:
        return float(self.settings.get(self.weight_key) or 1.0)  # semi=consistency alone: 1 unless set

    def loss(self, module: SemiStep, unlabeled: Mapping[str, Any]) -> UnsupOutput:
        with running_stats_frozen(module.model):  # the perturbed passes leave BN's running statistics as they are
            c = self.criterion(module.model, [im.to(module.device) for im in unlabeled["weak"]],
                               int(module.global_step))
        logs = {"train/consistency_cls": c["consistency_cls"].detach(),
                "train/consistency_box": c["consistency_box"].detach(),
                "train/consistency_rampup": c["consistency_weight"].detach()}
        return UnsupOutput(c["consistency_cls"] + c["consistency_box"], logs)
