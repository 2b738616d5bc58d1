"""Pascal VOC XML to COCO, from any folder layout.

Layouts: the devkit's (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main``), LabelImg's
(``annotations/`` or ``annots/`` beside ``images/``), XML beside the images, or ``--annotations DIR
--images DIR``; an XML's image is its ``<filename>`` (or that name's last part: tools write paths of
the labelling machine) or ``<xml stem>.<ext>`` in the image folder.

Conventions:
    * Category ids are 1..K in ``--classes`` order, or the sorted class names found in all XML
      files; all K are written to every split.
    * Coordinates are 1-based inclusive pixel indices, so (as detectron2 and the VOC devkit do)
      ``x = xmin - 1``, ``w = xmax - xmin + 1``; a ``xmin == xmax`` box is one pixel wide.
    * ``difficult`` objects become crowd boxes by default (``difficult="crowd"``): COCOeval then
      ignores detections on them as the VOC protocol does, and training leaves them out; they
      carry ``"difficult": 1``. ``"keep"`` makes them ordinary boxes, ``"drop"`` omits them.
    * Splits come from ``ImageSets/Main/<split>.txt``; ``trainval`` is skipped when it is just
      ``train`` + ``val``; without ImageSets everything goes to ``all.json`` (and the tool says so).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.cocofile import ConversionError, relative_file_name
from pretrain.core.data.images import IMAGE_EXTENSIONS, image_size

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


def find_voc_layout(root: str | os.PathLike[str] | None = None,
                    annotations: str | os.PathLike[str] | None = None,
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
        anns = [next((folder / n for n in ANNOTATION_DIRS if _has_xml(folder / n)), None) for folder in level]
        found = [find_voc_layout(annotations=ann, images=images) for ann in anns if ann]
        if len(found) == 1:
            return found[0]
        if found:
            roots = ", ".join(str(f.annotations) for f in found)
            raise ConversionError(f"{base}: several VOC annotation folders found ({roots}); pass one of "
                                  "them, or --annotations DIR --images DIR")
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
        "xml": str(path),
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
        raise ConversionError(f"{voc}: {len(missing_xml)} listed ids have no "
                              f"{layout.annotations.name}/<id>.xml (first: {missing_xml[:5]})")
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
    dropped: list[str] = []
    for split, ids in splits.items():
        split_images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for s in ids:
            p, path = parsed[s], image_paths[s]
            assert path is not None
            w, h = p["width"], p["height"]
            if w <= 0 or h <= 0:
                w, h = image_size(path)
            split_images.append({"id": image_id[s], "file_name": relative_file_name(path, out_dir), "width": w,
                           "height": h})
            for o in p["objects"]:
                if o["difficult"] and difficult == "drop":
                    continue
                xmin, ymin, xmax, ymax = o["coords"]
                if not (xmax >= xmin and ymax >= ymin):  # also NaN from a missing coordinate
                    dropped.append(f"{p['xml']}: {o['name']} ({xmin}, {ymin}, {xmax}, {ymax})")
                    continue
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
            "images": split_images,
            "annotations": anns,
            "categories": [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in classes],
        }
    if dropped:
        print(f"  {len(dropped)} boxes with max < min or a missing coordinate (dropped), e.g. {dropped[:3]}")
    return out
