"""Run plots: loss / LR / val-AP curves from the CSV log, and predictions next to ground truth."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes, make_grid

GT_COLOUR = "lime"
PRED_COLOUR = "red"


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of Lightning's CSVLogger ``metrics.csv`` with the empty cells left out."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k and v not in (None, ""):
                    try:
                        row[k] = float(v)
                    except ValueError:
                        continue
            rows.append(row)
    return rows


def _series(rows: Sequence[Mapping[str, float]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = sorted({(r[x], r[key]) for r in rows if key in r and x in r and math.isfinite(r[key])})
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(
    metrics_csv: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write ``loss.png`` (training losses per step), ``lr.png`` (per parameter group) and
    ``val_ap.png`` (val AP / AP50 per epoch, from ``history`` or the CSV) into ``out_dir``.

    ``metrics_csv`` may be several files (the segments of a resumed run); their rows are pooled.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [metrics_csv] if isinstance(metrics_csv, (str, Path)) else list(metrics_csv)
    rows = [r for f in files if Path(f).is_file() for r in read_metrics_csv(f)]
    keys = sorted({k for r in rows for k in r})
    written = []

    loss_keys = [k for k in keys if k.startswith("train/") and not k.endswith("_epoch")]
    if loss_keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in loss_keys:
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, label=k.removeprefix("train/").removesuffix("_step"), lw=2 if "loss_" not in k else 1)
        ax.set(xlabel="step", ylabel="loss", title="training loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "loss.png"))

    lr_keys = [k for k in keys if k.startswith("lr-")]
    if lr_keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in lr_keys:
            if k.endswith(".no_decay"):  # same LR as its decayed twin
                continue
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, label=k.split("/", 1)[-1])
        if any(v > 0 for k in lr_keys for v in _series(rows, k)[1]):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="learning rate", title="learning rate per parameter group")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "lr.png"))

    epochs: list[float]
    ap: dict[str, list[Any]]
    loss: list[Any] = []
    if history:
        epochs = [h["epoch"] for h in history]
        ap = {k: [h.get(f"val_{k}") for h in history] for k in ("AP", "AP50", "AP75")}
        loss = [h.get("train_loss") for h in history]
    else:
        epochs, ap_rows = _series(rows, "val/AP", x="epoch")
        ap = {"AP": list(ap_rows), "AP50": list(_series(rows, "val/AP50", x="epoch")[1])}
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, ys in ap.items():
            if ys and len(ys) == len(epochs):
                ax.plot(epochs, [float("nan") if v is None else v for v in ys], marker="o", label=f"val {k}")
        if history:
            scores = [-1.0 if v is None else v for v in ap["AP"]]
            best = scores.index(max(scores))
            ax.axvline(epochs[best], color="grey", ls="--", lw=1, label=f"best epoch {epochs[best]:g}")
        ax.set(xlabel="epoch", ylabel="AP", title="validation AP", ylim=(0, 1))
        if any(v is not None for v in loss):
            twin = ax.twinx()
            twin.plot(epochs, [float("nan") if v is None else v for v in loss], color="black", alpha=0.4,
                      label="train loss")
            twin.set_ylabel("train loss (epoch mean)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "val_ap.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    dataset: Any,
    predictions: Sequence[Mapping[str, Any]],
    out_path: str | Path,
    num_images: int = 8,
    score: float = 0.5,
    panel_height: int = 320,
) -> Path | None:
    """A PNG grid: each row is one image, ground truth (green) left, predictions >= ``score`` (red) right.

    ``dataset`` is a CocoDetection; ``predictions`` are COCO results in its annotation frame.
    """
    n = min(num_images, len(dataset))
    if n == 0:
        return None
    names = {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]}
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for p in predictions:
        if p["score"] >= score:
            by_image.setdefault(int(p["image_id"]), []).append(p)
    panels = []
    for i in range(n):
        info = dataset.image_info(i)
        pil = dataset.load_image(i)
        # Draw at panel size (fonts and lines stay legible) with boxes scaled from the annotation frame.
        s = panel_height / info["height"]
        size = (max(1, round(info["width"] * s)), panel_height)
        pil = pil.resize(size)
        img = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).reshape(pil.height, pil.width, 3)
        img = img.permute(2, 0, 1).contiguous()
        gt = dataset.annotations(i, include_crowd=True)
        gt_boxes = torch.as_tensor(gt["boxes"], dtype=torch.float32).reshape(-1, 4) * s
        gt_names = [dataset.class_names[int(lbl) - 1] for lbl in gt["labels"]]
        dets = by_image.get(int(info["id"]), [])
        det_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)],
                                 dtype=torch.float32).reshape(-1, 4) * s
        det_names = [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets]
        panels += [draw_detections(img, gt_boxes, gt_names, GT_COLOUR), draw_detections(img, det_boxes, det_names, PRED_COLOUR)]
    # Pad panels to one width so make_grid can tile them two per row.
    max_w = max(p.shape[-1] for p in panels)
    panels = [F.pad(p, (0, max_w - p.shape[-1]), value=255) for p in panels]
    grid = make_grid(torch.stack(panels), nrow=2, padding=4, pad_value=255)
    from PIL import Image

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out
