"""Multi-crop augmentation as batched tensor operations on the training device (``data.augment=tensor``).

The PIL path (lightly's ``SwaVTransform`` & co. in DataLoader workers) makes every view of every
image with PIL on the CPU; on a 2-core machine the workers starve the model, and on a GPU they
cannot keep up. Here the loader yields each image once, decoded to uint8 and fitted into a fixed
square (see :class:`pretrain.data.DecodedImages`), and :class:`TensorMultiCrop` makes all views of
a batch at once, on whatever device the batch is on, with the same steps and probabilities as
lightly's view transforms: RandomResizedCrop, horizontal/vertical flip, colour jitter (random
order, applied with ``cj_prob``), random grayscale, solarisation (VICReg), Gaussian blur, and
normalisation.

Why the small kernels below rather than ``torchvision.transforms.v2``: v2 applies one random
parameter set per call to a whole batch (one crop box, one jitter factor, one blur sigma), so
per-view randomness would need a Python loop over every view of every image. Each kernel here
takes one parameter per view instead: crops are one ``torchvision.ops.roi_align`` call per crop
size with a box per view (``aligned=True``; its adaptive sampling averages the pixels of a bin,
which is the antialiasing a downscaling resize needs), colour ops are torchvision's formulas
with per-view factors, and the blur is a grouped separable convolution with a kernel per view.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import hydra.utils
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from pretrain.augment_ops import (  # the ops of the tensor path (tests import them from here too)
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_where,
    gaussian_blur,
    gaussian_kernel_size,
    per_view,
    rgb_to_gray,
)

# lightly's transforms that this module reproduces; others need data.augment=pil.
MULTI_CROP_TRANSFORMS = ("lightly.transforms.SwaVTransform",)
TWO_VIEW_TRANSFORMS = (
    "lightly.transforms.SimCLRTransform",
    "lightly.transforms.MoCoV1Transform",
    "lightly.transforms.MoCoV2Transform",
    "lightly.transforms.DenseCLTransform",  # MoCoV2Transform under another name
    "lightly.transforms.VICRegTransform",
)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (and PIL's convert("L")).
# PIL's solarize(threshold=128) inverts pixels >= 128, as lightly's RandomSolarization uses it.
SOLARIZE_THRESHOLD = 128 / 255


@dataclass(frozen=True)
class CropGroup:
    """``count`` views of ``size`` x ``size`` pixels, cropped by RandomResizedCrop's rule."""

    size: int
    count: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewSpec:
    """Everything a lightly view transform does after the crop, as numbers (see lightly's arguments)."""

    hf_prob: float = 0.5
    vf_prob: float = 0.0
    cj_prob: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray_prob: float = 0.2
    solarize_prob: float = 0.0
    blur_prob: float = 0.5
    sigmas: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] | None = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] | None = (0.229, 0.224, 0.225)


