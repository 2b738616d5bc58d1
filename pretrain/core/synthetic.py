"""A built-in synthetic detection set: textured shapes on cluttered textured backgrounds.

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
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1
MARKER = "synthetic.json"
SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checker", "dots", "grid", "waves")
CLASSES = ("striped_disc", "checkered_square", "dotted_triangle", "grid_ring", "wavy_cross")
# Textures that no class owns; distractors and occluders use them together with mismatched ones.
NEUTRAL_TEXTURES = ("solid", "noise", "gradient")
SPLIT_CODES = {"train": 0, "val": 1, "unlabeled": 2}
SCALES = ("small", "medium", "large")  # COCO's area buckets: < 32^2, < 96^2, larger
MIN_VISIBLE = 0.6  # an object must keep this fraction of its pixels visible
SUPERSAMPLE = 4  # shape masks are drawn at 4x and box-filtered down: anti-aliased edges


# ------------------------------------------------------------------------------------ textures
def _texture(kind: str, h: int, w: int, rng: np.random.Generator, period: float) -> np.ndarray:
    """An (h, w, 3) float image of texture ``kind`` with two random contrasting colours."""
    c1, c2 = _colour_pair(rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    u = xs * math.cos(ang) + ys * math.sin(ang) + rng.uniform(0, period)
    v = -xs * math.sin(ang) + ys * math.cos(ang) + rng.uniform(0, period)
    if kind == "stripes":
        m = (np.floor(u / (period / 2)) % 2).astype(np.float32)
    elif kind == "checker":
        m = ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    elif kind == "dots":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        m = (du * du + dv * dv <= (0.3 * period) ** 2).astype(np.float32)
    elif kind == "grid":
        lw = max(1.0, 0.22 * period)
        m = (((u % period) < lw) | ((v % period) < lw)).astype(np.float32)
    elif kind == "waves":
        m = (np.sin(2 * math.pi * u / period + 2.2 * np.sin(2 * math.pi * v / (1.6 * period))) > 0)
        m = m.astype(np.float32)
    elif kind == "solid":
        m = np.zeros((h, w), np.float32)
    elif kind == "noise":
        cell = max(1, int(period / 3))
        small = rng.random((h // cell + 1, w // cell + 1)) < 0.5
        m = np.kron(small, np.ones((cell, cell)))[:h, :w].astype(np.float32)
    elif kind == "gradient":
        m = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return c1 * (1 - m[..., None]) + c2 * m[..., None]


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose luminance differs enough for the texture to stay visible."""
    lum = np.array([0.299, 0.587, 0.114])
    for _ in range(50):
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(float(lum @ (c1 - c2))) > 70:
            break
    return c1.astype(np.float32), c2.astype(np.float32)


# -------------------------------------------------------------------------------------- shapes
def _shape_alpha(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) anti-aliased alpha mask in [0, 1] of ``shape`` filling the square."""
    n = size * SUPERSAMPLE
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    c = (n - 1) / 2
    theta = rng.uniform(0, 2 * math.pi)
    if shape == "disc":
        d.ellipse([0, 0, n - 1, n - 1], fill=255)
    elif shape == "ring":
        d.ellipse([0, 0, n - 1, n - 1], fill=255)
        inner = rng.uniform(0.25, 0.32) * n
        d.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    elif shape == "square":
        # _fit scales the rotated square to the largest that fits the box.
        corners = [theta + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        d.polygon(_fit([(math.cos(a), math.sin(a)) for a in corners], n), fill=255)
    elif shape == "triangle":
        corners = [theta + k * 2 * math.pi / 3 for k in range(3)]
        d.polygon(_fit([(math.cos(a), math.sin(a)) for a in corners], n), fill=255)
    elif shape == "cross":
        arm = rng.uniform(0.15, 0.2)
        outline = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
                   (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
        ct, st = math.cos(theta), math.sin(theta)
        d.polygon(_fit([(x * ct - y * st, x * st + y * ct) for x, y in outline], n), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _fit(pts: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """Scale and shift polygon points so their bounding box fills [0, n-1]^2 (aspect kept)."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    scale = (n - 1) / max(max(xs) - min(xs), max(ys) - min(ys))
    ox = (n - 1 - (max(xs) - min(xs)) * scale) / 2
    oy = (n - 1 - (max(ys) - min(ys)) * scale) / 2
    return [((x - min(xs)) * scale + ox, (y - min(ys)) * scale + oy) for x, y in pts]


