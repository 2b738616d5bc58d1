"""Data for pretraining: the unlabeled images with a method's multi-view transform, and kNN crops.

Two ways to make the views (``data.augment``): ``pil``, lightly's transform on every image in the
DataLoader workers; ``tensor``, :class:`DecodedImages` yields each image once as a uint8 tensor and
the model makes the views per batch on its device (:class:`pretrain.augment.TensorMultiCrop`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torchvision.io import ImageReadMode, decode_image

from pretrain.augment import TensorMultiCrop, working_size
from pretrain.core.data.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from pretrain.core.data.synthetic import ensure_synthetic
from pretrain.core.data.unlabeled import UnlabeledImages
from pretrain.core.run.resume import seeded_loader_parts
from pretrain.knn import BoxCrops

log = logging.getLogger(__name__)
AUGMENT_MODES = ("pil", "tensor")
# Where data.augment=tensor makes the views: on the training device after the transfer (a GPU's
# place), or per batch in the DataLoader workers, single-threaded, so that on a CPU the model's
# threads are left alone (many small multi-threaded ops in the training process stall when the
# cores are busy).
VIEWS_ON = ("device", "loader")
# Files torchvision.io decodes to the same pixels as load_rgb (checked in the tests); anything else
# (alpha, palette, 16-bit, TIFF, ...) goes through PIL, which handles every mode once, in one place.
_TV_DECODABLE = {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "L"),
                 ("WEBP", "RGB")}


def decode_rgb(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """An image file as an upright uint8 ``(3, H, W)`` tensor: torchvision.io where it gives the
    same pixels as :func:`pretrain.core.data.images.load_rgb`, that function otherwise.

    Raises:
        ImageError: missing, unreadable, truncated or over ``max_pixels``, as ``load_rgb``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                kind, (w, h) = (im.format, im.mode), im.size
    except Exception:  # noqa: BLE001 - load_rgb below raises the ImageError that says why
        kind, w, h = None, 0, 0
    if kind in _TV_DECODABLE and (max_pixels is None or w * h <= max_pixels):
        try:
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if img.dtype == torch.uint8 and img.shape[0] == 3:
                return img
        except (RuntimeError, OSError, ValueError):
            pass  # truncated or odd stream: PIL decides, and says why if it cannot read it either
    arr = np.asarray(load_rgb(path, max_pixels=max_pixels))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def fit_square(img: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resize ``img`` (uint8 ``(3, H, W)``) so its longer side is ``size``, keeping its aspect, into
    the top-left of a ``size`` x ``size`` canvas.

    The rest of the canvas repeats the last row and column, so that bilinear sampling at the
    valid region's edge sees the edge, not black. Returns the canvas and the valid ``(h, w)``.
    """
    _, h, w = img.shape
    nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], antialias=True)
    canvas = torch.empty(3, size, size, dtype=torch.uint8)
    canvas[:, :nh, :nw] = img
    canvas[:, :nh, nw:] = img[:, :, -1:]
    canvas[:, nh:, :] = canvas[:, nh - 1:nh, :]
    return canvas, torch.tensor([nh, nw])


class DecodedImages(UnlabeledImages):
    """Unlabeled images as ``(uint8 (3, S, S) image, (h, w) valid size)`` for ``data.augment=tensor``.

    Decoded with torchvision.io (PIL for odd files), fitted by :func:`fit_square`; unreadable files
    are skipped and counted as in :class:`~pretrain.core.data.unlabeled.UnlabeledImages`.

    Args:
        source: a folder (recursive) or a COCO JSON (annotations ignored).
        size: the side ``S`` of the square every image is fitted into.
        cache: keep every fitted image in memory after its first load, so that later epochs skip
            decoding (``S * S * 3`` bytes per image; each DataLoader worker holds its own copy).
        max_pixels, min_side, image_root: as for ``UnlabeledImages``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        size: int,
        cache: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = 8,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(source, transform=None, max_pixels=max_pixels, min_side=min_side,
                         image_root=image_root)
        if size < 8:
            raise ValueError(f"working size {size} is too small; use at least the largest crop size")
        self.size = size
        self._cache: Tensor | None = None
        self._cache_hw = torch.zeros(len(self.paths), 2, dtype=torch.long)  # (0, 0): not cached yet
        if cache:
            need = len(self.paths) * 3 * size * size
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if need > free // 2:
                log.warning("data.cache_decoded: %d images at %d px need %.1f GB, more than half the free "
                            "memory (%.1f GB); decoding every epoch instead", len(self.paths), size,
                            need / 1e9, free / 1e9)
            else:
                # torch.empty maps pages lazily: memory is used as images are cached.
                self._cache = torch.empty(len(self.paths), 3, size, size, dtype=torch.uint8)

    def decode(self, index: int) -> Tensor | None:
        """The uint8 image at ``index``, or ``None`` (logged and counted) if it cannot be used."""
        path = self.paths[index]
        if str(path) in self.skipped:
            return None
        try:
            img = decode_rgb(path, self.max_pixels)
        except ImageError as e:
            self._skip(path, str(e))
            return None
        if min(img.shape[1:]) < self.min_side:
            h, w = img.shape[1:]
            self._skip(path, f"{path}: {w}x{h} is smaller than min_side={self.min_side}")
            return None
        return img

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        n = len(self.paths)
        # Walk forward to the next readable image so one bad file never stops a long run.
        for k in range(n):
            i = (index + k) % n
            if self._cache is not None and self._cache_hw[i, 0] > 0:
                return self._cache[i], self._cache_hw[i]
            img = self.decode(i)
            if img is None:
                continue
            canvas, hw = fit_square(img, self.size)
            if self._cache is not None:
                self._cache[i] = canvas
                self._cache_hw[i] = hw
            return canvas, hw
        raise RuntimeError(f"none of the {n} images from {self.source} is readable "
                           f"(e.g. {next(iter(self.skipped.values()), '?')})")


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


def augment_mode(data_cfg: Mapping[str, Any]) -> str:
    """``data.augment`` checked: ``pil`` (the default) or ``tensor``."""
    mode = str(data_cfg.get("augment") or "pil")
    if mode not in AUGMENT_MODES:
        raise ValueError(f"data.augment={mode!r}; choose one of {AUGMENT_MODES}")
    return mode


def views_on(data_cfg: Mapping[str, Any]) -> str:
    """``data.views_on`` checked: ``device`` (the default) or ``loader``."""
    place = str(data_cfg.get("views_on") or "device")
    if place not in VIEWS_ON:
        raise ValueError(f"data.views_on={place!r}; choose one of {VIEWS_ON}")
    return place


def tensor_views(data_cfg: Mapping[str, Any], transform_cfg: Mapping[str, Any]) -> TensorMultiCrop | None:
    """The view maker the model applies on its device: for ``data.augment=tensor`` with
    ``data.views_on=device``, else None (the loader already yields views)."""
    if augment_mode(data_cfg) != "tensor" or views_on(data_cfg) != "device":
        return None
    return TensorMultiCrop.from_transform_config(transform_cfg)


class ViewsCollate:
    """``collate_fn`` that stacks ``DecodedImages`` items and makes their views in the loader."""

    def __init__(self, views: TensorMultiCrop) -> None:
        self.views = views

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        images, sizes = default_collate(items)
        return self.views(images, sizes)


def decoded_images(data_cfg: Mapping[str, Any], transform_cfg: Mapping[str, Any],
                   source: Path | None = None) -> DecodedImages:
    """The ``data.augment=tensor`` dataset of ``source`` (default: :func:`unlabeled_source`), with
    ``data.working_size`` (null: 1.15 x the largest crop), ``data.cache_decoded``, ``data.max_pixels``."""
    size = data_cfg.get("working_size")
    if not size:
        size = working_size(TensorMultiCrop.from_transform_config(transform_cfg).groups)
    max_pixels = data_cfg.get("max_pixels")
    return DecodedImages(source or unlabeled_source(data_cfg), int(size),
                         cache=bool(data_cfg.get("cache_decoded", False)),
                         max_pixels=int(max_pixels) if max_pixels else None)


def train_loader(
    data_cfg: Mapping[str, Any],
    transform: Callable[[Any], Any],
    transform_cfg: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> DataLoader:
    """Shuffled, ``drop_last`` loader of ``transform(image)`` (a list of views) per image.

    With ``data.augment=tensor``, ``transform`` is unused and the views come from ``transform_cfg``
    (``method.transform``), batched: with ``data.views_on=device`` the loader yields ``(uint8 images,
    valid sizes)`` and the model makes the views on its device; with ``loader`` the collate_fn
    makes them. The order and each image's augmentation are functions of ``(seed, epoch,
    position)`` (:mod:`pretrain.core.run.resume`), so that a resumed run continues the same sequence;
    under DDP Lightning wraps the sampler in a distributed one.
    """
    source = unlabeled_source(data_cfg)
    workers = int(data_cfg.get("num_workers", 0))
    dataset: UnlabeledImages
    collate: Callable[[Any], Any] | None = None
    if augment_mode(data_cfg) == "tensor":
        if transform_cfg is None:
            raise ValueError("data.augment=tensor needs the method's transform config (method.transform)")
        dataset = decoded_images(data_cfg, transform_cfg, source)
        if views_on(data_cfg) == "loader":
            collate = ViewsCollate(TensorMultiCrop.from_transform_config(transform_cfg))
        if data_cfg.get("cache_decoded") and workers > 0:
            log.warning("data.cache_decoded with data.num_workers=%d keeps one cache per worker; "
                        "data.num_workers=0 keeps one", workers)
    else:
        max_pixels = data_cfg.get("max_pixels")
        dataset = (UnlabeledImages(source, transform=transform, max_pixels=int(max_pixels)) if max_pixels
                   else UnlabeledImages(source, transform=transform))
    batch_size = int(data_cfg["batch_size"])
    if len(dataset) < batch_size:
        raise ValueError(
            f"{source} has {len(dataset)} readable images, fewer than data.batch_size={batch_size} "
            "(incomplete batches are dropped); lower data.batch_size or add images"
        )
    log.info("pretraining on %d images from %s (data.augment=%s)", len(dataset), source,
             augment_mode(data_cfg))
    samples, sampler = seeded_loader_parts(dataset, seed)
    return DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,  # BN, Sinkhorn and in-batch negatives want full batches
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate,
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
