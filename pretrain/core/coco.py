"""COCO-JSON detection dataset with validation of real-world annotation files.

Which categories become classes:
    A category is a class if at least one annotation in the file uses it, or if it is not a pure
    placeholder. A placeholder is a category with no annotations whose name is the
    ``supercategory`` of another category (Roboflow exports carry one: chess's id 0 "pieces").
    So every category of a COCO-style file stays a class (the 80 of COCO remain 80 even in a
    small subset), a one-box stray category stays a class, and only the placeholder goes.
    Classes are numbered 1..K in ascending category id; 0 is the detectors' background.
    Validation and test sets must use the training set's numbering: pass
    ``label_map=train_ds.label_map`` (or the saved ``label_map.json``); annotations of categories
    outside that map are then left out and counted.

What is fixed at load time (each counted and logged, never silently):
    * boxes with zero or negative width/height, or non-finite values: dropped;
    * boxes reaching outside the image: clipped, dropped if nothing is left;
    * annotations naming an unknown image id or category id: dropped;
    * crowd boxes (``iscrowd=1``): kept in ``.coco`` for evaluation (COCO ignores detections
      matched to them) but left out of training targets when ``train=True``;
    * images without boxes stay as negatives.
Images whose files are missing raise an error listing the first few (or are dropped with a
warning with ``missing="skip"``). The JSON's width/height are checked against the decoded image
when it is read; on a mismatch the image wins and the boxes are rescaled, with a warning.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from pretrain.core.images import DEFAULT_MAX_PIXELS, ImageError, image_size, load_rgb

log = logging.getLogger(__name__)

LABEL_MAP_VERSION = 1
Target = dict[str, Any]


@dataclass(frozen=True)
class LabelMap:
    """Contiguous detector labels 1..K and the COCO category ids / names they stand for."""

    label_to_cat_id: dict[int, int]
    class_names: list[str]

    def __post_init__(self) -> None:
        labels = sorted(self.label_to_cat_id)
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"labels must be 1..K without gaps, got {labels}")
        if len(self.class_names) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(self.class_names)} class names")
        if len(set(self.label_to_cat_id.values())) != len(labels):
            raise ValueError("two labels map to the same category id")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: lbl for lbl, c in self.label_to_cat_id.items()}

    @property
    def cat_ids(self) -> list[int]:
        return [self.label_to_cat_id[lbl] for lbl in range(1, self.num_classes + 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LABEL_MAP_VERSION,
            "num_classes": self.num_classes,
            "classes": [
                {"label": lbl, "category_id": self.label_to_cat_id[lbl], "name": self.class_names[lbl - 1]}
                for lbl in range(1, self.num_classes + 1)
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelMap:
        try:
            rows = sorted(data["classes"], key=lambda r: int(r["label"]))
            return cls(
                {int(r["label"]): int(r["category_id"]) for r in rows},
                [str(r["name"]) for r in rows],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"not a label map ({e}); expected {{'classes': [{{label, category_id, name}}]}}") from e


def save_label_map(path: str | os.PathLike[str], ds: CocoDetection | LabelMap) -> Path:
    """Write ``label_map.json`` (labels, category ids, names) for a dataset or label map.

    Args:
        path: the file to write, or a directory to write ``label_map.json`` into.
        ds: a :class:`CocoDetection` or a :class:`LabelMap`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "label_map.json"
    lm = ds if isinstance(ds, LabelMap) else ds.label_map
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lm.to_json(), indent=2) + "\n")
    return path


