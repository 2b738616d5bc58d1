"""Dataset report: what a COCO JSON holds, per class and per COCO size bucket.

Example:
    python -m finetune.data.report data/synthetic/train.json [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pretrain.core.data.coco import CocoDetection

# COCO's size buckets (area in pixels), as used by COCOeval's APs/APm/APl.
SMALL_MAX = 32**2
MEDIUM_MAX = 96**2


def size_bucket(area: float) -> str:
    """COCO's bucket of a box area: ``small`` (< 32^2), ``medium`` or ``large`` (> 96^2)."""
    return "small" if area < SMALL_MAX else ("medium" if area <= MEDIUM_MAX else "large")


def summarize(ann_file: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
              check_files: bool = True) -> dict[str, Any]:
    """Load ``ann_file`` as :class:`CocoDetection` does and count what it holds.

    Returns:
        A JSON-ready dict: images, images_without_boxes, boxes, crowd, classes, per_class
        ({name: {"boxes", "images", "small", "medium", "large"}}), sizes ({bucket: n}),
        image_sizes ({"WxH": n}, the 10 most common), and fixes (what loading repaired).
    """
    ds = CocoDetection(ann_file, image_root=image_root, train=False,
                       missing="error" if check_files else "skip", check_files=check_files)
    per_class: dict[str, dict[str, int]] = {
        n: {"boxes": 0, "images": 0, "small": 0, "medium": 0, "large": 0} for n in ds.class_names}
    sizes: Counter[str] = Counter()
    image_sizes: Counter[str] = Counter()
    for i in range(len(ds)):
        info = ds.image_info(i)
        image_sizes[f"{info['width']}x{info['height']}"] += 1
        t = ds.annotations(i, include_crowd=False)
        for lbl in set(t["labels"].tolist()):
            per_class[ds.class_names[lbl - 1]]["images"] += 1
        for (x1, y1, x2, y2), lbl in zip(t["boxes"].tolist(), t["labels"].tolist()):
            bucket = size_bucket((x2 - x1) * (y2 - y1))
            row = per_class[ds.class_names[lbl - 1]]
            row["boxes"] += 1
            row[bucket] += 1
            sizes[bucket] += 1
    r = ds.report
    return {
        "ann_file": str(ann_file),
        "images": r.images,
        "images_without_boxes": r.images_without_boxes,
        "boxes": r.boxes,
        "crowd": r.crowd,
        "classes": r.classes,
        "per_class": per_class,
        "sizes": {b: sizes[b] for b in ("small", "medium", "large")},
        "image_sizes": dict(image_sizes.most_common(10)),
        "fixes": r.fixes(),
        "placeholder_categories": r.ignored_categories,
    }


def format_report(s: dict[str, Any]) -> str:
    """Render :func:`summarize`'s dict as a short text table."""
    lines = [
        f"{s['ann_file']}",
        (f"  images {s['images']} ({s['images_without_boxes']} without boxes), boxes {s['boxes']} "
         f"(+{s['crowd']} crowd), classes {s['classes']}"),
        "  box sizes (COCO buckets): " + ", ".join(f"{k} {v}" for k, v in s["sizes"].items()),
        "  image sizes: " + ", ".join(f"{k}: {v}" for k, v in s["image_sizes"].items()),
    ]
    if s["fixes"]:
        lines.append("  fixed on load: " + ", ".join(f"{k} {v}" for k, v in s["fixes"].items()))
    if s["placeholder_categories"]:
        lines.append(f"  placeholder categories (not classes): {s['placeholder_categories']}")
    width = max([len(n) for n in s["per_class"]] + [5])
    lines.append(f"  {'class':<{width}} {'boxes':>6} {'images':>6} {'small':>6} {'medium':>6} {'large':>6}")
    for name, row in s["per_class"].items():
        lines.append(f"  {name:<{width}} {row['boxes']:>6} {row['images']:>6} {row['small']:>6} "
                     f"{row['medium']:>6} {row['large']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print what a COCO detection JSON holds.")
    p.add_argument("ann_file", type=Path, nargs="+")
    p.add_argument("--image-root", type=Path, default=None, help="default: each JSON's folder")
    p.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for f in args.ann_file:
        s = summarize(f, args.image_root, check_files=not args.no_check_files)
        print(json.dumps(s, indent=2) if args.json else format_report(s))


if __name__ == "__main__":
    main()
