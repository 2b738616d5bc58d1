"""COCO-JSON detection dataset with validation of real-world annotation files.

Which categories become classes: see :mod:`pretrain.core.data.label_map` (1..K in ascending category
id, a placeholder supercategory left out). Validation and test sets must use the training set's
numbering: pass ``label_map=train_ds.label_map`` (or the saved ``label_map.json``); annotations of
categories outside that map are then left out and counted.

What is fixed at load time: see :mod:`pretrain.core.data.coco_clean` (bad boxes dropped or clipped,
unknown ids dropped, all counted and logged, never silently). Crowd boxes (``iscrowd=1``) are kept
in ``.coco`` for evaluation (COCO ignores detections matched to them) but left out of training
targets when ``train=True``. The JSON's width/height are checked against the decoded image when it
is read; on a mismatch the image wins and the boxes are rescaled, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from pretrain.core.data.coco_clean import (
    LoadReport,
    clean_annotations,
    drop_missing_files,
    ground_truth,
    index_categories,
    index_images,
    read_coco_json,
)
from pretrain.core.data.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from pretrain.core.data.label_map import LabelMap, as_label_map, load_label_map, save_label_map, select_classes

__all__ = ["CocoDetection", "LabelMap", "LoadReport", "Target", "collate_fn", "load_label_map",
           "save_label_map", "select_classes"]

log = logging.getLogger(__name__)

Target = dict[str, Any]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-JSON detection set yielding ``(tv_tensors.Image, target)`` for torchvision detectors.

    Args:
        ann_file: COCO JSON with ``images``, ``annotations`` (xywh ``bbox``) and ``categories``.
        image_root: folder that image ``file_name``s are relative to; default: the JSON's folder.
        transforms: ``transforms(image, target) -> (image, target)``, applied last
            (torchvision.transforms.v2 compatible).
        train: leave crowd boxes out of the targets (they stay in ``.coco``).
        max_pixels: refuse images larger than this with a clear error.
        label_map: the label numbering to use (a :class:`LabelMap`, ``{label: category_id}`` or a
            ``label_map.json`` path); default: derived from this file (see module docstring).
        missing: ``"error"`` (default) raises when image files are missing; ``"skip"`` drops those
            images with a warning.
        check_files: check at init that every image file exists.
        bad_images: ``"error"`` raises on an image that cannot be decoded when it is read (what
            evaluation needs: a left-out image would change the metrics); ``"skip"`` (training)
            returns the next readable image in its place, logs the bad file once and names it in
            the substitute's target under ``"skipped"``, so that the training loop counts it in
            the main process whatever the number of DataLoader workers.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None = None,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        train: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        label_map: LabelMap | Mapping[int, int] | str | os.PathLike[str] | None = None,
        missing: str = "error",
        check_files: bool = True,
        bad_images: str = "error",
    ) -> None:
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.bad_images = bad_images
        self.skipped: dict[str, str] = {}  # this process's skipped files -> reason
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent
        self.transforms = transforms
        self.train = train
        self.max_pixels = max_pixels
        self._warned_size: set[int] = set()

        data = read_coco_json(self.ann_file)
        report = LoadReport(str(self.ann_file))
        images = index_images(data["images"], self.ann_file, self.image_root)
        cats = index_categories(data["categories"], self.ann_file)

        if label_map is None:
            self.label_map = select_classes(list(cats.values()), data["annotations"])
            report.ignored_categories = sorted(
                str(c["name"]) for cid, c in cats.items() if cid not in self.label_map.cat_id_to_label)
        else:
            self.label_map = as_label_map(label_map, cats)
            for lbl, cid in self.label_map.label_to_cat_id.items():
                name = self.label_map.class_names[lbl - 1]
                if cid in cats and cats[cid]["name"] != name:
                    log.warning("%s: category id %d is %r here but %r in the label map; using the label map",
                                self.ann_file, cid, cats[cid]["name"], name)

        skipped: set[int] = set()
        if check_files:
            images, skipped = drop_missing_files(images, self.image_root, self.ann_file, missing, report)
        self._targets, clean = clean_annotations(images, data["annotations"], cats, self.label_map, report,
                                                 skipped)
        self.ids: list[int] = list(images)
        self._images = images
        self.info: dict[str, Any] = dict(data.get("info") or {})  # the splitter records its fraction and seed here
        self.coco = ground_truth(images, clean, cats, self.label_map)
        report.images = len(self.ids)
        report.classes = self.num_classes
        self.report = report
        log.info("%s", report.summary())
        for kind, n in report.fixes().items():
            log.warning("%s: %s: %d", self.ann_file, kind, n)

    # ------------------------------------------------------------------------------- properties
    @property
    def label_to_cat_id(self) -> dict[int, int]:
        return dict(self.label_map.label_to_cat_id)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return self.label_map.cat_id_to_label

    @property
    def cat_ids(self) -> list[int]:
        return sorted(self.label_map.label_to_cat_id.values())

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.class_names)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    def image_info(self, index: int) -> dict:
        """The COCO ``images`` entry of item ``index``."""
        return self._images[self.ids[index]]

    def image_path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.image_root / self._images[self.ids[index]]["file_name"]

    def annotations(self, index: int, include_crowd: bool | None = None) -> dict[str, np.ndarray]:
        """The cleaned numpy boxes (xyxy, JSON pixel frame), labels, area, iscrowd of item ``index``."""
        t = self._targets[self.ids[index]]
        if include_crowd is None:
            include_crowd = not self.train
        if include_crowd:
            return t
        keep = t["iscrowd"] == 0
        return {k: v[keep] for k, v in t.items()}

    # ---------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        """Load item ``index`` as RGB, oriented as the annotations expect (see :meth:`__getitem__`)."""
        return self._load(index)[0]

    def _load(self, index: int) -> tuple[Image.Image, tuple[float, float]]:
        info = self._images[self.ids[index]]
        path = self.image_root / info["file_name"]
        img = load_rgb(path, max_pixels=self.max_pixels)
        W, H = info["width"], info["height"]
        if img.size == (W, H):
            return img, (1.0, 1.0)
        iid = self.ids[index]
        # Annotation tools disagree on EXIF: if the stored (unrotated) pixels match the JSON's size,
        # the boxes were drawn on those pixels.
        raw = load_rgb(path, max_pixels=self.max_pixels, exif_transpose=False)
        if raw.size == (W, H) and img.size == (H, W):
            if iid not in self._warned_size:
                self._warned_size.add(iid)
                log.warning("%s: JSON size %dx%d matches the image without its EXIF rotation; "
                            "using the unrotated pixels", path, W, H)
            return raw, (1.0, 1.0)
        if iid not in self._warned_size:
            self._warned_size.add(iid)
            log.warning("%s: JSON says %dx%d but the image is %dx%d; trusting the image and rescaling "
                        "its boxes", path, W, H, img.width, img.height)
        return img, (img.width / W, img.height / H)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target]:
        if self.bad_images == "error":
            return self._item(index, [])
        n = len(self.ids)
        passed: list[str] = []
        # Walk forward to the next readable image: one bad file among thousands never ends a run.
        for k in range(n):
            i = (index + k) % n
            try:
                return self._item(i, passed)
            except ImageError as e:
                reason = str(e)
                path = str(self.image_root / self._images[self.ids[i]]["file_name"])
                if path not in self.skipped:
                    self.skipped[path] = reason
                    log.warning("skipping a labeled image (%d in this process so far): %s", len(self.skipped),
                                reason)
                passed.append(reason)
        raise ImageError(f"none of the {n} images of {self.ann_file} is readable (e.g. {passed[0]})")

    def _item(self, index: int, skipped: list[str]) -> tuple[tv_tensors.Image, Target]:
        try:
            img, (sx, sy) = self._load(index)
        except ImageError as e:
            raise ImageError(f"{e} (image id {self.ids[index]} of {self.ann_file})") from e
        t = self.annotations(index, include_crowd=not self.train)
        boxes = t["boxes"]
        area = t["area"]
        if (sx, sy) != (1.0, 1.0):
            boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
            area = area * np.float32(sx * sy)
        arr = np.asarray(img, dtype=np.uint8)
        image = tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(np.ascontiguousarray(boxes)), format="XYXY",
                                              canvas_size=(img.height, img.width)),
            "labels": torch.from_numpy(t["labels"].copy()),
            "image_id": int(self.ids[index]),
            "area": torch.from_numpy(np.asarray(area, dtype=np.float32).copy()),
            "iscrowd": torch.from_numpy(t["iscrowd"].copy()),
        }
        if skipped:
            target["skipped"] = list(skipped)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """Batch variable-size detection samples as lists, the input torchvision detectors take."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
