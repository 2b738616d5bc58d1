"""What a detector takes each object for: the confusion matrix of a COCO evaluation.

AP says how well a class is found; it does not say whether its misses are objects the detector
never boxes or objects it boxes under another class. On chess the difference decides what can help:
split seed 1's converged detector boxes 95% of the validation pieces (score >= 0.5) and names 81% of
those right, 69% of the pieces other than pawns (a rook or a bishop called a pawn in a third of
cases): more pseudo-boxes would not help it, better class targets might.

Rows are the true classes, then ``background`` (unmatched detections: on no object, or on one a
higher-scoring detection took); columns are the predicted classes, then ``missed`` (objects that no
detection matches). Matching is per image and class-agnostic, the way pycocotools matches within a
class: detections at or above ``score``, in descending score, each take the unmatched object it
overlaps most at IoU >= ``iou``. An object's column is the class of the detection that matched it.
Crowd boxes are not objects: a detection that matches no object but lies in a crowd region
(intersection over its own area >= ``iou``, pycocotools' crowd rule) is not counted as background.
Unlike COCO AP, no per-image cap on detections applies. ultralytics' ``ConfusionMatrix``
is the same table (rows and columns swapped, matched by IoU rather than by score); pycocotools and
detectron2 have none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

BACKGROUND, MISSED = "background", "missed"


def _xyxy(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection over ``a``'s own area, (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    over_a = np.divide(inter, area_a[:, None], out=np.zeros_like(inter), where=area_a[:, None] > 0)
    return iou, over_a


def confusion_matrix(
    ground_truth: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
    iou: float = 0.5,
    score: float = 0.5,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """The confusion matrix of COCO results against a COCO dataset dict.

    Args:
        ground_truth: a COCO dataset dict (``images``, ``annotations``, ``categories``).
        predictions: COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        image_ids: the images evaluated (default every image of ``ground_truth``); their objects
            count as missed when no detection matches them.
        iou: the IoU at which a detection matches an object.
        score: detections below it are left out.
        class_names: category id -> name (a detector's label map); named over the ground truth's.

    Returns:
        ``classes`` (category names in id order: the ground truth's categories, ``class_names``'
        and any other id an annotation or a detection carries, named ``id N``), ``matrix``
        (``len(classes) + 1`` rows: true class then ``background``; as many columns: predicted class
        then ``missed``; ``rows`` and ``columns`` name them), ``iou``, ``score``
        and ``confused``: the off-diagonal class pairs, most frequent first, each with its share of
        the true class's objects.

    Raises:
        ValueError: ``iou`` outside (0, 1].
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    ids = {int(i["id"]) for i in ground_truth.get("images", [])} if image_ids is None else {int(i) for i in image_ids}
    objects: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for a in ground_truth.get("annotations", []):
        if int(a["image_id"]) in ids:
            objects[int(a["image_id"])].append(a)
    detections: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for p in predictions:
        if int(p["image_id"]) in ids and float(p["score"]) >= score:
            detections[int(p["image_id"])].append(p)
    names_of = {int(c["id"]): str(c["name"]) for c in ground_truth.get("categories", [])}
    names_of.update({int(c): str(n) for c, n in (class_names or {}).items()})
    for a in [*(a for v in objects.values() for a in v), *(p for v in detections.values() for p in v)]:
        names_of.setdefault(int(a["category_id"]), f"id {a['category_id']}")
    index = {c: i for i, c in enumerate(sorted(names_of))}
    k = len(index)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for image_id in ids:
        anns = objects.get(image_id, [])
        real = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        dets = sorted(detections.get(image_id, []), key=lambda p: -float(p["score"]))
        gt_boxes, det_boxes = _xyxy([a["bbox"] for a in real]), _xyxy([p["bbox"] for p in dets])
        ious, _ = _overlaps(det_boxes, gt_boxes)
        crowd_cover = _overlaps(det_boxes, _xyxy([a["bbox"] for a in crowd]))[1].max(axis=1, initial=0.0)
        taken = np.zeros(len(real), dtype=bool)
        for d, det in enumerate(dets):
            cand = np.where(~taken & (ious[d] >= iou))[0] if len(real) else np.zeros(0, dtype=int)
            pred = index[int(det["category_id"])]
            if cand.size:
                g = int(cand[np.argmax(ious[d, cand])])
                taken[g] = True
                matrix[index[int(real[g]["category_id"])], pred] += 1
            elif crowd_cover[d] < iou:
                matrix[k, pred] += 1
        for g in np.where(~taken)[0]:
            matrix[index[int(real[g]["category_id"])], k] += 1
    names = [names_of[c] for c in sorted(names_of)]
    confused: list[dict[str, Any]] = []
    for t in range(k):
        total = int(matrix[t].sum())
        for j in range(k):
            if j != t and matrix[t, j]:
                confused.append({"true": names[t], "predicted": names[j], "count": int(matrix[t, j]),
                                 "share": float(matrix[t, j]) / total})
    confused.sort(key=lambda c: (-c["count"], c["true"], c["predicted"]))
    return {"classes": names, "iou": iou, "score": score, "rows": [*names, BACKGROUND],
            "columns": [*names, MISSED], "matrix": matrix.tolist(), "confused": confused}


def format_confusion(confusion: Mapping[str, Any], top: int = 8) -> str:
    """As text: each class's shares of its objects boxed under its own class / another class / missed,
    the most frequent confusions, and the number of unmatched detections."""
    m = np.asarray(confusion["matrix"])
    k = len(confusion["classes"])
    lines = [(f"confusion at IoU {confusion['iou']:g}, score >= {confusion['score']:g} "
              "(of each class's objects: boxed under its own class / another class / missed):")]
    width = max([len(n) for n in confusion["classes"]] + [5])
    for t, name in enumerate(confusion["classes"]):
        total = int(m[t].sum())
        if total == 0:
            continue
        right, missed = int(m[t, t]), int(m[t, k])
        lines.append(f"  {name:<{width}}  {100 * right / total:5.1f}%  {100 * (total - right - missed) / total:5.1f}%  "
                     f"{100 * missed / total:5.1f}%  of {total}")
    if confusion["confused"]:
        lines.append("most confused (true -> predicted):")
        for c in confusion["confused"][:top]:
            lines.append(f"  {c['true']} -> {c['predicted']}: {c['count']} ({100 * c['share']:.1f}% of {c['true']})")
    background = m[k, :k].sum()
    lines.append(f"unmatched detections (on no object, or duplicates): {int(background)}")
    return "\n".join(lines)
