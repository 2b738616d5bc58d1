"""A COCO set at its working resolution: images downscaled once, boxes scaled with them.

    python -m finetune.data.resize chess/train/_annotations.coco.json out/chess480/train --long-side 480

A detector that trains at a 320 px short side on 2048 px photographs decodes, augments and then
throws away ~95% of every image's pixels, every step (the semi stage's strong view too, where a blur
at 2048 px does nothing at 320 px). Downscaling once to just above the working size leaves what the
detector sees unchanged and saves that work. Images are read as the training loader reads them (EXIF
orientation, RGBA composited), resized with Lanczos to at most ``long_side`` and written atomically;
annotations (``bbox``, ``area``, polygon ``segmentation``) are scaled by each image's own factor. A
re-run into the same folder skips images already written at that size. Evaluate a model trained on
the copy on a copy of the validation set made the same way: AP and AP50 do not depend on the scale,
APs/APm/APl do (COCO's area thresholds are absolute, 32^2 and 96^2 px).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.data.cocofile import write_coco


def _scale_ann(ann: dict[str, Any], sx: float, sy: float) -> dict[str, Any]:
    out = dict(ann)
    x, y, w, h = ann["bbox"]
    out["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    if "area" in ann:
        out["area"] = ann["area"] * sx * sy
    seg = ann.get("segmentation")
    if isinstance(seg, list):  # polygons (x, y, x, y, ...); RLE masks would need decoding and are left out
        out["segmentation"] = [[v * (sy if i % 2 else sx) for i, v in enumerate(poly)] for poly in seg]
    elif isinstance(seg, dict):
        out.pop("segmentation")
    return out


def img_format(path: Path) -> str:
    return "PNG" if path.suffix.lower() == ".png" else "JPEG"


def _written(dst: Path, size: tuple[int, int]) -> bool:
    """An image written by an earlier run at this size (a re-run at another size rewrites it)."""
    if not dst.is_file():
        return False
    try:
        with Image.open(dst) as img:
            return img.size == size
    except OSError:
        return False


def _load_as_annotated(path: Path, size: tuple[int, int], ann_file: Path) -> Image.Image:
    from pretrain.core.data.images import ImageError, load_rgb

    try:
        img = load_rgb(path)
        if img.size != size:
            raw = load_rgb(path, exif_transpose=False)
            if raw.size == size:
                return raw  # the boxes were drawn on the stored pixels (the loader's rule)
    except ImageError as e:
        raise FileNotFoundError(f"{ann_file}: {e}") from e
    if img.size != size:
        raise ValueError(f"{path}: {img.width}x{img.height} pixels, {ann_file} says {size[0]}x{size[1]}")
    return img


def resize_coco(ann_file: str | os.PathLike[str], out_dir: str | os.PathLike[str], long_side: int,
                image_root: str | os.PathLike[str] | None = None, quality: int = 95) -> Path:
    """Write ``out_dir/<ann_file's name>`` and its images at most ``long_side`` px on the long side.

    Returns the written JSON. Raises ``FileNotFoundError`` naming the first missing image.
    """
    if long_side < 32:
        raise ValueError(f"long_side={long_side}: a working resolution below 32 px cannot hold a detection")
    src = Path(ann_file)
    root = Path(image_root) if image_root is not None else src.parent
    out = Path(out_dir)
    coco = json.loads(src.read_text())
    images, scale = [], {}
    for im in coco["images"]:
        dst = out / "images" / f"{im['id']}_{Path(im['file_name']).name}"  # unique: names may repeat across folders
        w, h = int(im["width"]), int(im["height"])
        s = min(1.0, long_side / max(w, h))
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        if not _written(dst, (nw, nh)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            # The training loader's reading: upright by EXIF unless the JSON's size says the boxes
            # were drawn on the stored pixels, RGBA composited; a size it would rescale is refused.
            img = _load_as_annotated(root / im["file_name"], (w, h), src)
            if s < 1.0:
                img = img.resize((nw, nh), Image.Resampling.LANCZOS)
            tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")  # per process: two benchmarks may resize one set
            img.save(tmp, format=img_format(dst), quality=quality)
            os.replace(tmp, dst)  # a killed run leaves no truncated image behind
        scale[im["id"]] = (nw / w, nh / h)
        images.append({**im, "file_name": f"images/{dst.name}", "width": nw, "height": nh})
    anns = [_scale_ann(a, *scale[a["image_id"]]) for a in coco.get("annotations", [])]
    info = {**(coco.get("info") or {}), "resized_from": str(src), "long_side": long_side}
    return write_coco({**coco, "info": info, "images": images, "annotations": anns}, out / src.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ann_file", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--long-side", type=int, required=True)
    p.add_argument("--image-root", type=Path, default=None)
    a = p.parse_args(argv)
    print(f"wrote {resize_coco(a.ann_file, a.out_dir, a.long_side, a.image_root)}")


if __name__ == "__main__":
    main()
