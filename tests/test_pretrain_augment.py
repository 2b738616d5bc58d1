"""data.augment=tensor: batched multi-crop views against lightly's PIL transforms and torchvision's ops."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import compose_config
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from pretrain.augment import (
    CropGroup,
    TensorMultiCrop,
    ViewSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    sample_crop_boxes,
    spec_from_transform_config,
    working_size,
)
from pretrain.core.data.images import load_rgb
from pretrain.data import DecodedImages, decode_rgb, fit_square, train_loader
from pretrain.methods.base import plain_config
from pretrain.methods.swav import SwAV

ROOT = Path(__file__).resolve().parents[1]
NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Every random step off: a view is the whole image, resized.
PLAIN = ViewSpec(hf_prob=0.0, cj_prob=0.0, gray_prob=0.0, blur_prob=0.0, mean=None, std=None)


def method_cfg(*overrides: str) -> dict:
    return plain_config(compose_config("pretrain", overrides=["experiment=smoke", *overrides]))


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images of smooth random colour fields (resizing them is well-posed)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return (TF.resize(low, [size, size], antialias=True).clamp(0, 1) * 255).round().to(torch.uint8)


def random_views(n: int = 12, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config and shapes
@pytest.mark.parametrize("method", ["swav", "vicreg", "simclr", "moco", "densecl"])
def test_views_match_the_pil_transform_in_count_and_shape(method):
    cfg = method_cfg(f"method={method}")
    pil_transform = hydra.utils.instantiate(cfg["method"]["transform"])
    images = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in smooth_images(3, 80)]
    pil_views = default_collate([pil_transform(im) for im in images])
    tensor_views = TensorMultiCrop.from_transform_config(cfg["method"]["transform"])(smooth_images(3, 80))
    assert [tuple(v.shape) for v in tensor_views] == [tuple(v.shape) for v in pil_views]
    assert all(v.dtype == torch.float32 for v in tensor_views)
    if method == "swav":  # the smoke preset: 2 x 64 px then 2 x 32 px
        assert [v.shape[-1] for v in tensor_views] == [64, 64, 32, 32]


def test_spec_reads_lightly_defaults_and_overrides():
    groups, spec = spec_from_transform_config(
        {"_target_": "lightly.transforms.VICRegTransform", "input_size": 64, "normalize": NORM}
    )
    # VICRegTransform's own defaults: cj_strength 0.5 scales (0.8, 0.8, 0.4, 0.2); solarisation 0.1.
    assert groups == [CropGroup(64, 2, (0.08, 1.0))]
    assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == pytest.approx((0.4, 0.4, 0.2, 0.1))
    assert spec.solarize_prob == 0.1 and spec.blur_prob == 0.5 and spec.mean == tuple(NORM["mean"])
    demo = method_cfg("experiment=demo_swav")["method"]["transform"]
    groups, spec = spec_from_transform_config(demo)
    assert groups == [CropGroup(96, 2, (0.5, 1.0))] and spec.gray_prob == 1.0 and spec.blur_prob == 0.0
    assert working_size(groups) == 112


@pytest.mark.parametrize("cfg, match", [
    ({"_target_": "lightly.transforms.BYOLTransform"}, "data.augment=pil"),
    ({"_target_": "lightly.transforms.SimCLRTransform", "rr_prob": 0.5}, "rotation"),
    ({"_target_": "lightly.transforms.SimCLRTransform", "crop_sizes": [64]}, "does not take"),
])
def test_unsupported_transforms_are_refused_with_the_fix(cfg, match):
    with pytest.raises(ValueError, match=match):
        spec_from_transform_config(cfg)


# --------------------------------------------------------------------------------------- crops
@pytest.mark.parametrize("hw", [(100, 100), (60, 150)])
def test_crop_boxes_follow_random_resized_crop(hw):
    h, w = hw
    n, scale, ratio = 20000, (0.08, 0.6), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(torch.full((n,), h), torch.full((n,), w), scale, ratio,
                              torch.Generator().manual_seed(0))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision
    frac = bw * bh / (h * w)
    # Rounding w and h to whole pixels moves the area by at most about a pixel per side.
    slack = (bw + bh + 1) / (h * w)
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    aspect = bw / bh
    # w and h are rounded separately: the ratio may leave its bounds by about a pixel's worth.
    assert (aspect >= ratio[0] - 2 / bh).all() and (aspect <= ratio[1] + 2 / bh).all()
    # Same distribution as torchvision's own rule: compare the mean area, width and offset.
    ref = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale), list(ratio))
                        for _ in range(4000)], dtype=torch.float)  # (top, left, height, width)
    assert float(frac.mean()) == pytest.approx(float((ref[:, 2] * ref[:, 3] / (h * w)).mean()), abs=0.01)
    assert float(bw.mean()) == pytest.approx(float(ref[:, 3].mean()), rel=0.03)
    assert float(boxes[:, 1].mean()) == pytest.approx(float(ref[:, 0].mean()), rel=0.06)


def test_crop_fallback_is_the_centred_largest_allowed_ratio():
    # A 10x100 strip: no crop of ratio <= 4/3 can hold 90 % of it, so torchvision's fallback applies.
    boxes = sample_crop_boxes(torch.tensor([10]), torch.tensor([100]), (0.9, 1.0))
    assert boxes.tolist() == [[43.0, 0.0, 56.0, 10.0]]  # w = round(10 * 4/3) = 13, centred


def test_no_randomness_gives_a_plain_resize():
    images = smooth_images(4, 64)
    views = TensorMultiCrop([CropGroup(32, 2, (1.0, 1.0))], PLAIN)(images)
    expected = TF.resize(images.float() / 255, [32, 32], antialias=True)
    for v in views:
        assert (v - expected).abs().max() < 0.03 and (v - expected).abs().mean() < 0.005


def test_valid_size_crops_only_the_image_not_the_padding():
    img = smooth_images(1, 64)[0][:, :, :40]  # 64 x 40, fitted into 64 x 64
    canvas, hw = fit_square(img, 64)
    assert hw.tolist() == [64, 40]
    assert torch.equal(canvas[:, :, :40], img) and torch.equal(canvas[:, :, 63], img[:, :, 39])
    views = TensorMultiCrop([CropGroup(32, 1, (1.0, 1.0))], PLAIN)(canvas[None], hw[None])
    # Scale 1 of a 64 x 40 image fits no ratio in [3/4, 4/3]: torchvision's fallback is the centred
    # 40 wide, round(40 / 0.75) = 53 high crop, from row 5. The padding never enters a view.
    expected = TF.resize(img[:, 5:58, :].float()[None] / 255, [32, 32], antialias=True)
    assert (views[0] - expected).abs().max() < 0.03


# --------------------------------------------------------------------------- per-view colour ops
def test_flip_flips_each_view():
    images = smooth_images(3, 48)
    group = [CropGroup(24, 2, (0.3, 1.0))]
    plain = TensorMultiCrop(group, PLAIN)(images, generator=torch.Generator().manual_seed(1))
    flip = TensorMultiCrop(group, replace(PLAIN, hf_prob=1.0))
    flipped = flip(images, generator=torch.Generator().manual_seed(1))
    for a, b in zip(plain, flipped):
        assert torch.equal(b, a.flip(-1)) and not torch.equal(a, b)


@pytest.mark.parametrize("ours, theirs, lo, hi", [
    (adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_equal_torchvision_per_view(ours, theirs, lo, hi):
    x = random_views()
    factors = torch.linspace(lo, hi, x.shape[0])
    out = ours(x.clone(), factors)
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=2e-5, rtol=0)
    assert not torch.allclose(out[0], out[-1])


def test_colour_jitter_with_only_brightness_applies_one_factor_per_view():
    x = random_views(6)
    spec = replace(PLAIN, cj_prob=1.0, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)
    module = TensorMultiCrop([CropGroup(24, 1, (1.0, 1.0))], spec)
    out = module.augment(x.clone(), torch.Generator().manual_seed(3))
    factors = []
    for i in range(len(x)):
        unclipped = out[i] < 1
        f = float((out[i][unclipped] * x[i][unclipped]).sum() / (x[i][unclipped] ** 2).sum())
        torch.testing.assert_close(out[i], TF.adjust_brightness(x[i], f), atol=1e-5, rtol=0)
        factors.append(f)
    assert min(factors) >= 0.5 - 1e-4 and max(factors) <= 1.5 + 1e-4 and np.std(factors) > 0.05


def test_grayscale_gives_equal_channels():
    out = TensorMultiCrop([CropGroup(16, 2, (0.5, 1.0))], replace(PLAIN, gray_prob=1.0))(smooth_images(3, 32))
    for v in out:
        assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2]) and v.std() > 0


def test_solarisation_inverts_the_bright_pixels():
    x = random_views(4)
    module = TensorMultiCrop([CropGroup(24, 1, (1.0, 1.0))], replace(PLAIN, solarize_prob=1.0))
    out = module.augment(x.clone())
    bright = x >= 128 / 255
    assert torch.allclose(out[bright], 1 - x[bright]) and torch.equal(out[~bright], x[~bright])


def test_blur_equals_torchvision_per_view():
    x = random_views(5, 32)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    out = gaussian_blur(x, sigmas, kernel_size=13)
    for i, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [13, 13], [s, s]), atol=1e-5, rtol=0)
    assert (out[4] - x[4]).abs().mean() > (out[1] - x[1]).abs().mean()  # more sigma, more blur


def test_normalisation_and_seeded_reproducibility():
    cfg = method_cfg("method=swav")["method"]["transform"]
    module = TensorMultiCrop.from_transform_config(cfg)
    images = smooth_images(4, 80)
    a = module(images, generator=torch.Generator().manual_seed(7))
    b = module(images, generator=torch.Generator().manual_seed(7))
    c = module(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Normalised with data.mean/std: a view's pixels span what (0..1 - mean) / std allows.
    lo = (0 - torch.tensor(NORM["mean"])) / torch.tensor(NORM["std"])
    assert (a[0].amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and a[0].min() < 0 < a[0].max()


def test_views_agree_with_the_pil_path_in_distribution():
    """The same recipe through both paths: per-view brightness, contrast and colourfulness agree
    (two-sample z-scores of their means below 4, over 240 views each)."""
    cfg = method_cfg("method=simclr")["method"]["transform"]
    images = smooth_images(8, 64, seed=3)
    torch.manual_seed(0)
    np.random.seed(0)
    pil_transform = hydra.utils.instantiate(cfg)
    pil = torch.stack([v for im in images for _ in range(15)
                       for v in pil_transform(Image.fromarray(im.permute(1, 2, 0).numpy()))])
    module, g = TensorMultiCrop.from_transform_config(cfg), torch.Generator().manual_seed(1)
    ours = torch.cat([v for _ in range(15) for v in module(images, generator=g)])
    stats = {
        "brightness": lambda t: t.mean(dim=(1, 2, 3)),
        "contrast": lambda t: t.std(dim=(1, 2, 3)),
        "colourfulness": lambda t: t.std(dim=1).mean(dim=(1, 2)),  # 0 for gray views
    }
    for name, stat in stats.items():
        p, o = stat(pil), stat(ours)
        z = abs(float(p.mean() - o.mean())) / math.sqrt(float(p.var() / len(p) + o.var() / len(o)))
        assert z < 4, (name, float(p.mean()), float(o.mean()))


# -------------------------------------------------------------------------------- decoding, data
def _write_odd_images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    a = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    files = {
        "rgb.png": (Image.fromarray(a), {}),
        "cmyk.jpg": (Image.fromarray(a).convert("CMYK"), {}),
        "gray.jpg": (Image.fromarray(a).convert("L"), {}),
        "palette.png": (Image.fromarray(a).convert("P"), {}),
        "rgba.png": (Image.fromarray(np.dstack([a, (a[..., :1] > 128) * 255]).astype(np.uint8), "RGBA"), {}),
        "gray16.png": (Image.fromarray(a[..., 0].astype(np.uint16) * 257), {}),
        "tiff.tif": (Image.fromarray(a), {}),
    }
    out = {}
    for name, (im, kw) in files.items():
        im.save(folder / name, **kw)
        out[name] = folder / name
    rotated = Image.fromarray(a)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: upright is 30 wide, 50 high
    rotated.save(folder / "exif.jpg", exif=exif)
    out["exif.jpg"] = folder / "exif.jpg"
    return out


def test_decode_gives_load_rgbs_pixels_for_every_odd_file(tmp_path):
    for name, path in _write_odd_images(tmp_path).items():
        ref = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
        got = decode_rgb(path)
        assert got.dtype == torch.uint8 and got.shape == ref.shape, name
        assert (got.int() - ref.int()).abs().max() <= 1, name
    assert decode_rgb(tmp_path / "exif.jpg").shape == (3, 50, 30)


def test_bad_images_are_skipped_and_counted(tmp_path):
    good = smooth_images(3, 40)
    for i, im in enumerate(good):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "1b_not_an_image.jpg").write_bytes(b"this is not a jpeg")
    data = (tmp_path / "0.png").read_bytes()
    (tmp_path / "2b_truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(good[0].permute(1, 2, 0).numpy()).save(tmp_path / "jpeg.jpg", quality=90)
    data = (tmp_path / "jpeg.jpg").read_bytes()
    (tmp_path / "2c_truncated.jpg").write_bytes(data[: len(data) // 2])  # torchvision fails, PIL says why
    (tmp_path / "jpeg.jpg").unlink()
    Image.new("RGB", (4, 4)).save(tmp_path / "3_tiny.png")
    ds = DecodedImages(tmp_path, size=32)
    assert len(ds) == 7
    items = [ds[i] for i in range(len(ds))]
    assert all(img.shape == (3, 32, 32) and img.dtype == torch.uint8 for img, _ in items)
    assert {Path(p).name for p in ds.skipped} == {"1b_not_an_image.jpg", "2b_truncated.png",
                                                  "2c_truncated.jpg", "3_tiny.png"}
    assert "truncated" in ds.skipped[str(tmp_path / "2c_truncated.jpg")]
    # A bad file's slot gives the next readable image instead.
    names = [p.name for p in ds.paths]
    assert torch.equal(items[names.index("1b_not_an_image.jpg")][0], items[names.index("2.png")][0])


def test_cache_keeps_decoded_images(tmp_path):
    for i, im in enumerate(smooth_images(2, 40)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    ds = DecodedImages(tmp_path, size=32, cache=True)
    first = ds[1][0].clone()
    (tmp_path / "1.png").unlink()  # later epochs read the cache, not the disk
    assert torch.equal(ds[1][0], first) and not ds.skipped


def test_train_loader_yields_uint8_batches_and_the_model_makes_the_views(synthetic_data):
    cfg = method_cfg("method=swav", "data.augment=tensor", f"data.root={synthetic_data['unlabeled']}")
    loader = train_loader(cfg["data"], None, cfg["method"]["transform"])  # type: ignore[arg-type]
    images, sizes = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 80, 80) and sizes.tolist()[0] == [80, 80]
    model = SwAV(cfg)
    assert model.tensor_views is not None
    assert not any(k.startswith("tensor_views") for k in model.state_dict())  # config, not weights
    with pytest.raises(ValueError, match="choose one of"):
        train_loader({**cfg["data"], "augment": "gpu"}, None, cfg["method"]["transform"])  # type: ignore[arg-type]


def test_views_on_loader_makes_the_views_in_the_collate_fn(synthetic_data):
    cfg = method_cfg("method=swav", "data.augment=tensor", "data.views_on=loader",
                     f"data.root={synthetic_data['unlabeled']}")
    views = next(iter(train_loader(cfg["data"], None, cfg["method"]["transform"])))  # type: ignore[arg-type]
    assert [tuple(v.shape) for v in views] == [(8, 3, 64, 64)] * 2 + [(8, 3, 32, 32)] * 2
    assert SwAV(cfg).tensor_views is None  # nothing left for the device hook to do


@pytest.mark.parametrize("views_on", ["device", "loader"])
def test_smoke_training_runs_on_the_tensor_path(tmp_path, monkeypatch, views_on):
    from pretrain.train import train

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("pretrain", overrides=["experiment=smoke", "method=swav", "data.augment=tensor",
                                         f"data.views_on={views_on}", "data.cache_decoded=true"])
    metrics = train(cfg)
    assert metrics["global_step"] == 4 and math.isfinite(metrics["final_loss"])
    assert metrics["knn_top1"] is not None  # validation batches pass the hook untouched
