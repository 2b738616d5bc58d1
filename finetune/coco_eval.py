"""COCO bbox evaluation with pycocotools: the 12-number summary and per-class AP.

The numbers are pycocotools' own (``COCOeval.evaluate/accumulate``, then summarize's averages
over the accumulated arrays at any ``max_dets``); this module only feeds it, handles the cases
it crashes on (no detections at all) and reads per-class AP out of ``eval["precision"]`` the way
Detectron2 does. Writing and printing results is :mod:`finetune.coco_results`.
``backend="faster_coco_eval"`` swaps in faster-coco-eval's C++ evaluator, whose numbers
are tested to be identical on real predictions.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.coco_results import COCO_STATS, format_table

BACKENDS = ("pycocotools", "faster_coco_eval")


@dataclass
class CocoEvalResult:
    """Outcome of one bbox evaluation.

    ``stats`` holds the 12 COCO numbers in [0, 1]; -1 means "no ground truth for this
    slice" (pycocotools' convention, e.g. APs on a set without small objects).
    ``per_class_ap`` maps class name to AP@[.5:.95] (area all, ``max_dets`` detections), -1 for a
    class without ground truth among the evaluated images.
    """

    stats: dict[str, float]
    per_class_ap: dict[str, float]
    ann_file: str | None = None
    num_images: int = 0
    num_detections: int = 0
    backend: str = "pycocotools"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ann_file": self.ann_file,
            "coco": dict(self.stats),
            "per_class_ap": dict(self.per_class_ap),
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "eval_backend": self.backend,
        }

    def table(self) -> str:
        """The COCO summary and per-class AP as a plain-text table (values x100)."""
        return format_table(self.stats, self.per_class_ap)


def evaluated_ground_truth(gt: Any) -> dict[str, Any]:
    """The ground truth exactly as evaluated: the COCO dict of ``gt`` (a path or a loaded COCO),
    with annotation ids renumbered 1..N when any is < 1 (see :func:`_load_gt`). Written beside a
    run's predictions, plain pycocotools on it reproduces the run's numbers."""
    if hasattr(gt, "dataset") and hasattr(gt, "imgs"):
        dataset = gt.dataset
    else:
        path = Path(gt)
        if not path.exists():
            raise FileNotFoundError(f"annotation file {path} does not exist")
        dataset = json.loads(path.read_text())
    anns = dataset.get("annotations", [])
    if any(int(a["id"]) < 1 for a in anns):
        dataset = {**dataset, "annotations": [{**a, "id": i + 1} for i, a in enumerate(anns)]}
    return dataset


def _load_gt(gt: Any, backend: str) -> Any:
    """A ground-truth COCO object of the backend's type, from a path or a loaded COCO.

    Annotation ids are renumbered 1..N when any is < 1: pycocotools stores the matched
    ground-truth id per detection and reads 0 as "unmatched", so a box with id 0 (Roboflow
    exports start at 0) turns its true positive into a false positive. The caller's
    object is never modified.
    """
    dataset = evaluated_ground_truth(gt)
    renumber = dataset is not getattr(gt, "dataset", None)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FastCOCO

        if isinstance(gt, FastCOCO) and not renumber:
            return gt
        cls: Any = FastCOCO
    else:
        from pycocotools.coco import COCO

        if isinstance(gt, COCO) and not renumber:
            return gt
        cls = COCO
    obj = cls()
    obj.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        obj.createIndex()
    return obj


def _load_results(coco_gt: Any, predictions: Sequence[Mapping[str, Any]]) -> Any:
    """The detections as a COCO object of ``coco_gt``'s type, as ``coco_gt.loadRes`` builds it for bbox.

    Built here in one pass, because ``loadRes`` cannot take an empty list and, for boxes, also
    makes a polygon per detection that bbox evaluation never reads. What the evaluator reads
    is the same: ``bbox``, ``score``, ``area = w * h``, ids from 1, ``iscrowd = 0``.
    """
    anns = []
    for i, p in enumerate(predictions):
        bbox = [float(v) for v in p["bbox"]]
        if len(bbox) != 4:
            raise ValueError(f"bbox must be [x, y, w, h], got {p['bbox']!r}")
        anns.append({"image_id": int(p["image_id"]), "category_id": int(p["category_id"]), "bbox": bbox,
                     "score": float(p["score"]), "area": bbox[2] * bbox[3], "id": i + 1, "iscrowd": 0})
    dt = type(coco_gt)()
    dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def evaluate_coco(
    gt: Any,
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    backend: str = "pycocotools",
    max_dets: int = 100,
) -> CocoEvalResult:
    """Evaluate COCO-format detections against ground truth with the standard bbox protocol.

    Args:
        gt: annotation file path or a loaded ``pycocotools.coco.COCO``.
        predictions: COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
            with the ground truth's own (original) category ids.
        image_ids: images to evaluate, i.e. the images that were predicted on (an image
            without detections still counts its ground truth as missed). ``None``: every
            image of the ground truth.
        class_names: category id -> name for per-class AP; default the ground truth's names.
        backend: ``pycocotools`` (reference) or ``faster_coco_eval``.
        max_dets: detections per image kept by the evaluator's last ``maxDets`` (COCO: 100).

    Returns:
        The 12-number summary and per-class AP.

    Raises:
        ValueError: unknown backend, or predictions on images the ground truth lacks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown eval backend {backend!r}; choose one of {BACKENDS}")
    coco_gt = _load_gt(gt, backend)
    coco_dt = _load_results(coco_gt, predictions)
    known = set(coco_gt.getImgIds())
    if image_ids is None:
        ids = sorted(known)
    else:
        ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(
                f"{len(unknown)} evaluated image ids are not in the annotations, e.g. {unknown[:5]}"
            )
    stray = {a["image_id"] for a in coco_dt.dataset["annotations"]} - set(ids)
    if stray:
        raise ValueError(
            f"predictions refer to {len(stray)} image ids outside the evaluated images, "
            f"e.g. {sorted(stray)[:5]}: were they made on another dataset?"
        )
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    else:
        from pycocotools.cocoeval import COCOeval

        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = ids
    ev.params.maxDets = [1, 10, max_dets]
    # No summarize(): it hard-codes 100 detections for AP; summary_stats reads the accumulated arrays.
    with contextlib.redirect_stdout(io.StringIO()):
        if ids:
            ev.evaluate()
            ev.accumulate()
    if ids:
        stats = summary_stats(ev.eval, ev.params)
        precision = np.asarray(ev.eval["precision"])
    else:
        stats = {k: -1.0 for k in COCO_STATS}
        precision = np.full((1, 1, len(ev.params.catIds), 1, 1), -1.0)
    names = (dict(class_names) if class_names is not None
             else {c["id"]: c["name"] for c in coco_gt.dataset["categories"]})
    per_class = per_class_ap(precision, list(ev.params.catIds), names)
    return CocoEvalResult(
        stats=stats,
        per_class_ap=per_class,
        ann_file=str(gt) if isinstance(gt, (str, Path)) else None,
        num_images=len(ids),
        num_detections=len(coco_dt.dataset["annotations"]),
        backend=backend,
    )


