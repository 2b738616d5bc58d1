"""Convert Pascal VOC XML and YOLO txt detection labels to COCO JSON: the command line.

Examples:
    python -m finetune.data.convert voc /data/VOCdevkit/VOC2007 --out data/voc
    python -m finetune.data.convert voc --annotations labels/annots --images labels/images --out data/mine
    python -m finetune.data.convert yolo /data/coco128/data.yaml --out data/coco128

Without ``--out`` the JSONs go to ``coco/`` inside the set's folder: the folder holding the XML
folder (the VOC root, LabelImg's project folder), the XML folder when the images sit beside the
XML, or the YAML's folder. Images are not copied: ``file_name``s are relative
to the JSONs' folder (see :mod:`finetune.data.cocofile`). The formats' conventions and the folder
layouts found are in :mod:`finetune.data.voc` and :mod:`finetune.data.yolo`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from finetune.data.cocofile import ConversionError, relative_file_name, write_coco, write_splits
from finetune.data.voc import VocLayout, find_voc_layout, voc_splits, voc_to_coco
from finetune.data.yolo import yolo_label_path, yolo_to_coco

__all__ = ["ConversionError", "VocLayout", "default_out_dir", "find_voc_layout", "main", "relative_file_name",
           "voc_splits", "voc_to_coco", "write_coco", "write_splits", "yolo_label_path", "yolo_to_coco"]

DEFAULT_OUT = "coco"


def default_out_dir(args: argparse.Namespace) -> Path:
    """``coco/`` inside the set's folder: the folder holding the XML folder (the XML folder itself
    when the images sit beside the XML), or the YAML's folder."""
    if args.format == "voc":
        layout = find_voc_layout(args.root, args.annotations, args.images)
        beside = layout.annotations in layout.images
        return (layout.annotations if beside else layout.annotations.parent) / DEFAULT_OUT
    return args.data_yaml.parent / DEFAULT_OUT


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert VOC XML or YOLO txt labels to COCO JSON.")
    sub = p.add_subparsers(dest="format", required=True)
    v = sub.add_parser("voc", help="Pascal VOC XML: a devkit root (Annotations/, JPEGImages/, "
                                    "ImageSets/Main/), LabelImg's annotations/ + images/, XML beside images, "
                                    "or --annotations/--images")
    v.add_argument("root", type=Path, nargs="?", default=None)
    v.add_argument("--annotations", type=Path, default=None, help="folder of the *.xml files")
    v.add_argument("--images", type=Path, default=None, help="folder of the images (default: found beside)")
    v.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT}/ in the set's folder")
    v.add_argument("--classes", default=None, help="comma-separated class names in id order")
    v.add_argument("--difficult", choices=("crowd", "keep", "drop"), default="crowd")
    y = sub.add_parser("yolo", help="YOLO: data.yaml + images/<split> + labels/<split>/*.txt")
    y.add_argument("data_yaml", type=Path)
    y.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT}/ beside data.yaml")
    y.add_argument("--splits", default="train,val,test", help="comma-separated YAML split keys")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        out = args.out if args.out is not None else default_out_dir(args)
        if args.format == "voc":
            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            cocos = voc_to_coco(args.root, out, classes=classes, difficult=args.difficult,
                                annotations=args.annotations, images=args.images)
        else:
            cocos = yolo_to_coco(args.data_yaml, out, splits=[s for s in args.splits.split(",") if s])
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from e
    write_splits(cocos, out)


if __name__ == "__main__":
    main()
