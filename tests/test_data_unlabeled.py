"""UnlabeledImages: folders and COCO files, odd image modes, and counted skips of bad files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.core.data.unlabeled import UnlabeledImages, list_images


def _folder(root: Path) -> Path:
    """A nested folder with one image per odd mode, plus a truncated JPEG and a text file named .jpg."""
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "a_cmyk.JPG")
    Image.new("L", (20, 20), 90).save(root / "sub" / "b_gray.jpeg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(root / "sub" / "c_rgba.png")
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(root / "sub" / "deeper" / "d_pal.bmp")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "e_16bit.TIFF")
    arr = np.zeros((10, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(arr).save(root / "f_exif.webp", exif=exif)
    good = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(good).save(root / "g.jpg", quality=95)
    data = (root / "g.jpg").read_bytes()
    (root / "g.jpg").unlink()
    (root / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.jpg").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()
    Image.new("RGB", (20, 20)).save(root / ".hidden" / "x.png")
    return root


def test_folder_recursive_and_conversions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path)
    names = [p.name for p in list_images(root)]
    # Recursive, extensions of any case, hidden folders and non-image files left out, sorted by path.
    assert names == ["a_cmyk.JPG", "e_16bit.TIFF", "f_exif.webp", "b_gray.jpeg", "c_rgba.png", "d_pal.bmp",
                     "truncated.jpg", "text.jpg"]
    ds = UnlabeledImages(root)
    assert len(ds) == 8 and ds.paths == list_images(root)
    with caplog.at_level(logging.WARNING, logger="pretrain.core.data.unlabeled"):
        got = {p.name: ds[i] for i, p in enumerate(ds.paths)}
    for img in got.values():
        assert isinstance(img, Image.Image) and img.mode == "RGB"
    px = {k: tuple(int(v) for v in np.asarray(img)[5, 5]) for k, img in got.items()}
    assert np.allclose(px["a_cmyk.JPG"], (255, 0, 0), atol=6)
    assert np.allclose(px["b_gray.jpeg"], (90, 90, 90), atol=3)
    assert np.allclose(px["c_rgba.png"], (127, 127, 255), atol=2)  # composited on white
    assert px["d_pal.bmp"] == (0, 200, 0)
    assert abs(px["e_16bit.TIFF"][0] - round(40000 / 65535 * 255)) <= 1
    assert got["f_exif.webp"].size == (10, 30)
    # The two bad files were skipped, counted and logged once each, and replaced by the next image.
    assert sorted(Path(p).name for p in ds.skipped) == ["text.jpg", "truncated.jpg"]
    assert caplog.text.count("skipping unlabeled image") == 2
    assert "not an image file" in ds.skipped[str(root / "text.jpg")]
    for name in ("text.jpg", "truncated.jpg"):
        assert got[name].size in {im.size for k, im in got.items() if k not in ("text.jpg", "truncated.jpg")}
    ds[ds.paths.index(root / "text.jpg")]  # a second visit does not warn again
    assert caplog.text.count("skipping unlabeled image") == 2


def test_transform_and_loader(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    ds = UnlabeledImages(root, transform=lambda im: torch.tensor(im.size))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 8


def test_limits_skip_instead_of_crashing(tmp_path: Path) -> None:
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    Image.new("RGB", (4, 30)).save(tmp_path / "tiny.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "ok.png")
    ds = UnlabeledImages(tmp_path, max_pixels=10_000)
    assert [ds[i].size for i in range(3)] == [(50, 50)] * 3
    assert "exceeds max_pixels=10000" in ds.skipped[str(tmp_path / "big.png")]
    assert "smaller than min_side=8" in ds.skipped[str(tmp_path / "tiny.png")]


def test_nothing_readable_raises(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("x")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n")
    ds = UnlabeledImages(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 2 images"):
        ds[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        UnlabeledImages(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnlabeledImages(tmp_path / "nope")


def test_coco_source_ignores_annotations(synthetic_data: dict[str, Path]) -> None:
    ds = UnlabeledImages(synthetic_data["train_json"])
    coco = json.loads(synthetic_data["train_json"].read_text())
    assert len(ds) == len(coco["images"]) == 12
    assert ds.paths[0] == synthetic_data["root"] / coco["images"][0]["file_name"]
    assert ds[0].size == (96, 96)
    folder = UnlabeledImages(synthetic_data["unlabeled"])
    assert len(folder) == 16 and folder.skipped == {}
