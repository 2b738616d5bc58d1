"""Per-view colour and blur operations on a batch of views (N, 3, H, W) in [0, 1], each view with its
own factor, as torchvision's functional ops are for one image: what :class:`pretrain.augment.TensorMultiCrop`
applies after cropping."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def per_view(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """``(N, 1, H, W)`` luma of ``(N, 3, H, W)`` RGB in [0, 1] (torchvision's weights)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    # torchvision's factor * x + (1 - factor) * other, as one fused pass.
    return torch.lerp(other.expand_as(x), x, per_view(factor)).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness`` with one factor per view (``factor``: ``(N,)``)."""
    return (x * per_view(factor)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_contrast``: blend with the view's mean gray level, one factor per view."""
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_saturation``: blend with the view's grayscale, one factor per view."""
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (hue rotated by ``shift`` of a turn in HSV), one shift per view.

    The HSV round trip in closed form: value (max) and chroma (max - min) stay, and channel ``c``
    becomes ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n_c + 6 hue) mod 6``,
    ``n = (5, 3, 1)``; about a third of the elementwise passes of torchvision's formulation.
    """
    minc, maxc = x.aminmax(dim=1)
    chroma = maxc - minc
    r, g, b = x.unbind(dim=1)
    # The hue sextant as in torchvision: red wins ties, then green.
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # gray pixels: num is 0 too
    hue6 = num / safe + offset + 6.0 * shift.view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + hue6.unsqueeze(1), 6.0)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1)).clamp_(0, 1)


def gaussian_kernel_size(max_sigma: float) -> int:
    """Odd kernel size covering +-3 sigma (PIL's radius-sigma blur reaches about as far)."""
    return 2 * math.ceil(3 * max_sigma) + 1


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int | None = None) -> Tensor:
    """Gaussian blur with one ``sigma`` per view: a grouped separable convolution, reflect padding.

    Equals torchvision's ``gaussian_blur(view, [k, k], [s, s])`` for each view.
    """
    n, c, h, w = x.shape
    k = kernel_size or gaussian_kernel_size(float(sigma.max()))
    # Reflect padding needs pad < side; a kernel wider than the view gains nothing anyway.
    k = min(k, 2 * (min(h, w) - 1) + 1)
    half = (k - 1) / 2
    t = torch.linspace(-half, half, k, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (t[None, :] / sigma.to(x.dtype)[:, None]) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = k // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


def apply_where(x: Tensor, mask: Tensor, fn: Any, *args: Tensor) -> Tensor:
    """``fn`` on the views where ``mask`` is set only (per-view args indexed alike), in place."""
    idx = mask.nonzero(as_tuple=True)[0]
    if idx.numel():
        x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


# -------------------------------------------------------------------------------------- module
