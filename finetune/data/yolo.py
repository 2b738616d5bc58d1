"""YOLO txt labels (ultralytics ``data.yaml``) to COCO.

Conventions:
    * Category ids are 1..K in the YAML ``names`` order; all K are written to every split.
    * ``path``, ``train``/``val``/``test`` resolve as in ultralytics (split entries are image
      folders, image files, or .txt lists of images; ``path`` relative to the YAML's folder), and
      each ``.../images/...`` image has its labels in ``.../labels/...txt``. Image sizes are the
      EXIF-upright sizes ultralytics normalises by. Segment lines (polygons) become their boxes.
    * Images without a label file are kept as negatives; label files that name no image of the
      split are counted and listed in ``info.orphan_label_files``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from finetune.data.cocofile import ConversionError, relative_file_name
from pretrain.core.data.images import IMAGE_EXTENSIONS, ImageError, image_size

log = logging.getLogger(__name__)


def _yolo_names(data: dict[str, Any], yaml_path: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise ConversionError(f"{yaml_path}: 'names' keys must be 0..nc-1, got {keys[:10]}...")
        names = [str(names[k] if k in names else names[str(k)]) for k in keys]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise ConversionError(f"{yaml_path}: no 'names' list or mapping of class names")
    if "nc" in data and int(data["nc"]) != len(names):
        raise ConversionError(f"{yaml_path}: nc={data['nc']} but {len(names)} names")
    return names


def _split_images(entry: Any, root: Path, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for e in entries:
        p = Path(str(e))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        elif p.suffix.lower() == ".txt" and p.is_file():
            for line in p.read_text().splitlines():
                line = line.strip()
                if not line:
                    continue
                # ultralytics: "./x" is relative to the list file's folder; otherwise to the root.
                q = p.parent / line[2:] if line.startswith("./") else Path(line)
                files.append(q if q.is_absolute() else root / q)
        elif p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
        else:
            raise ConversionError(f"{yaml_path}: split entry {e!r} resolves to {p}, which does not exist")
    return sorted(files)


def yolo_label_path(image: Path) -> Path:
    """ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    s = image.as_posix()
    sa, sb = "/images/", "/labels/"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _orphan_labels(images: list[Path]) -> list[Path]:
    """Label files in the splits' label folders that belong to no image of the split."""
    used = {yolo_label_path(p) for p in images}
    folders = {yolo_label_path(p).parent for p in images}
    return sorted(t for d in folders if d.is_dir() for t in d.glob("*.txt") if t not in used)


def yolo_to_coco(data_yaml: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 splits: Iterable[str] = ("train", "val", "test")) -> dict[str, dict[str, Any]]:
    """Convert a YOLO dataset (``data.yaml`` + txt labels) to one COCO dict per split.

    Raises:
        ConversionError: unreadable YAML, missing split folders or images, malformed label lines.
    """
    yaml_path = Path(data_yaml)
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"cannot read {yaml_path}: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{yaml_path}: not a YOLO data.yaml mapping")
    names = _yolo_names(data, yaml_path)
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else (yaml_path.parent / root)
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]

    out: dict[str, dict[str, Any]] = {}
    for split in splits:
        if not data.get(split):
            continue
        files = _split_images(data[split], root, yaml_path)
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        stats: Counter[str] = Counter()
        unreadable = []
        for path in files:
            try:
                w, h = image_size(path)
            except ImageError as e:
                unreadable.append(str(e))
                continue
            iid = len(images) + 1
            images.append({"id": iid, "file_name": relative_file_name(path, out_dir),
                           "width": w, "height": h})
            label = yolo_label_path(path)
            if not label.is_file():
                stats["images without a label file (kept as negatives)"] += 1
                continue
            for n, line in enumerate(label.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    vals = [float(v) for v in parts]
                except ValueError:
                    stats["unparseable label lines (skipped)"] += 1
                    log.warning("%s:%d: unparseable line %r", label, n, line)
                    continue
                cls = vals[0]
                if cls != int(cls) or not 0 <= cls < len(names):
                    stats["label lines with an unknown class id (skipped)"] += 1
                    log.warning("%s:%d: class id %s not in 0..%d", label, n, parts[0], len(names) - 1)
                    continue
                if len(vals) == 5:
                    cx, cy, bw, bh = vals[1:]
                    x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                elif len(vals) >= 7 and len(vals) % 2 == 1:  # a polygon: cls x1 y1 x2 y2 ...
                    xs, ys = vals[1::2], vals[2::2]
                    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
                    stats["segment lines converted to boxes"] += 1
                else:
                    stats["label lines with a wrong number of values (skipped)"] += 1
                    log.warning("%s:%d: expected 'class cx cy w h' or a polygon, got %r", label, n, line)
                    continue
                if min(x0, y0) < 0 or max(x1, y1) > 1:
                    stats["boxes reaching outside [0, 1] (kept; clipped to the image when loaded)"] += 1
                box = [round(x0 * w, 3), round(y0 * h, 3), round((x1 - x0) * w, 3), round((y1 - y0) * h, 3)]
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(cls) + 1, "bbox": box,
                             "area": round(max(box[2], 0) * max(box[3], 0), 3), "iscrowd": 0})
        orphans = _orphan_labels(files)
        if orphans:
            boxes = sum(sum(1 for ln in o.read_text().splitlines() if ln.strip()) for o in orphans)
            print(f"  {split}: {len(orphans)} label files name no image of the split ({boxes} boxes not "
                  f"converted), e.g. {', '.join(str(o) for o in orphans[:3])}")
        if unreadable:
            raise ConversionError(f"{yaml_path} split {split}: {len(unreadable)} unreadable images "
                                  f"(first: {unreadable[:3]})")
        for k, v in stats.items():
            print(f"  {split}: {k}: {v}")
        out[split] = {
            "info": {"description": f"converted from YOLO {yaml_path}", "source_format": "yolo",
                     "source": str(yaml_path), "split": split, "image_root": os.path.abspath(out_dir),
                     "orphan_label_files": [str(o) for o in orphans]},
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
    if not out:
        raise ConversionError(f"{yaml_path}: none of the splits {list(splits)} is given")
    return out
