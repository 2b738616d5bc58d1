"""A fine-tuning run's labeled sets: where they are (annotation files and image folders from
``data.*``) and how they are loaded.

Explicit paths (``data.train_json``, ``data.val_json``, ``data.*_images``) win; otherwise the
conventional layouts under ``data.root`` are tried in order (COCO's ``annotations/instances_*.json``,
Roboflow's ``train/_annotations.coco.json``, a plain ``train.json``). Synthetic data
(``data.synthetic``) is generated under ``data.root`` first if missing.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.transforms import build_transforms
from pretrain.core.data.coco import CocoDetection

# Conventional layouts under data.root, tried in order (see conf/finetune/data/coco.yaml).
TRAIN_CANDIDATES = ("train.json", "annotations/instances_train*.json", "train/_annotations.coco.json")
VAL_CANDIDATES = ("val.json", "valid.json", "annotations/instances_val*.json", "valid/_annotations.coco.json",
                  "val/_annotations.coco.json")


@dataclass
class DataPaths:
    train_json: Path
    val_json: Path | None
    train_images: Path | None
    val_images: Path | None


def resolve_data_paths(data: Mapping[str, Any]) -> DataPaths:
    """Annotation files and image folders from ``data.*``: explicit paths win, else ``data.root``'s layout.

    Synthetic data (``data.synthetic``) is generated under ``data.root`` first if missing.

    Raises:
        FileNotFoundError: no training annotations could be found; the message lists what was tried.
    """
    root = Path(data["root"]).expanduser() if data.get("root") else None
    if data.get("synthetic") is not None:
        from pretrain.core.data.synthetic import ensure_synthetic

        if root is None:
            raise ValueError("synthetic data needs data.root (where to generate it)")
        ensure_synthetic(root, **dict(data["synthetic"]))
    train_json = _pick(data.get("train_json"), root, TRAIN_CANDIDATES, "train")
    if train_json is None:
        raise FileNotFoundError(
            "no training annotations: set data.train_json=FILE, or data.root=DIR holding one of "
            f"{', '.join(TRAIN_CANDIDATES)}" + (f" (looked in {root})" if root else "")
        )
    val_json = _pick(data.get("val_json"), root, VAL_CANDIDATES, "val")
    return DataPaths(
        train_json=train_json,
        val_json=val_json,
        train_images=_image_root(data.get("train_images"), train_json),
        val_images=_image_root(data.get("val_images"), val_json) if val_json else None,
    )


def _pick(explicit: Any, root: Path | None, patterns: tuple[str, ...], split: str) -> Path | None:
    if explicit:
        p = Path(explicit).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"data.{split}_json={p} does not exist")
        return p
    if root is None:
        return None
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder")
    for pattern in patterns:
        found = sorted(glob.glob(str(root / pattern)))
        if found:
            return Path(found[0]).resolve()
    return None


def _image_root(explicit: Any, ann_file: Path | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if ann_file is not None and ann_file.parent.name == "annotations" and ann_file.stem.startswith("instances_"):
        # COCO layout: annotations/instances_train2017.json describes images in train2017/.
        guess = ann_file.parent.parent / ann_file.stem[len("instances_"):]
        if guess.is_dir():
            return guess
    return None  # CocoDetection's default: the JSON's folder


def build_datasets(cfg: DictConfig, paths: DataPaths) -> tuple[CocoDetection, CocoDetection | None]:
    """Training set with augmentation and the validation set with the training set's label map."""
    aug: dict[str, Any] = OmegaConf.to_container(cfg.augment, resolve=True)  # type: ignore[assignment]
    aug.pop("strong_copy", None)  # applied per step by the module, not per sample
    common = {"max_pixels": cfg.data.get("max_pixels"), "missing": cfg.data.get("missing", "error")}
    train_ds = CocoDetection(paths.train_json, paths.train_images, transforms=build_transforms(True, **aug),  # type: ignore[arg-type]
                             train=True, bad_images="skip", **common)
    if train_ds.num_classes == 0:
        raise ValueError(f"{paths.train_json} has no categories to train on")
    if train_ds.report.boxes == 0:
        raise ValueError(f"{paths.train_json} has no usable boxes to train on ({train_ds.report.summary()})")
    val_ds = None
    if paths.val_json is not None:
        val_ds = CocoDetection(paths.val_json, paths.val_images, transforms=build_transforms(False), train=False,
                               label_map=train_ds.label_map, **common)
    return train_ds, val_ds


def boxes_per_image(ds: CocoDetection) -> tuple[float, int]:
    """The (non-crowd) boxes per image of a labeled set: their mean and the most on one image (0, 0
    for an empty set), in one pass over its annotations."""
    counts = [len(ds.annotations(i)["labels"]) for i in range(len(ds))]
    return sum(counts) / max(1, len(counts)), max(counts, default=0)
