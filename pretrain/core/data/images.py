"""Robust image loading: any PIL-readable file to an upright 8-bit RGB image, or a clear error.

Real folders hold CMYK and grayscale JPEGs, RGBA and palette PNGs, 16-bit TIFFs, phone photos
whose pixels are stored sideways with an EXIF orientation tag, truncated downloads and files that
are not images at all. Everything that reads pixels in this project goes through :func:`load_rgb`
so that each of those cases is handled once, the same way, for training and for prediction.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own decompression-bomb threshold (~89.5 MP); a 30k-image set of ordinary photos never
# comes near it, while a mislabelled 40000x40000 scan would exhaust memory in a worker.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(Exception):
    """An image file that cannot be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    PIL's ``convert("RGB")`` clips 16/32-bit integer and float modes to 0..255 instead of scaling
    them, which turns a 16-bit TIFF white; those are rescaled by their dtype range here.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            arr = (np.nan_to_num(arr, nan=lo) - lo) * scale
        elif mode == "I":
            # 32-bit int images almost always carry 16-bit data (PNG I;16 opens as "I").
            arr = arr / (65535.0 if arr.max(initial=0) > 255 else 255.0) * 255.0
        else:
            arr = arr / 65535.0 * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels hold arbitrary colour values (often black).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK, YCbCr, L, 1, P, LAB, HSV, RGBX: PIL's converters are correct for these.
    return img.convert("RGB")


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return the upright ``(width, height)`` of an image from its header, without decoding pixels.

    Raises:
        ImageError: if the file is missing or not a readable image.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError as e:
        raise ImageError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from e
    # EXIF orientations 5-8 rotate by 90 degrees, so the upright image has swapped sides.
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_rgb(
    path: str | os.PathLike[str],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Load an image as an upright 8-bit RGB PIL image.

    Args:
        path: image file.
        max_pixels: refuse images with more pixels than this (``None``: no limit of ours; PIL's own
            decompression-bomb limit of twice ``PIL.Image.MAX_IMAGE_PIXELS`` still applies).
        exif_transpose: apply the EXIF orientation tag, as every viewer and annotation tool does.

    Returns:
        The fully decoded RGB image (the file is closed).

    Raises:
        ImageError: missing, unreadable, truncated, or too large; the message says which.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Our max_pixels check below replaces PIL's warning with a clear error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img: Image.Image = opened
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(
                        f"{path}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}; "
                        "downscale the image or raise max_pixels"
                    )
                # load() forces a full decode here, so a truncated file fails now, not in a worker.
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
                if rgb is img:
                    rgb = img.copy()  # detach from the file handle closed by the with-block
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{path}: file not found") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large for PIL ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image file PIL can identify") from e
    except (OSError, ValueError, SyntaxError) as e:
        # OSError covers "image file is truncated" and broken codec streams.
        raise ImageError(f"{path}: cannot decode image ({e})") from e
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError(f"{path}: empty image ({rgb.width}x{rgb.height})")
    return rgb
