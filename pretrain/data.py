"""Data for pretraining: the unlabeled images with a method's multi-view transform, and kNN crops."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pretrain.core.synthetic import ensure_synthetic
from pretrain.core.unlabeled import UnlabeledImages
from pretrain.knn import BoxCrops

log = logging.getLogger(__name__)


def unlabeled_source(data_cfg: Mapping[str, Any]) -> Path:
    """The folder or COCO JSON to pretrain on; the built-in synthetic set when ``root`` is null."""
    root = data_cfg.get("root")
    if root:
        path = Path(str(root)).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"data.root={root} does not exist; give a folder of images or a COCO JSON "
                "(or leave data.root unset for the built-in synthetic set)"
            )
        if path.is_file() and path.suffix.lower() != ".json":
            raise ValueError(f"data.root={root} is a file but not a COCO JSON; give a folder or a .json")
        return path
    out = ensure_synthetic(Path(str(data_cfg["synthetic_dir"])), **dict(data_cfg.get("synthetic") or {}))
    return Path(out["unlabeled"])


def train_loader(data_cfg: Mapping[str, Any], transform: Callable[[Any], Any]) -> DataLoader:
    """Shuffled, ``drop_last`` loader of ``transform(image)`` (a list of views) per image.

    Under DDP Lightning swaps in a DistributedSampler itself.
    """
    source = unlabeled_source(data_cfg)
    max_pixels = data_cfg.get("max_pixels")
    dataset = (UnlabeledImages(source, transform=transform, max_pixels=int(max_pixels)) if max_pixels
               else UnlabeledImages(source, transform=transform))
    batch_size = int(data_cfg["batch_size"])
    if len(dataset) < batch_size:
        raise ValueError(
            f"{source} has {len(dataset)} readable images, fewer than data.batch_size={batch_size} "
            "(incomplete batches are dropped); lower data.batch_size or add images"
        )
    workers = int(data_cfg.get("num_workers", 0))
    log.info("pretraining on %d images from %s", len(dataset), source)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # BN, Sinkhorn and in-batch negatives want full batches
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def knn_loader(config: Mapping[str, Any]) -> DataLoader | None:
    """Loader of labeled box crops for the kNN probe, or None when ``data.knn_val_json`` is unset."""
    data_cfg, kcfg = config["data"], config.get("knn", {})
    ann = data_cfg.get("knn_val_json")
    if not ann:
        return None
    crops = BoxCrops(
        ann,
        size=int(kcfg.get("crop_size", 64)),
        max_boxes=int(kcfg.get("max_boxes", 10000)),
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        seed=int(config.get("seed", 0)),
        max_pixels=data_cfg.get("max_pixels"),
    )
    return DataLoader(crops, batch_size=int(kcfg.get("batch_size", 256)), shuffle=False, num_workers=0)
