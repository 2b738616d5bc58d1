"""Draw the labeled fraction of a COCO set, as in the semi-supervised detection literature.

Example:
    python -m finetune.data.split data/coco/train.json --fraction 0.1 --seed 1 --out data/coco/10pct_seed1

writes ``labeled.json`` (the drawn fraction) and ``unlabeled.json`` (the rest, annotations kept as
hidden ground truth and flagged ``info.hidden_ground_truth = true``; training code must ignore
them). The supervised baseline and the teacher-student run both read the same ``labeled.json``.

The draw is a permutation of the sorted image ids by ``numpy.random.default_rng(seed)`` (PCG64,
identical on every platform), so the same file, fraction and seed give the same split anywhere.
Every class that has boxes gets at least one labeled image when the budget allows it: images are
first taken greedily for the rarest uncovered class (the first such image in the permutation), then
the permutation fills the rest. When the budget is smaller than the number of images the cover
needs, the rarest classes are covered first and the others are reported with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.cocofile import relative_file_name, write_coco

log = logging.getLogger(__name__)


class ClassCoverageWarning(UserWarning):
    """The labeled budget is too small for one labeled image per class."""


def labeled_count(num_images: int, fraction: float | None = None, num_labeled: int | None = None) -> int:
    """The number of labeled images: ``round(fraction * N)`` (at least 1) or ``num_labeled``."""
    if (fraction is None) == (num_labeled is None):
        raise ValueError("give exactly one of fraction and num_labeled")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return min(num_images, max(1, math.floor(fraction * num_images + 0.5)))
    assert num_labeled is not None
    if not 0 < num_labeled <= num_images:
        raise ValueError(f"num_labeled must be in 1..{num_images}, got {num_labeled}")
    return num_labeled


def choose_labeled(coco: dict[str, Any], n: int, seed: int) -> tuple[list[int], list[int]]:
    """Pick ``n`` labeled image ids covering the classes (see module docstring).

    Returns:
        ``(labeled_ids, uncovered_category_ids)``, labeled ids sorted.
    """
    ids = sorted(int(im["id"]) for im in coco["images"])
    order = [int(i) for i in np.random.default_rng(seed).permutation(np.array(ids, dtype=np.int64))]
    rank = {iid: r for r, iid in enumerate(order)}
    images_of: dict[int, set[int]] = defaultdict(set)
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0) and int(a["image_id"]) in rank:
            images_of[int(a["category_id"])].add(int(a["image_id"]))
    classes_of: dict[int, set[int]] = defaultdict(set)
    for c, imgs in images_of.items():
        for i in imgs:
            classes_of[i].add(c)

    chosen: list[int] = []
    covered: set[int] = set()
    # Rarest first: with a tight budget the classes that are hardest to find get their image.
    for c in sorted(images_of, key=lambda c: (len(images_of[c]), c)):
        if c in covered or len(chosen) >= n:
            continue
        pick = min(images_of[c], key=rank.__getitem__)
        chosen.append(pick)
        covered |= classes_of[pick]
    taken = set(chosen)
    for iid in order:
        if len(chosen) >= n:
            break
        if iid not in taken:
            chosen.append(iid)
            taken.add(iid)
    uncovered = sorted(set(images_of) - covered)
    return sorted(chosen), uncovered


def _subset(coco: dict[str, Any], ids: set[int], image_root: Path, out_dir: Path,
            info: dict[str, Any]) -> dict[str, Any]:
    images = []
    for im in coco["images"]:
        if int(im["id"]) in ids:
            im = dict(im)
            if not os.path.isabs(im["file_name"]) and image_root.resolve() != out_dir.resolve():
                im["file_name"] = relative_file_name(image_root / im["file_name"], out_dir)
            images.append(im)
    anns = [a for a in coco["annotations"] if int(a["image_id"]) in ids]
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "info")}
    out.update(info={**(coco.get("info") or {}), **info}, images=images, annotations=anns)
    return out


def split_coco(
    ann_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fraction: float | None = None,
    seed: int = 1,
    num_labeled: int | None = None,
    image_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/labeled.json`` and ``out_dir/unlabeled.json`` from ``ann_file``.

    Args:
        ann_file: the full labeled set (COCO JSON).
        out_dir: output folder; image file_names are rewritten to stay valid from it.
        fraction: labeled fraction of the images (e.g. 0.01, 0.05, 0.1); or give ``num_labeled``.
        seed: the split seed.
        image_root: folder the source file_names are relative to; default: ``ann_file``'s folder.

    Returns:
        ``{"labeled": Path, "unlabeled": Path, "num_labeled", "num_unlabeled", "uncovered": [names]}``.
    """
    src = Path(ann_file)
    out = Path(out_dir)
    coco = json.loads(src.read_text())
    if not isinstance(coco.get("images"), list) or not coco["images"]:
        raise ValueError(f"{src}: no images to split")
    coco.setdefault("annotations", [])
    n = labeled_count(len(coco["images"]), fraction, num_labeled)
    labeled, uncovered = choose_labeled(coco, n, seed)
    names = {int(c["id"]): str(c["name"]) for c in coco.get("categories", [])}
    uncovered_names = [names.get(c, str(c)) for c in uncovered]
    if uncovered:
        msg = (f"{n} labeled images cannot cover every class: {len(uncovered)} classes have no labeled "
               f"image ({', '.join(uncovered_names[:10])}{' ...' if len(uncovered) > 10 else ''}); "
               "raise the fraction")
        warnings.warn(msg, ClassCoverageWarning, stacklevel=2)
        print(f"warning: {msg}")
    meta = {"split_source": os.path.abspath(src), "split_seed": seed, "split_fraction": fraction,
            "split_num_labeled": len(labeled), "split_num_images": len(coco["images"]),
            "uncovered_classes": uncovered_names}
    root = Path(image_root) if image_root is not None else src.parent
    lab_ids = set(labeled)
    rest = {int(im["id"]) for im in coco["images"]} - lab_ids
    lab = _subset(coco, lab_ids, root, out, {**meta, "split_part": "labeled"})
    unl = _subset(coco, rest, root, out,
                  {**meta, "split_part": "unlabeled", "hidden_ground_truth": True})
    lab_path = write_coco(lab, out / "labeled.json")
    unl_path = write_coco(unl, out / "unlabeled.json")
    print(f"{lab_path}: {len(lab['images'])} images, {len(lab['annotations'])} boxes "
          f"(fraction={fraction}, seed={seed}, from {len(coco['images'])} images of {src})")
    print(f"{unl_path}: {len(unl['images'])} images (annotations kept as hidden ground truth)")
    return {"labeled": lab_path, "unlabeled": unl_path, "num_labeled": len(lab["images"]),
            "num_unlabeled": len(unl["images"]), "uncovered": uncovered_names}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Split a COCO JSON into a labeled fraction and the rest.")
    p.add_argument("ann_file", type=Path)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="labeled fraction of the images, e.g. 0.1")
    g.add_argument("--num-labeled", type=int, help="number of labeled images")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-root", type=Path, default=None, help="default: the JSON's folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        split_coco(args.ann_file, args.out, fraction=args.fraction, seed=args.seed,
                   num_labeled=args.num_labeled, image_root=args.image_root)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
