"""COCO results: a detector's outputs as COCO result dicts, written as ``predictions.json``, and the
COCO numbers as a text table (what :mod:`finetune.coco_eval` computes, shown)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Order of COCOeval.stats for iouType="bbox".
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _clean(p: Mapping[str, Any]) -> dict[str, Any]:
    """One result as plain Python numbers (pycocotools chokes on tensors / numpy scalars)."""
    bbox = [float(v) for v in p["bbox"]]
    if len(bbox) != 4:
        raise ValueError(f"bbox must be [x, y, w, h], got {p['bbox']!r}")
    return {"image_id": int(p["image_id"]), "category_id": int(p["category_id"]), "bbox": bbox,
            "score": float(p["score"])}


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_cat_id: Mapping[int, int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    """One image's detections (XYXY, contiguous labels 1..K) as COCO results.

    ``scale`` = (sx, sy) maps the model's image coordinates back to the original image
    (original size / size the model saw); labels map back to the original category ids.
    """
    if boxes.numel() == 0:
        return []
    b = boxes.detach().float().cpu().clone()
    b[:, 0::2] *= scale[0]
    b[:, 1::2] *= scale[1]
    xywh = torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1)
    out = []
    cpu_scores, cpu_labels = scores.detach().cpu().tolist(), labels.detach().cpu().tolist()
    for box, score, label in zip(xywh.tolist(), cpu_scores, cpu_labels):
        cat = label_to_cat_id.get(int(label))
        if cat is None:
            raise KeyError(f"label {label} has no category id in the label map {dict(label_to_cat_id)}")
        out.append({"image_id": int(image_id), "category_id": int(cat), "bbox": [round(v, 2) for v in box],
                    "score": round(float(score), 5)})
    return out


def write_predictions(path: str | Path, predictions: Sequence[Mapping[str, Any]]) -> Path:
    """Write COCO results (a JSON list) that ``COCO.loadRes`` reads directly."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps([_clean(x) for x in predictions]))
    return p


def _pct(v: Any) -> str:
    undefined = v is None or v < 0 or (isinstance(v, float) and math.isnan(v))
    return "-" if undefined else f"{100 * v:.1f}"


def format_table(
    stats: Mapping[str, float] | Mapping[str, Mapping[str, float]],
    per_class: Mapping[str, float] | None = None,
    keys: Sequence[str] = COCO_STATS,
    difference: bool = False,
) -> str:
    """COCO numbers as aligned text in percent ('-' for -1 / undefined).

    Args:
        stats: one summary ``{"AP": ..}``, or named summaries ``{run: {"AP": ..}}`` for a
            side-by-side table (one row per run).
        per_class: per-class AP listed under the table.
        keys: the columns.
        difference: add a row with the first run minus the last, in points.
    """
    runs: Mapping[str, Mapping[str, float]] = (
        {"": stats} if not stats or not isinstance(next(iter(stats.values())), Mapping)  # type: ignore[dict-item]
        else stats  # type: ignore[assignment]
    )
    width = max(len(n) for n in runs) + 2 if any(runs) else 0
    lines = [" " * width + "  ".join(f"{k:>6}" for k in keys)]
    for name, row in runs.items():
        lines.append(f"{name:<{width}}" + "  ".join(f"{_pct(row.get(k)):>6}" for k in keys))
    if difference and len(runs) >= 2:
        first, last = next(iter(runs.values())), list(runs.values())[-1]
        deltas = []
        for k in keys:
            a, b = first.get(k), last.get(k)
            ok = all(v is not None and v >= 0 for v in (a, b))
            deltas.append(f"{(a - b) * 100:+.1f}" if ok else "-")  # type: ignore[operator]
        lines.append(f"{'difference':<{width}}" + "  ".join(f"{d:>6}" for d in deltas))
    if per_class:
        width = max(len(n) for n in per_class)
        lines.append("")
        lines.append(f"{'class':<{width}}  {'AP':>6}")
        for name, ap in per_class.items():
            lines.append(f"{name:<{width}}  {_pct(ap):>6}")
    return "\n".join(lines)
