"""The weak and strong views of an unlabeled image (Unbiased Teacher).

The strong view is facebookresearch/unbiased-teacher's ``build_strong_augmentation``: colour jitter
(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5, then three
random-erasing passes (p 0.7 / 0.5 / 0.3). All photometric or erasing: the geometry is unchanged,
so the teacher's boxes on the weak view are valid targets on the strong one.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

_STRONG = v2.Compose([
    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    v2.RandomGrayscale(p=0.2),
    v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
    v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
    v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
    v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
])


def strong_augment(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The strong view of a CHW float image in [0, 1]; same shape, values in [0, 1].

    torchvision's v2 transforms draw from the global torch RNG; with ``generator`` the global RNG
    is forked and seeded from it, so the result is reproducible and the caller's RNG untouched.
    """
    # Out of place: RandomGrayscale returns one channel expanded to three (overlapping memory),
    # which an in-place clamp refuses when no erasing pass copied it afterwards.
    if generator is None:
        return _STRONG(image).clamp(0.0, 1.0)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _STRONG(image).clamp(0.0, 1.0)


def weak_view(image: torch.Tensor, flip: bool) -> torch.Tensor:
    """The weak view: the image, horizontally flipped or not (the detector resizes it)."""
    return image.flip(-1) if flip else image


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy boxes mirrored in an image of ``width``: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out
