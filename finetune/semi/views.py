"""The weak and strong views of an unlabeled image (Unbiased Teacher).

The strong view (:func:`finetune.transforms.strong_augment`, facebookresearch/unbiased-teacher's
``build_strong_augmentation``) is photometric or erasing: the geometry is unchanged, so the teacher's
boxes on the weak view are valid targets on the strong one. Fine-tuning's ``augment.strong_copy``
trains labeled images on it too.
"""

from __future__ import annotations

import torch

from finetune.transforms import strong_augment  # noqa: F401 (the strong view, shared with fine-tuning's strong_copy)


def weak_view(image: torch.Tensor, flip: bool) -> torch.Tensor:
    """The weak view: the image, horizontally flipped or not (the detector resizes it)."""
    return image.flip(-1) if flip else image


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy boxes mirrored in an image of ``width``: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out
