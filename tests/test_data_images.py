"""load_rgb: every odd image file becomes an upright 8-bit RGB image or a clear ImageError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.core.data.images import ImageError, image_size, load_rgb


def _exif_rotated(path: Path) -> None:
    """A 40x20 image, left half red / right half blue, tagged 'rotate 90 clockwise to view'."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    p = tmp_path / "rot.png"
    _exif_rotated(p)
    img = load_rgb(p)
    assert img.size == (20, 40)
    arr = np.asarray(img)
    assert tuple(arr[2, 10]) == (255, 0, 0)  # the left half became the top half
    assert tuple(arr[37, 10]) == (0, 0, 255)
    assert image_size(p) == (20, 40)
    assert load_rgb(p, exif_transpose=False).size == (40, 20)


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), ".jpg", (255, 0, 0)),
        ("L", 200, ".jpg", (200, 200, 200)),
        ("LA", (10, 0), ".png", (255, 255, 255)),  # fully transparent: white, not black
        ("RGBA", (0, 255, 0, 255), ".png", (0, 255, 0)),
        ("RGBA", (0, 0, 0, 0), ".png", (255, 255, 255)),
        ("1", 1, ".png", (255, 255, 255)),
    ],
)
def test_modes_converted(tmp_path: Path, mode: str, value: object, suffix: str, expected: tuple) -> None:
    p = tmp_path / f"img{suffix}"
    Image.new(mode, (16, 12), value).save(p)  # type: ignore[arg-type]
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (16, 12)
    np.testing.assert_allclose(np.asarray(img)[6, 8], expected, atol=6)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    img.info["transparency"] = 0
    p = tmp_path / "pal.png"
    img.save(p, transparency=0)
    arr = np.asarray(load_rgb(p))
    assert tuple(arr[0, 0]) == (10, 200, 30)
    assert tuple(arr[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rescaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    arr = np.full((10, 10), 32768, np.uint16)
    arr[0, 0] = 65535
    p = tmp_path / f"deep{suffix}"
    Image.fromarray(arr).save(p)
    out = np.asarray(load_rgb(p))
    assert abs(int(out[5, 5, 0]) - 128) <= 1, out[5, 5]  # PIL's own convert would clip to 255
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_truncated_and_fake_files_raise(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="cut.jpg"):
        load_rgb(cut)
    with pytest.raises(ImageError, match="notes.jpg.*not an image"):
        load_rgb(text)
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "absent.png")


def test_max_pixels(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(p)
    assert load_rgb(p, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError, match="5000 pixels exceeds max_pixels=4999"):
        load_rgb(p, max_pixels=4999)
