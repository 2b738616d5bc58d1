"""Unlabeled images for teacher-student training: a weak and a strong view of each, plus hidden ground truth.

``semi.unlabeled`` is a folder of images, a COCO JSON whose annotations are never trained on, or the
splitter's ``unlabeled.json``. When the JSON carries annotations (the splitter keeps them as
hidden ground truth, flagged ``info.hidden_ground_truth``), they are returned beside the images
for the pseudo-label health figures only (precision and recall of the pseudo-boxes).

The weak view is the image, horizontally flipped with probability 1/2 (the detector's own
transform does the resize); the strong view is the weak one under photometric and erasing
augmentation (:func:`finetune.semi.views.strong_augment`), so the teacher's boxes on the weak view
are valid targets on the strong view as they are, unless ``semi.strong_scale`` also zooms it
(:func:`finetune.semi.views.scale_view`): then ``strong_affine`` is the map the boxes move by.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from finetune.semi.views import IDENTITY, flip_boxes, scale_view, strong_augment, weak_view
from finetune.transforms import STRONG_VIEWS, RandomScaleJitter
from pretrain.core.data.images import DEFAULT_MAX_PIXELS
from pretrain.core.data.unlabeled import UnlabeledImages

log = logging.getLogger(__name__)


class UnlabeledDetectionImages(torch.utils.data.Dataset):
    """Yields ``{"weak", "strong", "strong_affine", "flipped", "index", "ground_truth"}`` per unlabeled image.

    Args:
        source: folder (recursive), COCO JSON, or the splitter's unlabeled.json.
        cat_id_to_label: the labeled set's category id -> label 1..K, to read hidden ground truth;
            annotations of other categories are left out of the health figures (counted).
        strong: build the strong view (False: ``strong`` is the weak view itself, for modes that
            perturb on their own, e.g. consistency).
        max_pixels: images with more pixels are skipped with a warning.
        image_root: for a COCO JSON, the folder its file_names are relative to (default: its folder).
        working_size: the detector's ``(min_size, max_size)``: an image larger than the detector
            will see it is downscaled to that size (short side ``min_size``, long side at most
            ``max_size``, with the detector's own bilinear resize) before its views are made, and its
            hidden ground truth with it. The strong view's blur and erasing then act at the scale the
            detector sees, and a 2048 px photograph is not augmented at full size for a 480 px
            detector (each step paid ~20x the pixels). None: the images as they are.
        strong_view: which strong view (:data:`finetune.transforms.STRONG_VIEWS`): ``unbiased_teacher``,
            ``soft_teacher`` or ``erase``.
        strong_scale: ``(min, max)`` zoom of the strong view after its photometric step
            (:func:`finetune.semi.views.scale_view`); ``strong_affine`` is then its map from the weak
            view's coordinates, else the identity ``(1, 1, 0, 0)``. None: the weak view's geometry.

    Unreadable images are skipped (logged, counted in ``.skipped``) and the next readable one is
    returned in their place, so one bad file never stops a long run.
    """

    def __init__(
        self,
        source: str | Path,
        cat_id_to_label: Mapping[int, int] | None = None,
        strong: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_root: str | Path | None = None,
        working_size: tuple[int, int] | None = None,
        strong_view: str = "unbiased_teacher",
        strong_scale: tuple[float, float] | None = None,
    ) -> None:
        self.images = UnlabeledImages(source, transform=None, max_pixels=max_pixels, image_root=image_root)
        self.strong = strong
        if strong_view not in STRONG_VIEWS:
            raise ValueError(f"semi.strong_view={strong_view!r} must be one of {sorted(STRONG_VIEWS)}")
        self.strong_view = strong_view
        self.scale_jitter = (None if strong_scale is None
                             else RandomScaleJitter((float(strong_scale[0]), float(strong_scale[1]))))
        self.working_size = working_size
        self.ground_truth: list[dict[str, np.ndarray]] | None = None
        self.unknown_categories = 0
        src = Path(source)
        if src.is_file():
            self.ground_truth = _hidden_ground_truth(src, dict(cat_id_to_label or {}), self)
        self.hidden_ground_truth = self.ground_truth is not None

    @property
    def skipped(self) -> dict[str, str]:
        return self.images.skipped

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == -1:  # a burn-in step's sample (plan.BurnInSampler): nothing is read
            return {"skipped": True}
        n = len(self.images)
        for k in range(n):
            i = (index + k) % n
            img = self.images.load(i)
            if img is not None:
                return self._views(i, img)
        raise RuntimeError(f"none of the {n} unlabeled images from {self.images.source} is readable")

    def _views(self, index: int, img: Any) -> dict[str, Any]:
        arr = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        scale = working_scale(image.shape[-1], image.shape[-2], self.working_size)
        scale_xy = (1.0, 1.0)
        if scale < 1.0:  # as the detector's transform resizes (bilinear, no antialiasing): the same pixels
            h, w = image.shape[-2:]
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                  align_corners=False)[0]
            scale_xy = (image.shape[-1] / w, image.shape[-2] / h)
        flipped = bool(torch.rand(()) < 0.5)
        weak = weak_view(image, flipped)
        strong = strong_augment(weak, view=self.strong_view) if self.strong else weak
        affine = torch.tensor(IDENTITY)
        if self.strong and self.scale_jitter is not None:
            strong, affine = scale_view(strong, self.scale_jitter)
        gt = None
        if self.ground_truth is not None:
            g = self.ground_truth[index]
            boxes = torch.from_numpy(g["boxes"]) * torch.tensor([*scale_xy, *scale_xy])
            if flipped:
                boxes = flip_boxes(boxes, image.shape[-1])
            gt = {"boxes": boxes, "labels": torch.from_numpy(g["labels"])}
        return {"weak": weak, "strong": strong, "strong_affine": affine, "flipped": flipped, "index": index,
                "ground_truth": gt}


def working_scale(width: int, height: int, working_size: tuple[int, int] | None) -> float:
    """The factor torchvision's detection transform resizes a ``width`` x ``height`` image by: short
    side to ``min_size``, long side at most ``max_size``. 1.0 without a working size."""
    if working_size is None:
        return 1.0
    min_size, max_size = working_size
    return min(float(min_size) / min(width, height), float(max_size) / max(width, height))


def detector_working_size(detector_cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(min_size, max_size)`` of the detector config (the largest of a multi-scale ``min_size``)."""
    lo, hi = detector_cfg.get("min_size"), detector_cfg.get("max_size")
    if lo is None or hi is None:
        return None
    if not isinstance(lo, (int, float)):  # a list (multi-scale training)
        lo = max(lo)
    return int(lo), int(hi)


def collate_unlabeled(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists per key (images differ in size; torchvision detectors take lists)."""
    return {k: [b[k] for b in batch] for k in batch[0]} if batch else {}


def _hidden_ground_truth(ann_file: Path, cat_id_to_label: dict[int, int],
                         owner: UnlabeledDetectionImages) -> list[dict[str, np.ndarray]] | None:
    """Per image (in the JSON's image order, as UnlabeledImages lists them): xyxy boxes and labels."""
    data = json.loads(ann_file.read_text())
    anns = data.get("annotations")
    if not anns:
        return None
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(a.get("image_id"), []).append(a)
    out: list[dict[str, np.ndarray]] = []
    unknown = 0
    for im in data["images"]:
        boxes, labels = [], []
        for a in by_image.get(im.get("id"), []):
            if a.get("iscrowd", 0):
                continue
            label = cat_id_to_label.get(a.get("category_id"))  # type: ignore[arg-type]
            bbox = a.get("bbox")
            if label is None or not isinstance(bbox, list) or len(bbox) != 4:
                unknown += 1
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        out.append({"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64)})
    owner.unknown_categories = unknown
    flagged = bool((data.get("info") or {}).get("hidden_ground_truth"))
    log.info("%s: annotations of %d images kept as hidden ground truth for the pseudo-label health figures%s%s",
             ann_file, len(out), "" if flagged else " (never trained on)",
             f"; {unknown} annotations of categories the labeled set lacks are left out" if unknown else "")
    return out


def unlabeled_source(cfg: DictConfig) -> Path:
    """``semi.unlabeled`` as an existing path, with a clear error otherwise."""
    src = cfg.semi.get("unlabeled")
    if not src:
        raise ValueError(
            f"semi={cfg.semi.mode} needs unlabeled images: semi.unlabeled=PATH (a folder of images, a COCO JSON "
            "whose annotations are ignored, or the splitter's unlabeled.json)"
        )
    path = Path(str(src)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"semi.unlabeled={path} does not exist")
    return path
