"""Synthetic textured-shapes set: deterministic, every class at every COCO scale, cached generation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.report import size_bucket, summarize
from pretrain.core.data.synthetic import CLASSES, ensure_synthetic, make_synthetic, render_scene


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    again = make_synthetic(tmp_path / "again", seed=0, num_train=12, num_val=6, num_unlabeled=16, image_size=96)
    assert _digest(again["root"]) == _digest(synthetic_data["root"])  # JSON and PNG bytes
    other = make_synthetic(tmp_path / "other", seed=1, num_train=12, num_val=0, num_unlabeled=0, image_size=96)
    assert other["train_json"].read_bytes() != synthetic_data["train_json"].read_bytes()
    # An image depends on (seed, split, index) only, not on how many images were asked for.
    fewer = make_synthetic(tmp_path / "fewer", seed=0, num_train=3, num_val=0, num_unlabeled=0, image_size=96)
    for i in range(3):
        name = f"train/{i:06d}.png"
        assert (fewer["root"] / name).read_bytes() == (synthetic_data["root"] / name).read_bytes()


def test_every_class_at_every_scale(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path, seed=0, num_train=60, num_val=0, num_unlabeled=0, image_size=160)
    coco = json.loads(out["train_json"].read_text())
    seen = Counter((a["category_id"], size_bucket(a["area"])) for a in coco["annotations"])
    missing = [(c, s) for c in range(1, len(CLASSES) + 1) for s in ("small", "medium", "large") if not seen[(c, s)]]
    assert not missing, seen
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160 and a["area"] == w * h
    s = summarize(out["train_json"])
    assert s["fixes"] == {} and s["classes"] == 5 and s["images"] == 60


def test_scenes_have_clutter_and_occlusion() -> None:
    rng = np.random.default_rng(5)
    overlaps = 0
    for _ in range(20):
        img, objs = render_scene(rng, 128)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert img.std() > 20  # textured, not flat
        boxes = [o["bbox"] for o in objs]
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                overlaps += min(x + w, x2 + w2) > max(x, x2) and min(y + h, y2 + h2) > max(y, y2)
    assert overlaps > 0


def test_unlabeled_folder_and_hidden_truth(synthetic_data: dict[str, Path]) -> None:
    files = sorted(synthetic_data["unlabeled"].glob("*.png"))
    assert len(files) == 16 and Image.open(files[0]).size == (96, 96)
    hidden = json.loads((synthetic_data["root"] / "unlabeled.json").read_text())
    assert hidden["info"]["hidden_ground_truth"] is True and len(hidden["images"]) == 16
    assert all(im["file_name"].startswith("unlabeled/") for im in hidden["images"])


def test_ensure_regenerates_only_when_needed(tmp_path: Path) -> None:
    calls: list[dict] = []

    def counting(*args: object, **kwargs: object) -> dict:
        calls.append(kwargs)
        return make_synthetic(*args, **kwargs)  # type: ignore[arg-type]

    kw = {"seed": 0, "num_train": 2, "num_val": 1, "num_unlabeled": 2, "image_size": 64}
    first = ensure_synthetic(tmp_path, generate=counting, **kw)
    assert len(calls) == 1 and first["train_json"].is_file()
    again = ensure_synthetic(tmp_path, generate=counting, **kw)
    assert len(calls) == 1 and again["counts"] == first["counts"]
    ensure_synthetic(tmp_path, generate=counting, **{**kw, "num_train": 1})
    assert len(calls) == 2 and len(list((tmp_path / "train").glob("*.png"))) == 1  # stale images removed
    (tmp_path / "synthetic.json").unlink()  # e.g. an interrupted run
    ensure_synthetic(tmp_path, generate=counting, **kw)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="image_size"):
        ensure_synthetic(tmp_path, image_size=32)


def test_ensure_concurrent_callers_generate_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        return make_synthetic(*args, **kwargs)  # type: ignore[arg-type]

    kw = {"seed": 0, "num_train": 3, "num_val": 1, "num_unlabeled": 2, "image_size": 64}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ensure_synthetic(tmp_path, generate=counting, **kw), range(4)))
    assert len(calls) == 1 and all(r["counts"] == results[0]["counts"] for r in results)


def test_scales_choose_the_size_buckets(tmp_path: Path) -> None:
    """``scales=("medium", "large")``: no small objects (the demo's regime), recorded in the marker;
    the default leaves every scene as it was."""
    rng_default, rng_all = np.random.default_rng(3), np.random.default_rng(3)
    a, objs_a = render_scene(rng_default, 160)
    b, objs_b = render_scene(rng_all, 160, ("small", "medium", "large"))
    assert np.array_equal(a, b) and objs_a == objs_b
    out = make_synthetic(tmp_path / "ml", seed=0, num_train=30, num_val=0, num_unlabeled=0, image_size=160,
                         scales=("medium", "large"))
    coco = json.loads(out["train_json"].read_text())
    buckets = Counter(size_bucket(a["area"]) for a in coco["annotations"])
    # Occlusion and the border may cut a medium object below 32^2 px of box now and then.
    assert buckets["small"] <= 0.03 * sum(buckets.values()) and buckets["medium"] > 0 and buckets["large"] > 0
    assert json.loads((out["root"] / "synthetic.json").read_text())["params"]["scales"] == ["medium", "large"]
    with pytest.raises(ValueError, match="scales"):
        make_synthetic(tmp_path / "bad", num_train=1, num_val=0, num_unlabeled=0, scales=("huge",))
