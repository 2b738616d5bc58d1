"""A built-in synthetic detection set: textured shapes on cluttered textured backgrounds (drawn by
:mod:`pretrain.core.data.scenes`), written as COCO JSON and image folders.

Each class is a (shape, texture) pair: a striped disc, a checkered square, a dotted triangle, a
grid-hatched ring and a wavy cross. Colours are random per object, so colour says nothing. The
backgrounds use the same vocabulary sparsely: irregular blobs filled with the class textures, and
distractor shapes of the class outlines filled with the *wrong* texture (a checkered disc is not
an object). A detector therefore has to learn shape and texture together. Objects come at COCO's
three scales (small < 32^2 px, medium, large > 96^2 px; large ones need ``image_size >= 112``),
overlap each other partially (every object stays at least 60% visible) and are cut by the image
border now and then. Boxes are the tight box of the visible pixels, as in COCO.

The unlabeled images come from the same generator, so self-supervised pretraining on them sees
exactly the textures and shapes the detector needs. Their hidden ground truth is written to
``unlabeled.json`` (flagged ``info.hidden_ground_truth``) to measure pseudo-label quality; training
code must read the folder ``unlabeled/`` only.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output is
the same on every machine and does not depend on how many images of other splits are asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pretrain.core.data.scenes import CLASSES, SCALES, render_scene

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1
MARKER = "synthetic.json"
SPLIT_CODES = {"train": 0, "val": 1, "unlabeled": 2}


def _params(seed: int, num_train: int, num_val: int, num_unlabeled: int, image_size: int,
            scales: tuple[str, ...] | list[str] = SCALES) -> dict[str, Any]:
    for name, v in (("num_train", num_train), ("num_val", num_val), ("num_unlabeled", num_unlabeled)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (objects up to 92 px), got {image_size}")
    bad = [x for x in scales if x not in SCALES]
    if bad or not scales:
        raise ValueError(f"scales={list(scales)}: give one or more of {SCALES}")
    params: dict[str, Any] = {"version": SYNTHETIC_VERSION, "seed": int(seed), "num_train": int(num_train),
                              "num_val": int(num_val), "num_unlabeled": int(num_unlabeled),
                              "image_size": int(image_size)}
    if tuple(scales) != SCALES:  # the default leaves the marker (and every file) as before
        params["scales"] = [x for x in SCALES if x in scales]
    return params


def _write_split(root: Path, split: str, n: int, params: dict[str, int]) -> dict[str, Any]:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i in range(n):
        rng = np.random.default_rng([params["seed"], SPLIT_CODES[split], i])
        pixels, objects = render_scene(rng, params["image_size"], tuple(params.get("scales", SCALES)))  # type: ignore[arg-type]
        name = f"{split}/{i:06d}.png"
        Image.fromarray(pixels).save(root / name, compress_level=6)
        images.append({"id": i + 1, "file_name": name, "width": params["image_size"],
                       "height": params["image_size"]})
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": obj["category_id"],
                         "bbox": obj["bbox"], "area": w * h, "iscrowd": 0})
    info: dict[str, Any] = {"description": "fewlabel-det synthetic textured shapes", "split": split, **params}
    if split == "unlabeled":
        info["hidden_ground_truth"] = True
    return {
        "info": info,
        "images": images,
        "annotations": anns,
        "categories": [{"id": k, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES, 1)],
    }


def make_synthetic(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    num_train: int = 300,
    num_val: int = 100,
    num_unlabeled: int = 1000,
    image_size: int = 160,
    scales: tuple[str, ...] | list[str] = SCALES,
) -> dict[str, Any]:
    """Generate the synthetic set into ``out_dir`` (overwriting its own files).

    Writes ``train.json`` and ``val.json`` (file_names relative to ``out_dir``), their images in
    ``train/`` and ``val/``, unlabeled images in ``unlabeled/``, ``unlabeled.json`` with their
    hidden ground truth, and the marker ``synthetic.json``.

    Returns:
        ``{"root", "train_json", "val_json", "unlabeled", "unlabeled_json", "params", "counts"}``
        with paths as :class:`~pathlib.Path`.
    """
    params = _params(seed, num_train, num_val, num_unlabeled, image_size, scales)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)  # a half-written set must not look complete
    t0 = time.perf_counter()
    counts = {}
    for split, n in (("train", num_train), ("val", num_val), ("unlabeled", num_unlabeled)):
        if (root / split).is_dir():
            shutil.rmtree(root / split)  # stale images of a larger earlier run
        coco = _write_split(root, split, n, params)
        (root / f"{split}.json").write_text(json.dumps(coco, indent=1, sort_keys=True) + "\n")
        counts[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
    marker = {"params": params, "counts": counts}
    (root / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    log.info("synthetic data in %s (%.1fs): %s", root, time.perf_counter() - t0, counts)
    return _result(root, params, counts)


def _result(root: Path, params: dict[str, int], counts: dict[str, Any]) -> dict[str, Any]:
    return {"root": root, "train_json": root / "train.json", "val_json": root / "val.json",
            "unlabeled": root / "unlabeled", "unlabeled_json": root / "unlabeled.json",
            "params": params, "counts": counts}


def ensure_synthetic(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    num_train: int = 300,
    num_val: int = 100,
    num_unlabeled: int = 1000,
    image_size: int = 160,
    scales: tuple[str, ...] | list[str] = SCALES,
    generate: Callable[..., dict[str, Any]] = make_synthetic,
) -> dict[str, Any]:
    """Return the synthetic set in ``out_dir``, generating it only if missing or made differently.

    The marker ``synthetic.json`` records the parameters; it is written last, so an interrupted
    generation is redone on the next call. Same arguments and return value as :func:`make_synthetic`.
    """
    params = _params(seed, num_train, num_val, num_unlabeled, image_size, scales)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks, parallel sweeps) may ask at once: one generates, the others wait
    # on the lock and then find the marker.
    with _locked(root / ".synthetic.lock"):
        try:
            stored = json.loads((root / MARKER).read_text())
            if stored.get("params") == params and all((root / f"{s}.json").is_file() for s in SPLIT_CODES):
                return _result(root, params, stored.get("counts", {}))
            log.info("synthetic data in %s was made with %s; regenerating with %s",
                     root, stored.get("params"), params)
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            pass
        return generate(root, seed=seed, num_train=num_train, num_val=num_val, num_unlabeled=num_unlabeled,
                        image_size=image_size, scales=scales)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (POSIX); without fcntl (Windows) no locking."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
