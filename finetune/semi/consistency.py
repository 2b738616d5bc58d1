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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    """Per-anchor class logits (N, anchors, K) and deltas (N, anchors, 4), grid sizes, anchors per location."""
    features = list(model.backbone(x).values())  # type: ignore[operator]
    grid = [tuple(f.shape[-2:]) for f in features]
    if hasattr(model, "head") and hasattr(model, "anchor_generator"):  # RetinaNet
        out = model.head(features)  # type: ignore[operator]
        a = model.anchor_generator.num_anchors_per_location()[0]  # type: ignore[operator, union-attr]
        return out["cls_logits"], out["bbox_regression"], grid, a  # type: ignore[return-value]
    if hasattr(model, "rpn"):  # Faster R-CNN: the RPN's objectness and deltas
        objectness, deltas = model.rpn.head(features)  # type: ignore[operator, union-attr]
        n = x.shape[0]
        a = objectness[0].shape[1]
        cls = torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1, 1) for o in objectness], 1)
        box = torch.cat([d.view(n, a, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in deltas], 1)
        return cls, box, grid, a  # type: ignore[return-value]
    raise TypeError(f"consistency needs a RetinaNet or a Faster R-CNN, got {type(model).__name__}")