def spec_from_transform_config(cfg: Mapping[str, Any]) -> tuple[list[CropGroup], ViewSpec]:
    """Crop groups and view settings of a method's ``transform`` config (a lightly transform).

    The lightly class's own defaults fill what the config leaves out, so that both paths run
    the same recipe.

    Raises:
        ValueError: for a transform or an option (random rotation) this module does not reproduce.
    """
    target = str(cfg.get("_target_", ""))
    if target not in MULTI_CROP_TRANSFORMS + TWO_VIEW_TRANSFORMS:
        raise ValueError(
            f"data.augment=tensor reproduces {', '.join(MULTI_CROP_TRANSFORMS + TWO_VIEW_TRANSFORMS)}; "
            f"method.transform is {target or 'missing _target_'}: use data.augment=pil"
        )
    defaults = {
        name: p.default
        for name, p in inspect.signature(hydra.utils.get_class(target)).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    given = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"method.transform has {sorted(unknown)}, which {target} does not take")
    a = {**defaults, **given}
    if float(a.get("rr_prob", 0.0)) > 0:
        raise ValueError("data.augment=tensor has no random rotation; set method.transform.rr_prob=0 "
                         "or use data.augment=pil")
    if target in MULTI_CROP_TRANSFORMS:
        lengths = {len(a[k]) for k in ("crop_sizes", "crop_counts", "crop_min_scales", "crop_max_scales")}
        if len(lengths) != 1:
            raise ValueError("method.transform crop_sizes, crop_counts, crop_min_scales and crop_max_scales "
                             "must have one entry per crop group")
        groups = [CropGroup(int(s), int(c), (float(lo), float(hi))) for s, c, lo, hi in
                  zip(a["crop_sizes"], a["crop_counts"], a["crop_min_scales"], a["crop_max_scales"])]
    else:
        groups = [CropGroup(int(a["input_size"]), 2, (float(a["min_scale"]), 1.0))]
    strength = float(a["cj_strength"])
    norm = a.get("normalize")
    spec = ViewSpec(
        hf_prob=float(a["hf_prob"]),
        vf_prob=float(a["vf_prob"]),
        cj_prob=float(a["cj_prob"]),
        brightness=strength * float(a["cj_bright"]),
        contrast=strength * float(a["cj_contrast"]),
        saturation=strength * float(a["cj_sat"]),
        hue=strength * float(a["cj_hue"]),
        gray_prob=float(a["random_gray_scale"]),
        solarize_prob=float(a.get("solarize_prob", 0.0)),
        blur_prob=float(a["gaussian_blur"]),
        sigmas=(float(a["sigmas"][0]), float(a["sigmas"][1])),
        mean=tuple(float(m) for m in norm["mean"]) if norm else None,  # type: ignore[arg-type]
        std=tuple(float(s) for s in norm["std"]) if norm else None,  # type: ignore[arg-type]
    )
    if not 0 <= spec.hue <= 0.5:
        raise ValueError(f"colour jitter hue {spec.hue} must be in [0, 0.5] (cj_strength x cj_hue)")
    return groups, spec


def working_size(groups: Sequence[CropGroup], factor: float = 1.15, multiple: int = 8) -> int:
    """Default side of the square images are fitted into: ``factor`` x the largest crop, rounded up."""
    return int(math.ceil(max(g.size for g in groups) * factor / multiple) * multiple)