def load_label_map(path: str | os.PathLike[str]) -> LabelMap:
    """Read a ``label_map.json`` written by :func:`save_label_map` (file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "label_map.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"label map {path} not found") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"label map {path} is not valid JSON: {e}") from e
    try:
        return LabelMap.from_json(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _as_label_map(label_map: LabelMap | Mapping[int, int] | str | os.PathLike[str],
                  cats: dict[int, dict]) -> LabelMap:
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, (str, os.PathLike)):
        return load_label_map(label_map)
    mapping = {int(k): int(v) for k, v in label_map.items()}
    names = [str(cats.get(mapping[lbl], {}).get("name", f"category_{mapping[lbl]}"))
             for lbl in sorted(mapping)]
    return LabelMap(mapping, names)


def select_classes(categories: list[dict], annotations: list[dict]) -> LabelMap:
    """Apply the class rule of this module to a COCO file's categories and annotations."""
    used = Counter(a.get("category_id") for a in annotations)
    supercats = {c.get("supercategory") for c in categories}
    chosen = []
    for c in sorted(categories, key=lambda c: int(c["id"])):
        placeholder = used[c["id"]] == 0 and c["name"] in supercats and any(
            o["name"] != c["name"] and o.get("supercategory") == c["name"] for o in categories
        )
        if not placeholder:
            chosen.append(c)
    return LabelMap({i + 1: int(c["id"]) for i, c in enumerate(chosen)}, [str(c["name"]) for c in chosen])


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
    dropped_outside: int = 0
    clipped: int = 0
    dropped_unknown_image: int = 0
    dropped_unknown_category: int = 0
    dropped_unmapped_category: int = 0
    skipped_missing_files: int = 0
    ignored_categories: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)

    def fixes(self) -> dict[str, int]:
        keys = ("dropped_empty", "dropped_nonfinite", "dropped_outside", "clipped", "dropped_unknown_image",
                "dropped_unknown_category", "dropped_unmapped_category", "skipped_missing_files")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}

    def summary(self) -> str:
        s = (f"{self.ann_file}: {self.images} images ({self.images_without_boxes} without boxes), "
             f"{self.boxes} boxes ({self.crowd} crowd), {self.classes} classes")
        fixes = self.fixes()
        s += "; fixed: " + ", ".join(f"{k}={v}" for k, v in fixes.items()) if fixes else "; nothing to fix"
        if self.ignored_categories:
            s += f"; placeholder categories not used as classes: {self.ignored_categories}"
        return s


