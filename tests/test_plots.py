"""Run plots: the predictions-against-ground-truth grid and pretraining's curves, on real files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from finetune.plots import plot_predictions
from pretrain.core.run.curves import plot_pretrain_curves


def _red_fraction(panel: np.ndarray) -> float:
    r, g, b = (panel[..., i].astype(int) for i in range(3))
    return float(((r > 200) & (g < 60) & (b < 60)).mean())


def _green_fraction(panel: np.ndarray) -> float:
    r, g, b = (panel[..., i].astype(int) for i in range(3))
    return float(((g > 200) & (r < 60) & (b < 60)).mean())


def test_prediction_grid_has_a_column_per_set_and_draws_only_confident_boxes(tmp_path):
    Image.new("RGB", (100, 80), (128, 128, 128)).save(tmp_path / "a.png")
    Image.new("RGB", (100, 80), (90, 90, 90)).save(tmp_path / "b.png")
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 60, 50], "area": 3000,
                         "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 20, 40, 40], "area": 1600,
                         "iscrowd": 0}],
        "categories": [{"id": 3, "name": "thing"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(ann))
    confident = [{"image_id": 1, "category_id": 3, "bbox": [12, 12, 60, 50], "score": 0.9}]
    (tmp_path / "weak.json").write_text(json.dumps([{"image_id": 1, "category_id": 3, "bbox": [12, 12, 60, 50],
                                                     "score": 0.3}]))
    out = plot_predictions(tmp_path / "gt.json", {"confident": confident, "weak": tmp_path / "weak.json"},
                           tmp_path / "grid.png", score=0.5)
    grid = np.asarray(Image.open(out).convert("RGB"))
    # Three columns (ground truth, two sets) and two rows of 3-inch panels.
    assert abs(grid.shape[1] / grid.shape[0] - 3 / 2) < 0.05
    cols = np.array_split(grid, 3, axis=1)
    assert _green_fraction(cols[0]) > 0.001 and _red_fraction(cols[0]) == 0
    assert _red_fraction(cols[1]) > 0.001 and _green_fraction(cols[1]) == 0
    assert _red_fraction(cols[2]) == 0  # the 0.3 detection is under the threshold


def test_prediction_grid_without_boxed_images_is_none(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert plot_predictions(tmp_path / "gt.json", {"run": []}, tmp_path / "grid.png") is None
    assert not (tmp_path / "grid.png").exists()


def test_pretrain_curves_from_a_metrics_csv(tmp_path):
    lines = ["epoch,knn_top1,lr-LARS/decay,lr-LARS/no_decay,step,train_loss"]
    for step in range(10):
        lines.append(f"{step // 5},,{0.1 * (1 - step / 10)},{0.1 * (1 - step / 10)},{step},")
        lines.append(f"{step // 5},,,,{step},{3.0 - 0.1 * step}")
    lines += ["0,0.3,,,4,", "1,0.4,,,9,"]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    written = plot_pretrain_curves(tmp_path / "metrics.csv", tmp_path / "plots")
    assert sorted(p.name for p in written) == ["knn.png", "loss.png", "lr.png"]
    # Without a kNN probe there is no kNN plot (and no empty figure).
    (tmp_path / "no_knn.csv").write_text("\n".join(lines[:-2]) + "\n")
    assert "knn.png" not in [p.name for p in plot_pretrain_curves(tmp_path / "no_knn.csv", tmp_path / "p2")]
