"""Unlabeled images for self-supervised pretraining and teacher-student training.

A source is a folder (searched recursively for .jpg .jpeg .png .bmp .webp .tif .tiff, any case)
or a COCO JSON whose annotations are ignored. Unreadable files (truncated, not an image, over the
pixel limit, smaller than ``min_side``) do not stop a long run: each is logged once, counted in
``.skipped``, and the next readable image is returned in its place. Counts are per process, so
with DataLoader workers each worker logs its own skips.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pretrain.core.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_rgb

log = logging.getLogger(__name__)


def list_images(folder: str | os.PathLike[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``folder`` (recursive, symlinks followed, hidden entries skipped), sorted.

    A folder reached a second time through a symlink (a loop such as ``a/b -> a``, or two links
    to one folder) is listed once; each such link is logged, so a loop neither hangs the listing
    nor repeats its images dozens of times. Unreadable folders are logged and left out.
    """
    exts = {e.lower() for e in extensions}
    found = []
    seen: set[tuple[int, int]] = set()

    def unreadable(err: OSError) -> None:
        log.warning("cannot list %s (%s): its images are left out", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(dirpath)
        except OSError:  # removed while we walk
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s is a folder already listed (a symlink loop or a second link to it): skipped", dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
    return sorted(found)


def _coco_paths(ann_file: Path, image_root: Path | None) -> list[Path]:
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file} is not valid JSON: {e}") from e
    has_images = isinstance(data, dict) and isinstance(data.get("images"), list)
    if not has_images:
        raise ValueError(f"{ann_file} is not a COCO file: no 'images' list")
    root = image_root if image_root is not None else ann_file.parent
    return [root / im["file_name"] for im in data["images"]]


class UnlabeledImages(torch.utils.data.Dataset):
    """Images without labels, yielding ``transform(rgb_pil_image)``.

    Args:
        source: a folder (recursive) or a COCO JSON file (annotations ignored).
        transform: applied to the RGB PIL image; ``None`` returns the image itself.
        max_pixels: images with more pixels are skipped with a warning.
        min_side: images with a side shorter than this are skipped with a warning.
        image_root: for a COCO JSON, the folder its file_names are relative to (default: its folder).

    Attributes:
        paths: the image files, in order.
        skipped: ``{path: reason}`` of the files skipped so far in this process.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = 8,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        src = Path(source)
        if src.is_dir():
            self.paths = list_images(src)
            if not self.paths:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
        elif src.is_file() and src.suffix.lower() == ".json":
            self.paths = _coco_paths(src, Path(image_root) if image_root is not None else None)
            if not self.paths:
                raise ValueError(f"{src} lists no images")
        elif src.exists():
            raise ValueError(f"{src}: expected a folder of images or a COCO .json file")
        else:
            raise FileNotFoundError(f"unlabeled image source {src} does not exist")
        self.source = src
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.skipped: dict[str, str] = {}
        log.info("%s: %d unlabeled images", src, len(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def _skip(self, path: Path, reason: str) -> None:
        if str(path) not in self.skipped:
            self.skipped[str(path)] = reason
            log.warning("skipping unlabeled image (%d skipped so far): %s", len(self.skipped), reason)

    def load(self, index: int) -> Image.Image | None:
        """The RGB image at ``index``, or ``None`` (logged and counted) if it cannot be used."""
        path = self.paths[index]
        if str(path) in self.skipped:
            return None
        try:
            img = load_rgb(path, max_pixels=self.max_pixels)
        except ImageError as e:
            self._skip(path, str(e))
            return None
        if min(img.size) < self.min_side:
            self._skip(path, f"{path}: {img.width}x{img.height} is smaller than min_side={self.min_side}")
            return None
        return img

    def __getitem__(self, index: int) -> Any:
        n = len(self.paths)
        # Walk forward to the next readable image so one bad file never stops a long run.
        for k in range(n):
            img = self.load((index + k) % n)
            if img is not None:
                return self.transform(img) if self.transform is not None else img
        raise RuntimeError(f"none of the {n} images from {self.source} is readable "
                           f"(e.g. {next(iter(self.skipped.values()), '?')})")
