"""The weak and strong views of an unlabeled image (Unbiased Teacher).

The strong view (:func:`finetune.transforms.strong_augment`, facebookresearch/unbiased-teacher's
``build_strong_augmentation``) is photometric or erasing: the geometry is unchanged, so the teacher's
boxes on the weak view are valid targets on the strong one. Fine-tuning's ``augment.strong_copy``
trains labeled images on it too.

``semi.strong_scale`` adds a geometric step to the strong view (:func:`scale_view`, the scale
jitter of Soft Teacher's strong pipeline): the image zoomed by a random factor and cropped or padded
back to its canvas. The view then carries its map from the weak view's coordinates,
``strong = weak * (sx, sy) + (tx, ty)``, and the teacher's boxes move with it (:func:`map_boxes`).
A label-preserving strong view for data whose classes are told apart by colour (chess), where the
photometric views destroy the class.
"""

from __future__ import annotations

import torch
from torchvision.ops import clip_boxes_to_image

from finetune.detectors.roi_ensemble import flip_boxes  # noqa: F401 (the views' mirror, re-exported)
from finetune.transforms import (
    RandomScaleJitter,
    strong_augment,  # noqa: F401 (the strong view, shared with fine-tuning's strong_copy)
)


def weak_view(image: torch.Tensor, flip: bool) -> torch.Tensor:
    """The weak view: the image, horizontally flipped or not (the detector resizes it)."""
    return image.flip(-1) if flip else image


IDENTITY = (1.0, 1.0, 0.0, 0.0)  # (sx, sy, tx, ty) of a strong view with the weak view's geometry


def scale_view(image: torch.Tensor, jitter: RandomScaleJitter) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (CHW) under fine-tuning's scale jitter (``augment.scale_jitter``'s transform, torch's
    global RNG): zoomed by a factor from its range (antialiased), then cropped (zoom in) or
    zero-padded (zoom out) back to its own size at a random offset.

    Returns:
        The view and its map from the input's coordinates, ``(sx, sy, tx, ty)`` (float32): a point
        ``(x, y)`` of the input is at ``(x * sx + tx, y * sy + ty)`` in the view.
    """
    params = jitter.make_params([image])
    view = jitter.transform(image, params)
    (h, w), (height, width) = params["size"], image.shape[-2:]
    return view, torch.tensor([w / width, h / height, -float(params["left"]), -float(params["top"])])


def map_boxes(boxes: torch.Tensor, labels: torch.Tensor, affine: torch.Tensor,
              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy ``boxes`` of the weak view in a strong view made by :func:`scale_view` (``affine``),
    clipped to its ``size`` (height, width); boxes left under 1 px wide or high (outside the crop)
    are dropped, with their ``labels``, as fine-tuning's scale jitter sanitises labeled boxes."""
    sx, sy, tx, ty = affine.tolist()
    out = boxes.reshape(-1, 4) * boxes.new_tensor([sx, sy, sx, sy]) + boxes.new_tensor([tx, ty, tx, ty])
    out = clip_boxes_to_image(out, size)
    keep = ((out[:, 2] - out[:, 0]) >= 1) & ((out[:, 3] - out[:, 1]) >= 1)
    return out[keep], labels[keep]


def unmap_boxes(boxes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`map_boxes`' affine step (no clipping): strong-view boxes in the weak view."""
    sx, sy, tx, ty = affine.tolist()
    return (boxes.reshape(-1, 4) - boxes.new_tensor([tx, ty, tx, ty])) / boxes.new_tensor([sx, sy, sx, sy])
