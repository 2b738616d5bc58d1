"""Detection augmentation on ``(image, target)`` pairs with torchvision.transforms.v2.

Boxes follow every geometric change because they travel as ``tv_tensors.BoundingBoxes``; after
the geometric steps, boxes are clamped to the canvas and degenerate ones are removed together
with their labels, areas and crowd flags (``v2.SanitizeBoundingBoxes``). ``area`` keeps the
annotation's value: torchvision's detectors do not read it, and COCO evaluation takes areas from
the untransformed annotation file.

Scale jitter is done as *large scale jitter* (Ghiasi et al. 2021, "Simple Copy-Paste"): the
image is resized by a random factor and then cropped or zero-padded back to its own size. A plain
resize would be pointless here, because the detector's transform resizes every image to
``min_size`` again; multi-scale training at the detector level is ``min_size`` given as a list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Target = dict[str, Any]
_SANITIZED_KEYS = ("labels", "area", "iscrowd")


class RandomScaleJitter(v2.Transform):
    """Resize by a factor drawn from ``scale_range``, then crop/pad back to the input size.

    Factors above 1 zoom in (a random crop of the enlarged image), factors below 1 zoom out (the
    shrunk image is placed at a random position on a zero canvas). Works on every tv_tensor
    (images, boxes, masks) at once, so boxes stay consistent.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_jitter needs 0 < min <= max, got {scale_range}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))  # torch RNG, like the other v2 transforms
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        # Negative offsets make F.crop pad, which places a shrunk image inside the canvas.
        top = _randint(min(0, h - height), max(0, h - height))
        left = _randint(min(0, w - width), max(0, w - width))
        return {"size": [h, w], "top": top, "left": left, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        inpt = self._call_kernel(F.resize, inpt, params["size"], antialias=True)
        return self._call_kernel(F.crop, inpt, params["top"], params["left"], params["height"], params["width"])


class DetectionTransforms:
    """Callable ``(image, target) -> (image, target)`` around a v2 pipeline.

    It makes sure the image is a float32 ``tv_tensors.Image`` in [0, 1] and that ``target["boxes"]``
    is a ``BoundingBoxes`` (a plain XYXY tensor is wrapped), since v2 would pass a plain tensor
    through untouched and let the boxes drift from the image.
    """

    def __init__(self, pipeline: v2.Transform, train: bool) -> None:
        self.pipeline = pipeline
        self.train = train

    def __call__(self, image: Any, target: Target) -> tuple[tv_tensors.Image, Target]:
        image = v2.functional.to_image(image) if not isinstance(image, tv_tensors.Image) else image
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        target = dict(target)
        boxes = target.get("boxes")
        if boxes is not None and not isinstance(boxes, tv_tensors.BoundingBoxes):
            target["boxes"] = tv_tensors.BoundingBoxes(
                torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=tuple(image.shape[-2:]),
            )
        return self.pipeline(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, {self.pipeline})"


def build_transforms(
    train: bool,
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float = 0.0,
    noise_std: float = 0.0,
    scale_jitter: tuple[float, float] | None = None,
) -> Callable[[Any, Target], tuple[tv_tensors.Image, Target]]:
    """Training augmentation or the evaluation pass-through for detection samples.

    Args:
        train: False gives the evaluation transform (only the float32/BoundingBoxes checks).
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip (useful for aerial/microscopy images, not for
            natural scenes).
        color_jitter: strength s of colour jitter (brightness/contrast/saturation 0.8 s, hue
            0.2 s, capped at 0.5, SimCLR's proportions), applied with probability 0.8; 0 = off.
        noise_std: standard deviation of additive Gaussian noise on the [0, 1] image; 0 = off.
        scale_jitter: (min, max) zoom factor for large scale jitter, e.g. (0.5, 2.0); None = off.

    Returns:
        A callable ``(image, target) -> (image, target)``.
    """
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    if color_jitter < 0 or noise_std < 0:
        raise ValueError("color_jitter and noise_std must be >= 0")
    steps: list[v2.Transform] = []
    if train:
        if scale_jitter is not None:
            steps.append(RandomScaleJitter(tuple(scale_jitter)))  # type: ignore[arg-type]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
        if vflip > 0:
            steps.append(v2.RandomVerticalFlip(p=vflip))
        if color_jitter > 0:
            s = color_jitter
            steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s))], p=0.8))
        if noise_std > 0:
            steps.append(v2.GaussianNoise(sigma=noise_std, clip=True))
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_getter)]
    return DetectionTransforms(v2.Compose(steps) if steps else v2.Identity(), train=train)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, ()))


