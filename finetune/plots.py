"""Predictions drawn next to ground truth (the curves are in pretrain.core.run.curves)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import draw_bounding_boxes

GT_COLOUR = "lime"
PRED_COLOUR = "red"


def draw_detections(
    image: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    labels: Sequence[str],
    colour: str,
    width: int = 2,
) -> torch.Tensor:
    """Boxes with their captions on a uint8 (3, H, W) copy of ``image`` (float [0, 1] or uint8)."""
    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if boxes_xyxy.numel() == 0:
        return img.clone()
    return draw_bounding_boxes(img, boxes_xyxy.float(), labels=list(labels), colors=colour, width=width)


def plot_predictions(
    ann_file: str | Path,
    predictions: Mapping[str, str | Path | Sequence[Mapping[str, Any]]],
    out_path: str | Path,
    image_root: str | Path | None = None,
    num_images: int = 6,
    score: float = 0.5,
) -> Path | None:
    """A PNG grid: one row per image, ground truth (green) then each named prediction set (red).

    Works from the COCO files alone: ``ann_file`` is the ground truth and every entry of
    ``predictions`` is a COCO results list (or a ``predictions.json``) in its ids and coordinates,
    so one run's plot and a comparison of several runs (the demo's pretrained against random
    init) are the same picture. Detections below ``score`` are left out. Returns None when the
    annotation file has no image with boxes.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    from PIL import Image
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        gt = COCO(str(ann_file))
    root = Path(image_root) if image_root else Path(ann_file).parent
    sets = {name: json.loads(Path(p).read_text()) if isinstance(p, (str, Path)) else list(p)
            for name, p in predictions.items()}
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    img_ids = [i for i in sorted(gt.getImgIds()) if gt.getAnnIds(imgIds=i, iscrowd=None)][:num_images]
    if not img_ids:
        return None
    by_image: dict[str, dict[int, list[tuple[Any, int, float | None]]]] = {}
    for name, dets in sets.items():
        rows = by_image.setdefault(name, {})
        for d in dets:
            if d["score"] >= score:
                rows.setdefault(int(d["image_id"]), []).append((d["bbox"], d["category_id"], d["score"]))
    cols = ["ground truth", *sets]
    fig, axes = plt.subplots(len(img_ids), len(cols), figsize=(3 * len(cols), 3 * len(img_ids)), squeeze=False)
    for r, img_id in enumerate(img_ids):
        info = gt.loadImgs(img_id)[0]
        image = Image.open(root / info["file_name"]).convert("RGB")
        boxes: dict[str, list[tuple[Any, int, float | None]]] = {"ground truth": [(a["bbox"], a["category_id"], None)
                                  for a in gt.loadAnns(gt.getAnnIds(imgIds=img_id))]}
        boxes.update({name: by_image[name].get(img_id, []) for name in sets})
        for c, col in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(image)
            for (x, y, w, h), cat, s in boxes[col]:
                colour = GT_COLOUR if s is None else PRED_COLOUR
                ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color=colour, lw=1.2))
                caption = names.get(cat, str(cat)) + ("" if s is None else f" {s:.2f}")
                ax.text(x, y, caption, color="white", fontsize=5, va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.6, "pad": 0.5, "lw": 0})
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col if col == "ground truth" else f"{col} (score >= {score:g})", fontsize=8)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
