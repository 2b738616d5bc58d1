"""Training curves from Lightning's CSV log: loss, learning rate, val AP and kNN per run.

Both stages plot with these (pretraining's loss / LR / kNN, fine-tuning's loss / LR / val AP).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The kNN probe of the backbone before training, as pretraining logs it (pretrain/methods/base.py).
KNN_STEP0 = "knn_top1_step0"
# The colour of reference lines (the random-init kNN): apart from the default colour cycle's first lines.
REFERENCE_COLOR = "tab:red"


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
    written.extend(_curves_png(rows, loss_keys, out / "loss.png", "training loss", "loss",
                               label=lambda k: k.removeprefix("train/").removesuffix("_step"),
                               bold=lambda k: "loss_" not in k))
    written.extend(_lr_png(rows, keys, out / "lr.png"))

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


def plot_pretrain_curves(metrics_csv: str | Path, out_dir: str | Path,
                         knn_reference: float | None = None) -> list[Path]:
    """Pretraining's ``loss.png`` (per step), ``lr.png`` and ``knn.png`` (the box-crop kNN probe
    per epoch, when it ran) from its ``logs/metrics.csv`` into ``out_dir``.

    ``knn.png`` draws the random-init backbone's kNN (``knn_reference``, else the CSV's
    ``knn_top1_step0``) as a dashed line: the level a trained backbone has to beat.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics_csv(metrics_csv) if Path(metrics_csv).is_file() else []
    keys = sorted({k for r in rows for k in r})
    written = _curves_png(rows, [k for k in keys if k == "train_loss"], out / "loss.png", "pretraining loss", "loss")
    written += _lr_png(rows, keys, out / "lr.png")
    if knn_reference is None:
        step0 = [r[KNN_STEP0] for r in rows if KNN_STEP0 in r and math.isfinite(r[KNN_STEP0])]
        knn_reference = step0[-1] if step0 else None
    references = {"random init (step 0)": knn_reference} if knn_reference is not None else {}
    written += _curves_png(rows, [k for k in keys if k.startswith("knn") and k != KNN_STEP0], out / "knn.png",
                           "kNN top-1 on labeled box crops", "accuracy", x="epoch", marker="o",
                           references=references)
    return written


def _curves_png(
    rows: Sequence[Mapping[str, float]],
    keys: Sequence[str],
    path: Path,
    title: str,
    ylabel: str,
    x: str = "step",
    log_y: bool = False,
    marker: str | None = None,
    label: Any = str,
    bold: Any = lambda k: True,
    references: Mapping[str, float] | None = None,
) -> list[Path]:
    """One PNG with a line per key of ``rows`` against ``x``; nothing when no key has points.

    ``references`` are horizontal dashed lines (label: value) drawn beside the curves.
    """
    series = {k: _series(rows, k, x) for k in keys}
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label(k), lw=2 if bold(k) else 1, marker=marker)
    for name, value in (references or {}).items():
        ax.axhline(value, color=REFERENCE_COLOR, ls="--", lw=1.5, label=f"{name}: {value:.3g}")
    if log_y and any(v > 0 for _, ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return [_save(fig, path)]


def _lr_png(rows: Sequence[Mapping[str, float]], keys: Sequence[str], path: Path) -> list[Path]:
    # A ".no_decay" group has the same LR as its decayed twin: one line is enough.
    lr_keys = [k for k in keys if k.startswith("lr-") and not k.endswith("no_decay")]
    return _curves_png(rows, lr_keys, path, "learning rate per parameter group", "learning rate",
                       log_y=True, label=lambda k: k.split("/", 1)[-1])


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