def summary_stats(evaluation: Mapping[str, Any], params: Any) -> dict[str, float]:
    """The 12 COCO numbers from accumulated ``precision`` / ``recall``, at ``params.maxDets``.

    pycocotools' ``summarize`` computes the first AP entry at a hard-coded 100 detections per
    image, so with ``maxDets=[1, 10, 300]`` it reports AP -1; here every AP entry and AR100 use
    the last ``maxDets``, AR1 / AR10 the first two, exactly as pycocotools does at 100.
    """
    precision, recall = np.asarray(evaluation["precision"]), np.asarray(evaluation["recall"])
    iou_thrs = np.asarray(params.iouThrs)
    max_dets = list(params.maxDets)

    def mean_of(ap: bool, iou: float | None, area: str, dets: int) -> float:
        a = list(params.areaRngLbl).index(area)
        m = max_dets.index(dets)
        s = precision[..., a, m] if ap else recall[..., a, m]  # (T, R, K) or (T, K)
        if iou is not None:
            s = s[np.where(np.isclose(iou_thrs, iou))[0]]
        valid = s[s > -1]
        return float(valid.mean()) if valid.size else -1.0

    last = max_dets[-1]
    values = [
        mean_of(True, None, "all", last), mean_of(True, 0.5, "all", last), mean_of(True, 0.75, "all", last),
        mean_of(True, None, "small", last), mean_of(True, None, "medium", last),
        mean_of(True, None, "large", last),
        mean_of(False, None, "all", max_dets[0]), mean_of(False, None, "all", max_dets[1]),
        mean_of(False, None, "all", last), mean_of(False, None, "small", last),
        mean_of(False, None, "medium", last), mean_of(False, None, "large", last),
    ]
    return dict(zip(COCO_STATS, values))


def per_class_ap(precision: np.ndarray, cat_ids: Sequence[int], names: Mapping[int, str]) -> dict[str, float]:
    """AP@[.5:.95] per category from ``COCOeval.eval["precision"]`` (T, R, K, A, M).

    Uses area "all" and the last maxDets (``max_dets``, COCO: 100), averaging over entries > -1
    as pycocotools' summarize does; a category without ground truth gets -1. Categories not in ``names``
    (e.g. an unused placeholder category) are left out.
    """
    out: dict[str, float] = {}
    for k, cat_id in enumerate(cat_ids):
        if cat_id not in names:
            continue
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        name = str(names[cat_id])
        if name in out:  # two categories with one name: keep both, told apart by id
            name = f"{name} ({cat_id})"
        out[name] = float(valid.mean()) if valid.size else -1.0
    return out
