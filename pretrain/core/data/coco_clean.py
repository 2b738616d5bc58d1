"""Reading and cleaning real-world COCO annotation files, before any image is decoded.

What is fixed (each counted in a :class:`LoadReport`, never silently):
    * boxes with zero or negative width/height, or non-finite values: dropped;
    * a ``bbox`` that is missing, not 4 numbers, or holds strings: dropped as malformed;
    * boxes reaching outside the image: clipped, dropped if nothing is left;
    * annotations naming an unknown image id or category id, or a category outside the label
      map: dropped;
    * duplicate or missing annotation ids: renumbered (COCOeval needs unique ids);
    * images without boxes stay as negatives.
Images whose files are missing raise an error listing the first few, or are dropped with
``missing="skip"``. Errors, naming the file: not JSON, no ``images`` or ``categories`` list, an
image without id or file_name, duplicate image or category ids, ids that are not integers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from pretrain.core.data.images import image_size
from pretrain.core.data.label_map import LabelMap

log = logging.getLogger(__name__)

Targets = dict[int, dict[str, np.ndarray]]


@dataclass
class LoadReport:
    """What loading an annotation file found and fixed."""

    ann_file: str
    images: int = 0
    images_without_boxes: int = 0
    boxes: int = 0
    crowd: int = 0
    classes: int = 0
    dropped_empty: int = 0
    dropped_nonfinite: int = 0
    dropped_malformed: int = 0
    dropped_outside: int = 0
    clipped: int = 0
    dropped_unknown_image: int = 0
    dropped_unknown_category: int = 0
    dropped_unmapped_category: int = 0
    skipped_missing_files: int = 0
    renumbered_annotation_ids: int = 0
    ignored_categories: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)

    def fixes(self) -> dict[str, int]:
        keys = ("dropped_empty", "dropped_nonfinite", "dropped_malformed", "dropped_outside", "clipped",
                "dropped_unknown_image", "dropped_unknown_category", "dropped_unmapped_category",
                "skipped_missing_files", "renumbered_annotation_ids")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}

    def summary(self) -> str:
        s = (f"{self.ann_file}: {self.images} images ({self.images_without_boxes} without boxes), "
             f"{self.boxes} boxes ({self.crowd} crowd), {self.classes} classes")
        fixes = self.fixes()
        s += "; fixed: " + ", ".join(f"{k}={v}" for k, v in fixes.items()) if fixes else "; nothing to fix"
        if self.ignored_categories:
            s += f"; placeholder categories not used as classes: {self.ignored_categories}"
        return s


def read_coco_json(ann_file: Path) -> dict[str, Any]:
    """The parsed file, with ``annotations`` and ``categories`` defaulting to empty lists.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a COCO detection file.
    """
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"annotation file {ann_file} not found") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file} is not valid JSON: {e}") from e
    # A wrong file is a content error for the user (ValueError), not a programming TypeError.
    has_images = isinstance(data, dict) and isinstance(data.get("images"), list)
    if not has_images:
        raise ValueError(f"{ann_file} is not a COCO detection file: no 'images' list")
    if "categories" not in data:
        raise ValueError(f"{ann_file} has no 'categories' list: a labeled COCO file names its classes "
                         "(add e.g. \"categories\": [{\"id\": 1, \"name\": \"cat\"}])")
    if "annotations" not in data:
        log.warning("%s has no 'annotations' key: every image is read as having no objects", ann_file)
    data.setdefault("annotations", [])
    bad = [key for key in ("annotations", "categories") if not isinstance(data[key], list)]
    if bad:
        raise ValueError(f"{ann_file}: {bad} must be lists")
    return data


def index_images(raw: list[dict], ann_file: Path, image_root: Path) -> dict[int, dict]:
    """``{image id: entry}`` with int id/width/height; a missing size is read from the file header."""
    images: dict[int, dict] = {}
    for im in raw:
        if "id" not in im or "file_name" not in im:
            raise ValueError(f"{ann_file}: image entry without id/file_name: {im}")
        iid = _strict_id(im["id"], "image", ann_file)
        if iid in images:
            raise ValueError(f"{ann_file}: duplicate image id {iid}")
        im = dict(im)
        if not (im.get("width") and im.get("height")):
            # Read the header only; this happens for the few files that omit the size.
            im["width"], im["height"] = image_size(image_root / im["file_name"])
        im["id"], im["width"], im["height"] = iid, int(im["width"]), int(im["height"])
        images[iid] = im
    return images


def index_categories(raw: list[dict], ann_file: Path) -> dict[int, dict]:
    """``{category id: entry}``; every entry needs an id and a name."""
    cats = {}
    for c in raw:
        if "id" not in c or "name" not in c:
            raise ValueError(f"{ann_file}: category without id/name: {c}")
        cid = _strict_id(c["id"], "category", ann_file)
        if cid in cats:
            raise ValueError(f"{ann_file}: duplicate category id {cid}")
        cats[cid] = c
    return cats


def _strict_id(value: Any, what: str, ann_file: Path) -> int:
    """An id that is an int (or an integral float, as some writers emit); anything else is an error:
    int("3") or int(1.5) would silently match the wrong entries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{ann_file}: {what} id {value!r} is not an integer; COCO ids are ints, fix the file")
    return int(value)