def _blob_alpha(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular star-shaped polygon mask, (h, w), for background clutter."""
    img = Image.new("L", (w * 2, h * 2), 0)
    k = int(rng.integers(6, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = rng.uniform(0.45, 1.0, k)
    pts = [(w * (1 + r * math.cos(a)), h * (1 + r * math.sin(a))) for a, r in zip(angles, radii)]
    ImageDraw.Draw(img).polygon(pts, fill=255)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


# -------------------------------------------------------------------------------------- scenes
def _paste(canvas: np.ndarray, tex: np.ndarray, alpha: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-blend ``tex`` into ``canvas`` at (x, y), clipped to the canvas; returns the full-size alpha."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    full = np.zeros((H, W), np.float32)
    if x1 <= x0 or y1 <= y0:
        return full
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
    region = canvas[y0:y1, x0:x1]
    region *= 1 - a[..., None]
    region += tex[y0 - y:y1 - y, x0 - x:x1 - x] * a[..., None]
    full[y0:y1, x0:x1] = a
    return full


def _period(size: int, rng: np.random.Generator) -> float:
    # Texture scale grows with the object but is bounded, so small objects still show
    # a few periods and large ones do not turn into a handful of flat bands.
    return float(np.clip(size / rng.uniform(3.5, 6.0), 4.0, 18.0))


def _size_ranges(image_size: int) -> dict[str, tuple[int, int]]:
    large_hi = min(int(image_size * 0.9), 200)
    return {"small": (8, 30), "medium": (34, min(92, image_size - 4)), "large": (100, large_hi)}


def render_scene(rng: np.random.Generator, image_size: int,
                 scales: tuple[str, ...] = SCALES) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one scene, its objects drawn at the COCO size buckets named in ``scales``.

    Returns:
        ``(image, objects)``: a (S, S, 3) uint8 array and a list of
        ``{"category_id": 1..5, "bbox": [x, y, w, h]}`` (visible extent, pixels).
    """
    S = image_size
    # Background: a smooth random colour field ...
    coarse = rng.uniform(30, 225, (4, 4, 3)).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(coarse).resize((S, S), Image.Resampling.BICUBIC), np.float32).copy()
    # ... with a few blobs of the shared texture vocabulary ...
    for _ in range(int(rng.integers(2, 6))):
        bw, bh = (int(v) for v in rng.integers(S // 8, S // 2, 2))
        kind = str(rng.choice(TEXTURES + NEUTRAL_TEXTURES))
        _paste(canvas, _texture(kind, bh, bw, rng, _period(min(bw, bh), rng)), _blob_alpha(bh, bw, rng),
               int(rng.integers(-bw // 3, S - bw // 2)), int(rng.integers(-bh // 3, S - bh // 2)))
    # ... and distractors: class outlines with a texture that is not theirs.
    ranges = _size_ranges(S)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(SHAPES)))
        wrong = [t for t in TEXTURES + NEUTRAL_TEXTURES if t != TEXTURES[k]]
        size = int(rng.integers(ranges["small"][0], ranges["medium"][1] // 2 + 1))
        _paste(canvas, _texture(str(rng.choice(wrong)), size, size, rng, _period(size, rng)),
               _shape_alpha(SHAPES[k], size, rng), int(rng.integers(-size // 4, S - size * 3 // 4)),
               int(rng.integers(-size // 4, S - size * 3 // 4)))

    # Objects, each kept only if it and every earlier object stay >= MIN_VISIBLE visible.
    owner = np.full((S, S), -1, np.int32)
    objects: list[dict[str, Any]] = []
    full_px: list[float] = []
    weights = {"small": 0.4, "medium": 0.42, "large": 0.18}
    if ranges["large"][1] <= ranges["large"][0]:
        weights.pop("large")  # images too small for COCO's large objects
    chosen = [k for k in weights if k in scales] or ["medium"]
    probs = np.array([weights[k] for k in chosen])
    have_large = False
    for _ in range(int(rng.integers(1, 7))):
        scale = str(rng.choice(chosen, p=probs / probs.sum()))
        if scale == "large" and have_large:
            scale = "medium"
        lo, hi = ranges[scale]
        size = int(rng.integers(lo, hi + 1))
        k = int(rng.integers(len(CLASSES)))
        alpha = _shape_alpha(SHAPES[k], size, rng)
        area = float((alpha > 0.5).sum())
        for _attempt in range(15):
            margin = size // 6  # objects may be cut by the border a little
            x = int(rng.integers(-margin, S - size + margin + 1))
            y = int(rng.integers(-margin, S - size + margin + 1))
            new = np.zeros((S, S), bool)
            ys0, xs0 = max(y, 0), max(x, 0)
            ys1, xs1 = min(y + size, S), min(x + size, S)
            new[ys0:ys1, xs0:xs1] = alpha[ys0 - y:ys1 - y, xs0 - x:xs1 - x] > 0.5
            if new.sum() < MIN_VISIBLE * area:
                continue
            ok = all(((owner == i) & ~new).sum() >= MIN_VISIBLE * full_px[i] for i in range(len(objects)))
            if ok:
                break
        else:
            continue
        _paste(canvas, _texture(TEXTURES[k], size, size, rng, _period(size, rng)), alpha, x, y)
        owner[new] = len(objects)
        objects.append({"category_id": k + 1})
        full_px.append(area)
        have_large |= scale == "large"

    # Occluders on top: plain blobs that hide part of an object but never too much of it.
    for _ in range(int(rng.integers(0, 3))):
        bw, bh = (int(v) for v in rng.integers(S // 12, S // 5, 2))
        x, y = int(rng.integers(0, S - bw)), int(rng.integers(0, S - bh))
        alpha = _blob_alpha(bh, bw, rng)
        new = np.zeros((S, S), bool)
        new[y:y + bh, x:x + bw] = alpha > 0.5
        if all(((owner == i) & ~new).sum() >= MIN_VISIBLE * full_px[i] for i in range(len(objects))):
            kind = str(rng.choice(NEUTRAL_TEXTURES))
            _paste(canvas, _texture(kind, bh, bw, rng, _period(min(bw, bh), rng)), alpha, x, y)
            owner[new] = -2

    for i, obj in enumerate(objects):
        ys, xs = np.nonzero(owner == i)
        x0, y0 = int(xs.min()), int(ys.min())
        obj["bbox"] = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]

    # Global photometric variation and sensor noise.
    canvas = canvas * rng.uniform(0.8, 1.15) + rng.uniform(-20, 20)
    canvas += rng.normal(0, rng.uniform(2, 7), canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


# ------------------------------------------------------------------------------------- writing
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
