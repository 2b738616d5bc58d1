"""Convert Pascal VOC XML and YOLO txt detection labels to COCO JSON.

Examples:
    python -m finetune.data.convert voc /data/VOCdevkit/VOC2007 --out data/voc
    python -m finetune.data.convert voc --annotations labels/annots --images labels/images --out data/mine
    python -m finetune.data.convert yolo /data/coco128/data.yaml --out data/coco128

Where the images are: the images are not copied. Each written JSON stores image ``file_name``s
relative to the JSON's own folder (``os.path.relpath``), which is ``CocoDetection``'s default
``image_root``; the JSONs keep working as long as neither the images nor the JSONs are moved
(otherwise re-run the converter). ``info.image_root`` records the folder, and the command prints it.

Conventions:
    * Category ids are 1..K in class order: the YAML ``names`` order for YOLO, ``--classes`` or
      the sorted class names found in all XML files for VOC; all K are written to every split.
    * VOC: coordinates are 1-based inclusive pixel indices, so (as detectron2 and the VOC devkit
      do) ``x = xmin - 1``, ``w = xmax - xmin + 1``; a ``xmin == xmax`` box is one pixel wide.
      ``difficult`` objects become crowd boxes by default (``--difficult crowd``): COCOeval then
      ignores detections on them as the VOC protocol does, and training leaves them out; they
      carry ``"difficult": 1``. ``--difficult keep`` makes them ordinary boxes, ``drop`` omits them.
      Splits come from ``ImageSets/Main/<split>.txt``; ``trainval`` is skipped when it is just
      ``train`` + ``val``; without ImageSets everything goes to ``all.json``. Layouts: the devkit's,
      LabelImg's (``annotations/`` or ``annots/`` beside ``images/``), XML beside the images, or
      ``--annotations DIR --images DIR``; an XML's image is its ``<filename>`` (or that name's last
      part) or ``<xml stem>.<ext>`` in the image folder.
    * YOLO: ``path``, ``train``/``val``/``test`` resolve as in ultralytics (split entries are image
      folders, image files, or .txt lists of images; ``path`` relative to the YAML's folder), and
      each ``.../images/...`` image has its labels in ``.../labels/...txt``. Image sizes are the
      EXIF-upright sizes ultralytics normalises by. Segment lines (polygons) become their boxes.
    * Boxes are written as found (after the coordinate conversion); ``CocoDetection`` drops or
      clips bad ones when loading and counts them. The converters count and print them too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.core.images import IMAGE_EXTENSIONS, ImageError, image_size

log = logging.getLogger(__name__)


class ConversionError(Exception):
    """The input labels cannot be converted; the message says what is wrong and where."""


def relative_file_name(image: str | os.PathLike[str], json_dir: str | os.PathLike[str]) -> str:
    """``image`` relative to ``json_dir`` (POSIX separators), absolute if no relative path exists."""
    try:
        rel = os.path.relpath(os.path.abspath(image), os.path.abspath(json_dir))
    except ValueError:  # different drives on Windows
        return Path(os.path.abspath(image)).as_posix()
    return Path(rel).as_posix()


def _box_problems(anns: Iterable[dict], images: dict[int, dict]) -> Counter[str]:
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
    """Write a COCO dict as JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco) + "\n")
    return path


# ---------------------------------------------------------------------------------------- VOC
ANNOTATION_DIRS = ("Annotations", "annotations", "annots", "Annots", "xml", "labels")
IMAGE_DIRS = ("JPEGImages", "images", "Images", "imgs", "img")


@dataclass(frozen=True)
class VocLayout:
    """Where a VOC-XML set keeps its files: the devkit layout (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main``), LabelImg's ``annotations/`` (or ``annots/``) beside ``images/``, XML files
    beside their images, or any two folders given by hand."""

    annotations: Path
    images: tuple[Path, ...]
    image_sets: Path | None = None

    @property
    def name(self) -> Path:
        return self.annotations.parent if self.annotations.name in ANNOTATION_DIRS else self.annotations