def drop_missing_files(images: dict[int, dict], image_root: Path, ann_file: Path, missing: str,
                       report: LoadReport) -> tuple[dict[int, dict], set[int]]:
    """The images whose files exist, and the ids of those left out.

    Raises:
        FileNotFoundError: files are missing and ``missing="error"``; lists the first few.
    """
    absent = [iid for iid, im in images.items() if not os.path.exists(image_root / im["file_name"])]
    if not absent:
        return images, set()
    first = ", ".join(str(image_root / images[i]["file_name"]) for i in absent[:5])
    msg = (f"{ann_file}: {len(absent)} of {len(images)} image files are missing "
           f"under image_root={image_root} (first: {first})")
    if missing == "error":
        raise FileNotFoundError(msg + "; fix image_root / file_name, or pass missing='skip' to drop them")
    log.warning("%s; dropping those images and their annotations", msg)
    report.skipped_missing_files = len(absent)
    skipped = set(absent)
    return {iid: im for iid, im in images.items() if iid not in skipped}, skipped


def _as_int(value: Any) -> int | None:
    """An annotation's image or category id: an int, an integral float or a string of digits ("7",
    as some exporters write); None (dropped and counted) otherwise: 1.5 must not match image 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def clean_annotations(images: dict[int, dict], anns: list[dict], cats: dict[int, dict], label_map: LabelMap,
                      report: LoadReport, skipped_ids: Collection[int] = ()) -> tuple[Targets, list[dict]]:
    """Drop, clip and count bad annotations (see the module docstring).

    Args:
        images: ``{image id: entry}`` from :func:`index_images` (widths and heights are ints).
        anns: the file's annotations (xywh ``bbox``).
        cats: ``{category id: entry}`` from :func:`index_categories`.
        label_map: the classes; annotations of other categories are dropped and counted.
        report: filled with the counts, per-class box numbers and box totals.
        skipped_ids: images dropped for missing files, whose annotations go without a count.

    Returns:
        Per image id, numpy ``boxes`` (xyxy), ``labels``, ``area`` and ``iscrowd``; and the cleaned
        COCO annotation entries (category ids, unique annotation ids) for evaluation.
    """
    cat_to_label = label_map.cat_id_to_label
    per_image: dict[int, list[tuple[list[float], int, float, int]]] = {iid: [] for iid in images}
    clean_anns: list[dict] = []
    next_id = max((int(a["id"]) for a in anns if isinstance(a.get("id"), (int, float))), default=0) + 1
    used_ann_ids: set[int] = set()
    for a in anns:
        iid = _as_int(a.get("image_id"))
        if iid not in per_image:
            if iid not in skipped_ids:  # annotations of skipped missing files go quietly
                report.dropped_unknown_image += 1
            continue
        cid = _as_int(a.get("category_id"))
        if cid not in cats and cid not in cat_to_label:
            report.dropped_unknown_category += 1
            continue
        if cid not in cat_to_label:
            report.dropped_unmapped_category += 1
            continue
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            report.dropped_malformed += 1  # missing, wrong length, strings
            continue
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.dropped_nonfinite += 1
            continue
        if w <= 0 or h <= 0:
            report.dropped_empty += 1
            continue
        W, H = images[iid]["width"], images[iid]["height"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        area = float(a["area"]) if isinstance(a.get("area"), (int, float)) and a["area"] > 0 else w * h
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            if x2 <= x1 or y2 <= y1:
                report.dropped_outside += 1
                continue
            report.clipped += 1
            area *= (x2 - x1) * (y2 - y1) / (w * h)
        crowd = int(bool(a.get("iscrowd", 0)))
        per_image[iid].append(([x1, y1, x2, y2], cat_to_label[cid], area, crowd))
        ann_id = int(a["id"]) if isinstance(a.get("id"), (int, float)) else -1
        if ann_id in used_ann_ids or ann_id < 0:
            # pycocotools indexes annotations by id: a duplicate would replace a box in evaluation.
            report.renumbered_annotation_ids += 1
            ann_id, next_id = next_id, next_id + 1
        used_ann_ids.add(ann_id)
        clean = {k: v for k, v in a.items() if k not in ("bbox", "area", "iscrowd", "id", "image_id")}
        clean.update(id=ann_id, image_id=iid, category_id=cid, bbox=[x1, y1, x2 - x1, y2 - y1],
                     area=area, iscrowd=crowd)
        clean_anns.append(clean)

    targets: Targets = {}
    per_class: Counter[int] = Counter()
    for iid, rows in per_image.items():
        targets[iid] = {
            "boxes": np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4),
            "labels": np.array([r[1] for r in rows], dtype=np.int64),
            "area": np.array([r[2] for r in rows], dtype=np.float32),
            "iscrowd": np.array([r[3] for r in rows], dtype=np.int64),
        }
        report.boxes += len(rows)
        report.crowd += sum(r[3] for r in rows)
        report.images_without_boxes += not any(r[3] == 0 for r in rows)
        per_class.update(r[1] for r in rows if r[3] == 0)
    report.per_class = {name: per_class[lbl] for lbl, name in enumerate(label_map.class_names, 1)}
    return targets, clean_anns


def ground_truth(images: dict[int, dict], clean_anns: list[dict], cats: dict[int, dict],
                 label_map: LabelMap) -> COCO:
    """The evaluation ground truth: cleaned boxes (crowd kept) over exactly the K classes, so
    COCOeval averages over the classes the detector predicts and nothing else."""
    cat_entries = []
    for lbl in range(1, label_map.num_classes + 1):
        cid = label_map.label_to_cat_id[lbl]
        entry = dict(cats.get(cid, {}))
        entry.update(id=cid, name=label_map.class_names[lbl - 1])
        cat_entries.append(entry)
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": clean_anns, "categories": cat_entries}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco
