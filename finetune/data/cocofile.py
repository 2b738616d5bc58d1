"""Writing converted labels as COCO JSON, shared by the VOC and YOLO converters and the splitter, and
merging COCO sets (self-training's labeled + pseudo-labeled images, a benchmark's pool).

Where the images are: the images are not copied. Each written JSON stores image ``file_name``s
relative to the JSON's own folder (``os.path.relpath``), which is ``CocoDetection``'s default
``image_root``; the JSONs keep working as long as neither the images nor the JSONs are moved
(otherwise re-run the converter). ``info.image_root`` records the folder, and the command prints it.
Boxes are written as found (after the coordinate conversion); ``CocoDetection`` drops or clips bad
ones when loading and counts them. The converters count and print them too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class ConversionError(Exception):
    """The input labels cannot be converted; the message says what is wrong and where."""


def relative_file_name(image: str | os.PathLike[str], json_dir: str | os.PathLike[str]) -> str:
    """``image`` relative to ``json_dir`` (POSIX separators), absolute if no relative path exists."""
    try:
        rel = os.path.relpath(os.path.abspath(image), os.path.abspath(json_dir))
    except ValueError:  # different drives on Windows
        return Path(os.path.abspath(image)).as_posix()
    return Path(rel).as_posix()


def box_problems(anns: Iterable[dict], images: dict[int, dict]) -> Counter[str]:
    """Count the boxes that ``CocoDetection`` will drop (empty) or clip (reaching outside the image)."""
    c: Counter[str] = Counter()
    for a in anns:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        if w <= 0 or h <= 0:
            c["empty boxes (dropped when loading)"] += 1
        elif x < 0 or y < 0 or x + w > im["width"] + 1e-3 or y + h > im["height"] + 1e-3:
            c["boxes reaching outside the image (clipped when loading)"] += 1
    return c


def write_coco(coco: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a COCO dict as JSON (parent folders created), atomically: a process reading it meanwhile
    (another benchmark over the same set) sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(coco) + "\n")
    os.replace(tmp, path)
    return path


def write_splits(cocos: dict[str, dict[str, Any]], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``<out_dir>/<split>.json`` for each split and print what went where."""
    written = {}
    for split, coco in cocos.items():
        path = write_coco(coco, Path(out_dir) / f"{split}.json")
        imgs = {im["id"]: im for im in coco["images"]}
        used = len({a["category_id"] for a in coco["annotations"]})
        print(f"{path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(coco['categories'])} categories ({used} with boxes)")
        for k, v in box_problems(coco["annotations"], imgs).items():
            print(f"  {k}: {v}")
        written[split] = path
    print(f"image file_names are relative to {os.path.abspath(out_dir)} (the JSONs' folder, CocoDetection's "
          "default image_root); re-run the converter if the images or the JSONs move")
    return written


def merge_coco(parts: Sequence[Mapping[str, Any]],
               image_roots: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One COCO dict from several whose categories are the first's (or some of them).

    Image and box ids are renumbered from 1 so that none collide, each box staying on its image;
    ``file_name``s become absolute (joined to the part's image root: one root for every part or one
    per part; an absolute name stays as it is); a box's ``score`` (pseudo-labels) is dropped. Other
    top-level keys (``info``, ``categories``, ...) come from the first part.

    Raises:
        ValueError: no parts, a root per part of the wrong length, or a part with a category the first
            does not have.
    """
    if not parts:
        raise ValueError("merge_coco needs at least one COCO set")
    roots = ([Path(image_roots)] * len(parts) if isinstance(image_roots, (str, os.PathLike))
             else [Path(r) for r in image_roots])
    if len(roots) != len(parts):
        raise ValueError(f"{len(roots)} image roots for {len(parts)} COCO sets")
    cats = {int(c["id"]): c["name"] for c in parts[0]["categories"]}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k, (part, root) in enumerate(zip(parts, roots)):
        # A later set may name fewer categories (pseudo-labels list the label map's classes, which
        # leaves out e.g. Roboflow's placeholder category), never others.
        other = {int(c["id"]): c["name"] for c in part.get("categories", []) if cats.get(int(c["id"])) != c["name"]}
        if other:
            raise ValueError(f"COCO set {k} has categories the first does not have: {other}; cannot merge")
        new_id = {im["id"]: len(images) + i + 1 for i, im in enumerate(part["images"])}
        images += [{**im, "id": new_id[im["id"]], "file_name": str(root / im["file_name"])} for im in part["images"]]
        anns += [{**{key: v for key, v in a.items() if key != "score"}, "id": len(anns) + i + 1,
                  "image_id": new_id[a["image_id"]]} for i, a in enumerate(part.get("annotations", []))]
    rest = {key: v for key, v in parts[0].items() if key not in ("images", "annotations")}
    return {**rest, "images": images, "annotations": anns}
