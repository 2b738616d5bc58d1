"""Drawing one synthetic scene: textured shapes on cluttered textured backgrounds (the pictures of
:mod:`pretrain.core.data.synthetic`, which writes them as a COCO set).

Each class is a (shape, texture) pair: a striped disc, a checkered square, a dotted triangle, a
grid-hatched ring and a wavy cross. Colours are random per object, so colour says nothing. The
backgrounds use the same vocabulary sparsely: irregular blobs filled with the class textures, and
distractor shapes of the class outlines filled with the *wrong* texture (a checkered disc is not
an object). Objects come at COCO's three scales, overlap partially (each keeps at least 60% of its
pixels visible) and are cut by the image border now and then. Boxes are the tight box of the
visible pixels, as in COCO.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checker", "dots", "grid", "waves")
CLASSES = ("striped_disc", "checkered_square", "dotted_triangle", "grid_ring", "wavy_cross")
# Textures that no class owns; distractors and occluders use them together with mismatched ones.
NEUTRAL_TEXTURES = ("solid", "noise", "gradient")
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