def _has_xml(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.xml"))


def find_voc_layout(root: str | os.PathLike[str] | None = None, annotations: str | os.PathLike[str] | None = None,
                    images: str | os.PathLike[str] | None = None) -> VocLayout:
    """Find the XML and image folders of a VOC-XML set.

    Args:
        root: a VOC root, a folder holding one (depth <= 2), a LabelImg-style folder with an
            annotation and an image folder, or a folder of images with their XML beside them.
        annotations: the folder of ``*.xml`` files, given by hand (``root`` then is not needed).
        images: the image folder; default: found beside the annotations, or the annotations folder.

    Raises:
        ConversionError: nothing that looks like VOC XML, or several candidates.
    """
    if annotations is not None:
        ann = Path(annotations)
        if not _has_xml(ann):
            raise ConversionError(f"--annotations {ann}: no *.xml files there")
        if images is not None:
            imgs: tuple[Path, ...] = (Path(images),)
        else:
            imgs = tuple(d for d in (ann.parent / n for n in IMAGE_DIRS) if d.is_dir()) or (ann,)
        sets = ann.parent / "ImageSets" / "Main"
        return VocLayout(ann, imgs, sets if sets.is_dir() and ann.name == "Annotations" else None)
    if root is None:
        raise ConversionError("give a VOC root folder, or --annotations DIR (and --images DIR)")
    base = Path(root)
    if not base.is_dir():
        raise ConversionError(f"{base}: no such folder")
    if not any(_has_xml(base / n) for n in ANNOTATION_DIRS) and _has_xml(base):
        return VocLayout(base, (Path(images),) if images else (base,))  # XML beside the images
    for pattern in ("", "*", "*/*"):  # the shallowest level that has one
        level = [base] if not pattern else sorted(p for p in base.glob(pattern) if p.is_dir())
        found = [find_voc_layout(annotations=ann, images=images) for folder in level
                 for ann in [next((folder / n for n in ANNOTATION_DIRS if _has_xml(folder / n)), None)] if ann]
        if len(found) == 1:
            return found[0]
        if found:
            roots = ", ".join(str(f.annotations) for f in found)
            raise ConversionError(f"{base}: several VOC annotation folders found ({roots}); pass one of them, "
                                  "or --annotations DIR --images DIR")
    raise ConversionError(
        f"{base}: no VOC XML found: expected Annotations/*.xml + JPEGImages/ (VOC devkit), "
        "annotations/ or annots/ + images/ (LabelImg), or *.xml beside the images; or pass "
        "--annotations DIR --images DIR")


def _text(node: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else default


def _parse_voc_xml(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ConversionError(f"{path}: not valid XML ({e})") from e
    size = root.find("size")
    objects = []
    for obj in root.iter("object"):
        name = _text(obj, "name")
        box = obj.find("bndbox")
        if not name or box is None:
            raise ConversionError(f"{path}: <object> without <name> or <bndbox>")
        try:
            # Some tools write float coordinates ("273.5"); keep them as floats.
            coords = [float(_text(box, k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise ConversionError(f"{path}: non-numeric box coordinate in object {name!r} ({e})") from e
        difficult = _text(obj, "difficult", "0") or "0"
        objects.append({"name": name, "coords": coords, "difficult": difficult in ("1", "true", "True")})
    return {
        "filename": _text(root, "filename"),
        "width": int(float(_text(size, "width", "0") or 0)),
        "height": int(float(_text(size, "height", "0") or 0)),
        "objects": objects,
    }


def _voc_image(layout: VocLayout, stem: str, filename: str | None) -> Path | None:
    """The image of ``<stem>.xml``: its ``<filename>`` (as written, or its base name: tools write
    paths of the labelling machine), else ``<stem>.<any image extension>``, in each image folder."""
    for folder in layout.images:
        if filename:
            for name in (filename, Path(filename.replace("\\", "/")).name):
                if (folder / name).is_file():
                    return folder / name
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                if (folder / f"{stem}{e}").is_file():
                    return folder / f"{stem}{e}"
    return None


def voc_splits(layout: VocLayout) -> dict[str, list[str]]:
    """Image ids per split from ``ImageSets/Main/<split>.txt`` (``{"all": every xml}`` without them)."""
    main = layout.image_sets
    # Per-class lists (aeroplane_train.txt) hold "<id> 1/-1" rows and carry "_" in their name.
    files = sorted(p for p in main.glob("*.txt") if "_" not in p.stem) if main and main.is_dir() else []
    splits = {p.stem: [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()] for p in files}
    if {"trainval", "train", "val"} <= set(splits) and \
            set(splits["trainval"]) == set(splits["train"]) | set(splits["val"]):
        print("skipping ImageSets/Main/trainval.txt: it is train + val")
        del splits["trainval"]
    if not splits:
        splits = {"all": sorted(p.stem for p in layout.annotations.glob("*.xml"))}
        print(f"no ImageSets/Main split lists: all {len(splits['all'])} XML files go to all.json")
    return splits


def voc_to_coco(root: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                classes: list[str] | None = None, difficult: str = "crowd",
                annotations: str | os.PathLike[str] | None = None,
                images: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Convert a Pascal VOC-XML set to one COCO dict per split (file_names relative to ``out_dir``).

    Args:
        root: a VOC root, LabelImg-style folder or folder of images + XML (see :func:`find_voc_layout`);
            None with ``annotations``.
        out_dir: where the JSONs will be written (file_names are made relative to it).
        classes: class names in category-id order; default: sorted names found in all XMLs.
        difficult: ``"crowd"``, ``"keep"`` or ``"drop"`` for ``<difficult>1</difficult>`` objects.
        annotations: the XML folder, given by hand.
        images: the image folder, given by hand.

    Raises:
        ConversionError: missing XML/images, unknown class names, malformed XML.
    """
    if difficult not in ("crowd", "keep", "drop"):
        raise ValueError(f"difficult must be crowd, keep or drop, got {difficult!r}")
    layout = find_voc_layout(root, annotations, images)
    voc = layout.name
    splits = voc_splits(layout)
    stems = sorted({s for ids in splits.values() for s in ids})
    missing_xml = [s for s in stems if not (layout.annotations / f"{s}.xml").is_file()]
    if missing_xml:
        raise ConversionError(f"{voc}: {len(missing_xml)} listed ids have no {layout.annotations.name}/<id>.xml "
                              f"(first: {missing_xml[:5]})")
    parsed = {s: _parse_voc_xml(layout.annotations / f"{s}.xml") for s in stems}
    found = sorted({o["name"] for p in parsed.values() for o in p["objects"]})
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConversionError(f"{voc}: class names {unknown} are not in --classes {classes}")
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    image_paths = {s: _voc_image(layout, s, parsed[s]["filename"]) for s in stems}
    missing = [s for s, p in image_paths.items() if p is None]
    if missing:
        where = ", ".join(str(d) for d in layout.images)
        raise ConversionError(f"{voc}: {len(missing)} annotated images are missing from {where} "
                              f"(first: {missing[:5]}); pass --images DIR if they are elsewhere")
    # One id per image across splits, so merged splits never collide.
    image_id = {s: i + 1 for i, s in enumerate(stems)}

    out: dict[str, dict[str, Any]] = {}
    for split, ids in splits.items():
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for s in ids:
            p, path = parsed[s], image_paths[s]
            assert path is not None
            w, h = p["width"], p["height"]
            if w <= 0 or h <= 0:
                w, h = image_size(path)
            images.append({"id": image_id[s], "file_name": relative_file_name(path, out_dir), "width": w,
                           "height": h})
            for o in p["objects"]:
                if o["difficult"] and difficult == "drop":
                    continue
                xmin, ymin, xmax, ymax = o["coords"]
                bw, bh = xmax - xmin + 1, ymax - ymin + 1
                ann = {"id": len(anns) + 1, "image_id": image_id[s], "category_id": cat_id[o["name"]],
                       "bbox": [xmin - 1, ymin - 1, bw, bh], "area": max(bw, 0) * max(bh, 0),
                       "iscrowd": int(o["difficult"] and difficult == "crowd")}
                if o["difficult"]:
                    ann["difficult"] = 1
                anns.append(ann)
        out[split] = {
            "info": {"description": f"converted from Pascal VOC {voc}", "source_format": "voc",
                     "source": str(voc), "split": split, "image_root": os.path.abspath(out_dir),
                     "difficult": difficult},
            "images": images,
            "annotations": anns,
            "categories": [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in classes],
        }
    return out


# --------------------------------------------------------------------------------------- YOLO
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


# ----------------------------------------------------------------------------------------- CLI
def write_splits(cocos: dict[str, dict[str, Any]], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``<out_dir>/<split>.json`` for each split and print what went where."""
    written = {}
    for split, coco in cocos.items():
        path = write_coco(coco, Path(out_dir) / f"{split}.json")
        imgs = {im["id"]: im for im in coco["images"]}
        used = len({a["category_id"] for a in coco["annotations"]})
        print(f"{path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(coco['categories'])} categories ({used} with boxes)")
        for k, v in _box_problems(coco["annotations"], imgs).items():
            print(f"  {k}: {v}")
        written[split] = path
    print(f"image file_names are relative to {os.path.abspath(out_dir)} (the JSONs' folder, CocoDetection's "
          "default image_root); re-run the converter if the images or the JSONs move")
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert VOC XML or YOLO txt labels to COCO JSON.")
    sub = p.add_subparsers(dest="format", required=True)
    v = sub.add_parser("voc", help="Pascal VOC XML: a devkit root (Annotations/, JPEGImages/, ImageSets/Main/), "
                                    "LabelImg's annotations/ + images/, XML beside images, or --annotations/--images")
    v.add_argument("root", type=Path, nargs="?", default=None)
    v.add_argument("--annotations", type=Path, default=None, help="folder of the *.xml files")
    v.add_argument("--images", type=Path, default=None, help="folder of the images (default: found beside)")
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--classes", default=None, help="comma-separated class names in id order")
    v.add_argument("--difficult", choices=("crowd", "keep", "drop"), default="crowd")
    y = sub.add_parser("yolo", help="YOLO: data.yaml + images/<split> + labels/<split>/*.txt")
    y.add_argument("data_yaml", type=Path)
    y.add_argument("--out", type=Path, required=True)
    y.add_argument("--splits", default="train,val,test", help="comma-separated YAML split keys")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.format == "voc":
            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            cocos = voc_to_coco(args.root, args.out, classes=classes, difficult=args.difficult,
                                annotations=args.annotations, images=args.images)
        else:
            cocos = yolo_to_coco(args.data_yaml, args.out, splits=[s for s in args.splits.split(",") if s])
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from e
    write_splits(cocos, args.out)


if __name__ == "__main__":
    main()