def _read_json(ann_file: Path) -> dict[str, Any]:
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
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    bad = [key for key in ("annotations", "categories") if not isinstance(data[key], list)]
    if bad:
        raise ValueError(f"{ann_file}: {bad} must be lists")
    return data


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
    ) -> None:
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent
        self.transforms = transforms
        self.train = train
        self.max_pixels = max_pixels
        self._warned_size: set[int] = set()
        self._skipped_ids: set[int] = set()

        data = _read_json(self.ann_file)
        report = LoadReport(str(self.ann_file))
        images = self._validate_images(data["images"])
        cats = {}
        for c in data["categories"]:
            if "id" not in c or "name" not in c:
                raise ValueError(f"{self.ann_file}: category without id/name: {c}")
            cats[int(c["id"])] = c

        if label_map is None:
            self.label_map = select_classes(list(cats.values()), data["annotations"])
            report.ignored_categories = sorted(
                str(c["name"]) for cid, c in cats.items() if cid not in self.label_map.cat_id_to_label)
        else:
            self.label_map = _as_label_map(label_map, cats)
            for lbl, cid in self.label_map.label_to_cat_id.items():
                name = self.label_map.class_names[lbl - 1]
                if cid in cats and cats[cid]["name"] != name:
                    log.warning("%s: category id %d is %r here but %r in the label map; using the label map",
                                self.ann_file, cid, cats[cid]["name"], name)

        if check_files:
            images = self._check_files(images, report, missing)

        self._build_targets(images, data["annotations"], cats, report)
        report.images = len(self.ids)
        report.classes = self.num_classes
        self.report = report
        log.info("%s", report.summary())
        for kind, n in report.fixes().items():
            log.warning("%s: %s: %d", self.ann_file, kind, n)

    # ----------------------------------------------------------------------------------- loading
    def _validate_images(self, raw: list[dict]) -> dict[int, dict]:
        images: dict[int, dict] = {}
        for im in raw:
            if "id" not in im or "file_name" not in im:
                raise ValueError(f"{self.ann_file}: image entry without id/file_name: {im}")
            iid = int(im["id"])
            if iid in images:
                raise ValueError(f"{self.ann_file}: duplicate image id {iid}")
            im = dict(im)
            if not (im.get("width") and im.get("height")):
                # Read the header only; this happens for the few files that omit the size.
                im["width"], im["height"] = image_size(self.image_root / im["file_name"])
            im["id"], im["width"], im["height"] = iid, int(im["width"]), int(im["height"])
            images[iid] = im
        return images

    def _check_files(self, images: dict[int, dict], report: LoadReport, missing: str) -> dict[int, dict]:
        absent = [iid for iid, im in images.items() if not os.path.exists(self.image_root / im["file_name"])]
        if not absent:
            return images
        first = ", ".join(str(self.image_root / images[i]["file_name"]) for i in absent[:5])
        msg = (f"{self.ann_file}: {len(absent)} of {len(images)} image files are missing "
               f"under image_root={self.image_root} (first: {first})")
        if missing == "error":
            raise FileNotFoundError(msg + "; fix image_root / file_name, or pass missing='skip' to drop them")
        log.warning("%s; dropping those images and their annotations", msg)
        report.skipped_missing_files = len(absent)
        self._skipped_ids = set(absent)
        return {iid: im for iid, im in images.items() if iid not in self._skipped_ids}

    def _build_targets(self, images: dict[int, dict], anns: list[dict], cats: dict[int, dict],
                       report: LoadReport) -> None:
        cat_to_label = self.label_map.cat_id_to_label
        per_image: dict[int, list[tuple[list[float], int, float, int]]] = {iid: [] for iid in images}
        clean_anns: list[dict] = []
        next_id = max((int(a["id"]) for a in anns if isinstance(a.get("id"), (int, float))), default=0) + 1
        used_ann_ids: set[int] = set()
        for a in anns:
            try:
                iid = int(a["image_id"])
            except (KeyError, TypeError, ValueError):
                iid = None
            if iid not in per_image:
                if iid not in self._skipped_ids:  # annotations of skipped missing files go quietly
                    report.dropped_unknown_image += 1
                continue
            try:
                cid = int(a["category_id"])
            except (KeyError, TypeError, ValueError):
                cid = None
            if cid not in cats and cid not in cat_to_label:
                report.dropped_unknown_category += 1
                continue
            if cid not in cat_to_label:
                report.dropped_unmapped_category += 1
                continue
            bbox = a.get("bbox")
            try:
                x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
            except (TypeError, ValueError):
                report.dropped_nonfinite += 1
                continue
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
                ann_id, next_id = next_id, next_id + 1
            used_ann_ids.add(ann_id)
            clean = {k: v for k, v in a.items() if k not in ("bbox", "area", "iscrowd", "id", "image_id")}
            clean.update(id=ann_id, image_id=iid, category_id=cid, bbox=[x1, y1, x2 - x1, y2 - y1],
                         area=area, iscrowd=crowd)
            clean_anns.append(clean)

        self.ids: list[int] = list(images)
        self._images = images
        self._targets: dict[int, dict[str, np.ndarray]] = {}
        per_class: Counter[int] = Counter()
        for iid, rows in per_image.items():
            boxes = np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4)
            labels = np.array([r[1] for r in rows], dtype=np.int64)
            self._targets[iid] = {
                "boxes": boxes,
                "labels": labels,
                "area": np.array([r[2] for r in rows], dtype=np.float32),
                "iscrowd": np.array([r[3] for r in rows], dtype=np.int64),
            }
            report.boxes += len(rows)
            report.crowd += sum(r[3] for r in rows)
            report.images_without_boxes += not any(r[3] == 0 for r in rows)
            per_class.update(r[1] for r in rows if r[3] == 0)
        report.per_class = {name: per_class[lbl] for lbl, name in enumerate(self.class_names, 1)}

        # The evaluation ground truth: cleaned boxes (crowd kept) over exactly the K classes, so
        # COCOeval averages over the classes the detector predicts and nothing else.
        cat_entries = []
        for lbl in range(1, self.num_classes + 1):
            cid = self.label_map.label_to_cat_id[lbl]
            entry = dict(cats.get(cid, {}))
            entry.update(id=cid, name=self.label_map.class_names[lbl - 1])
            cat_entries.append(entry)
        dataset = {"images": list(images.values()), "annotations": clean_anns, "categories": cat_entries}
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

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
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """Batch variable-size detection samples as lists, the input torchvision detectors take."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