# ------------------------------------------------------------------------------------ kernels
def _uniform(n: int, lo: float, hi: float, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """One RandomResizedCrop box per entry, ``(N, 4)`` as ``x1, y1, x2, y2`` in pixels.

    torchvision's rule, batched: up to ``attempts`` draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, the first that fits wins; if none fits, the largest
    centred crop with the ratio clamped into ``ratio``. Sizes are whole pixels, as there.
    """
    n, device = heights.shape[0], heights.device
    h_img, w_img = heights.float()[:, None], widths.float()[:, None]
    area = h_img * w_img
    target = area * _uniform(n * attempts, *scale, device, generator).view(n, attempts)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    aspect = torch.exp(log_r).view(n, attempts)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax of a 0/1 row: the first that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    # Fallback when no draw fits: the whole image, trimmed to the nearest allowed ratio.
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    ok = fits.any(dim=1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    # randint(0, H - h) inclusive, as torchvision; the fallback is centred.
    y = torch.where(ok, torch.floor(torch.rand(n, device=device, generator=generator) * (h_img - h + 1)),
                    torch.div(h_img - h, 2, rounding_mode="floor"))
    x = torch.where(ok, torch.floor(torch.rand(n, device=device, generator=generator) * (w_img - w + 1)),
                    torch.div(w_img - w, 2, rounding_mode="floor"))
    return torch.stack([x, y, x + w, y + h], dim=1)


def crop_resize(images: Tensor, boxes: Tensor, image_index: Tensor, size: int) -> Tensor:
    """``size`` x ``size`` crops of ``images[image_index[k]]`` inside ``boxes[k]``, all in one call.

    ``aligned=True`` makes a box ``[0, W]`` span exactly the W pixels; the adaptive sampling ratio
    averages ``ceil(box / size)`` samples per output pixel and axis, i.e. an antialiased downscale.
    """
    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(images, rois.to(images.dtype), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


class TensorMultiCrop(nn.Module):
    """All views of a uint8 image batch in one pass: lightly's multi-view transforms, batched.

    Args:
        groups: the crop groups, in the order the views come out (the high-resolution ones first).
        spec: what happens to every view after the crop.

    ``forward(images, sizes)`` takes ``(B, 3, S, S)`` uint8 images whose valid region is the
    top-left ``sizes[b] = (h, w)`` (the rest repeats the edge) and returns one normalised
    ``(B, 3, size, size)`` float tensor per view, as the PIL path's collated batch.
    """

    def __init__(self, groups: Sequence[CropGroup], spec: ViewSpec) -> None:
        super().__init__()
        if not groups or any(g.size < 1 or g.count < 1 for g in groups):
            raise ValueError(f"crop groups need a positive size and count, got {list(groups)}")
        for g in groups:
            if not 0 < g.scale[0] <= g.scale[1] <= 1:
                raise ValueError(f"crop scale {g.scale} must satisfy 0 < min <= max <= 1")
        self.groups = list(groups)
        self.spec = spec
        mean = spec.mean if spec.mean is not None else (0.0, 0.0, 0.0)
        std = spec.std if spec.std is not None else (1.0, 1.0, 1.0)
        # Not persistent: they are config, not weights, and must not enter checkpoints or exports.
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_transform_config(cls, cfg: Mapping[str, Any]) -> TensorMultiCrop:
        """Built from a method's ``transform`` config (see :func:`spec_from_transform_config`)."""
        return cls(*spec_from_transform_config(cfg))

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    def forward(self, images: Tensor, sizes: Tensor | None = None,
                generator: torch.Generator | None = None) -> list[Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got {tuple(images.shape)}")
        b, _, s_h, s_w = images.shape
        if sizes is None:
            sizes = torch.tensor([[s_h, s_w]], device=images.device).expand(b, 2)
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        views: list[Tensor] = []
        for g in self.groups:
            image_index = torch.arange(b, device=x.device).repeat(g.count)  # view-major: v * B + b
            hw = sizes[image_index]
            boxes = sample_crop_boxes(hw[:, 0], hw[:, 1], g.scale, g.ratio, generator)
            crops = self.augment(crop_resize(x, boxes, image_index, g.size), generator)
            views.extend(crops.view(g.count, b, 3, g.size, g.size).unbind(0))
        return views

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Flip, colour jitter, grayscale, solarise, blur and normalise ``(N, 3, h, w)`` views in [0, 1]."""
        s, n, dev = self.spec, x.shape[0], x.device

        def coin(p: float) -> Tensor:
            return torch.rand(n, device=dev, generator=generator) < p

        x = torch.where(per_view(coin(s.hf_prob)), x.flip(-1), x)
        if s.vf_prob > 0:
            x = torch.where(per_view(coin(s.vf_prob)), x.flip(-2), x)
        jitter = coin(s.cj_prob)
        factors = [
            _uniform(n, max(0.0, 1 - s.brightness), 1 + s.brightness, dev, generator),
            _uniform(n, max(0.0, 1 - s.contrast), 1 + s.contrast, dev, generator),
            _uniform(n, max(0.0, 1 - s.saturation), 1 + s.saturation, dev, generator),
            _uniform(n, -s.hue, s.hue, dev, generator),
        ]
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        active = (s.brightness > 0, s.contrast > 0, s.saturation > 0, s.hue > 0)
        # ColorJitter draws a fresh order of its four ops per call, i.e. per view here.
        order = torch.rand(n, 4, device=dev, generator=generator).argsort(dim=1)
        for position in range(4):
            for op_id, (op, factor) in enumerate(zip(ops, factors)):
                if active[op_id]:
                    x = apply_where(x, jitter & (order[:, position] == op_id), op, factor)
        if s.gray_prob > 0:
            x = torch.where(per_view(coin(s.gray_prob)), rgb_to_gray(x).expand_as(x), x)
        if s.solarize_prob > 0:
            solar = per_view(coin(s.solarize_prob)) & (x >= SOLARIZE_THRESHOLD)
            x = torch.where(solar, 1 - x, x)
        if s.blur_prob > 0:
            sigma = _uniform(n, *s.sigmas, dev, generator)
            k = gaussian_kernel_size(s.sigmas[1])
            x = apply_where(x, coin(s.blur_prob), lambda v, sg: gaussian_blur(v, sg, k), sigma)
        return (x - self.mean) / self.std