def _labels_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    """Per-box tensors of the target that must be filtered together with the boxes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    n = len(target["boxes"])
    return tuple(
        target[k] for k in _SANITIZED_KEYS if isinstance(target.get(k), torch.Tensor) and target[k].shape[:1] == (n,)
    )

# The strong view of Liu et al. (ICLR 2021, facebookresearch/unbiased-teacher's build_strong_augmentation):
# colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5,
# then three random-erasing passes (p 0.7 / 0.5 / 0.3). All photometric or erasing: the geometry is
# unchanged, so an image's boxes stay valid on its strong view.
_STRONG = v2.Compose([
    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    v2.RandomGrayscale(p=0.2),
    v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
    v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
    v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
    v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
])


def _square_erasing(image: torch.Tensor) -> torch.Tensor:
    """Soft Teacher's RandErase as its strong pipeline sets it (microsoft/SoftTeacher,
    configs/soft_teacher/base.py: ``n_iterations=(1, 5), size=[0, 0.2], squared=True``): 1 to 4
    square patches (numpy's randint excludes the 5), each of side a uniform fraction in [0, 0.2) of
    the image's shorter side (a side that rounds to 0 erases nothing), filled with its grey 125/255.
    A CHW float image in [0, 1]; draws from the global torch RNG, like the v2 transforms."""
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"square erasing takes a CHW float image, got {tuple(image.shape)} {image.dtype}")
    out = image.clone()
    h, w = image.shape[-2:]
    for _ in range(int(torch.randint(1, 5, ()))):
        side = int(float(torch.rand(())) * 0.2 * min(h, w))
        if side == 0:
            continue
        y = int(torch.randint(0, h - side + 1, ()))
        x = int(torch.randint(0, w - side + 1, ()))
        out[..., y:y + side, x:x + side] = 125 / 255
    return out


# The strong view of Soft Teacher's recipe at detector sizes (Xu et al., ICCV 2021): the photometric
# part of the view above (colour jitter, grayscale; Soft Teacher draws one RandAugment colour op),
# no blur, and Soft Teacher's square erasing instead of Unbiased Teacher's passes. Unbiased Teacher's
# erasing removes 5-20%, then 2-20% and 2-20% of the image's area (with p 0.7, 0.5, 0.3): on the
# 128 px synthetic scenes, whose objects fill 6-56% of the image, the converged labeled-only detector
# keeps AP 10.8 of its 18.7 under that erasing alone and 7.2-7.9 under the whole view (three draws);
# under this one it keeps 14.5-15.7 (BENCHMARKS.md's semi section). Geometric jitter (Soft
# Teacher's translate/rotate/shear) is left out: the teacher's boxes would have to follow it.
# (A change here, or in _square_erasing, changes runs recorded under `semi.strong_view=soft_teacher`
# and `erase`; the default view is
# `unbiased_teacher`, which bench_semi's ADDED_SETTINGS keeps out of fingerprints.)
_STRONG_SOFT = v2.Compose([
    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    v2.RandomGrayscale(p=0.2),
    _square_erasing,
])

# Soft Teacher's erasing alone, the colours untouched: for classes told apart by colour (chess's white
# and black pieces of one shape), where the colour jitter asks the student to name a piece's side on a
# view the converged labeled-only detector keeps 24 of its 56 AP on (colour jitter and grayscale alone;
# README's semi figures), so the pseudo-labels teach the confusion.
_STRONG_ERASE = v2.Compose([_square_erasing])

STRONG_VIEWS = {"unbiased_teacher": _STRONG, "soft_teacher": _STRONG_SOFT, "erase": _STRONG_ERASE}


def strong_augment(image: torch.Tensor, generator: torch.Generator | None = None,
                   view: str = "unbiased_teacher") -> torch.Tensor:
    """The strong view of a CHW float image in [0, 1]; same shape, values in [0, 1].

    ``view``: ``unbiased_teacher`` (Liu et al.'s colour, blur and three erasing passes) or
    ``soft_teacher`` (colour and Soft Teacher's 1-4 small grey squares) or ``erase`` (the squares
    alone, colours kept), see :data:`STRONG_VIEWS`.
    torchvision's v2 transforms draw from the global torch RNG; with ``generator`` the global RNG
    is forked and seeded from it, so the result is reproducible and the caller's RNG untouched.
    """
    if view not in STRONG_VIEWS:
        raise ValueError(f"strong view {view!r} is not one of {sorted(STRONG_VIEWS)}")
    transform = STRONG_VIEWS[view]
    # Out of place: RandomGrayscale returns one channel expanded to three (overlapping memory),
    # which an in-place clamp refuses when no erasing pass copied it afterwards.
    if generator is None:
        return transform(image).clamp(0.0, 1.0)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image).clamp(0.0, 1.0)
