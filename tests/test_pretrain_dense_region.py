"""DenseCL and DetCon: dense matching, masks that follow the pixels, losses that learn, runs that export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from pretrain.methods.base import SSLMethod, plain_config
from pretrain.methods.densecl import dense_info_nce, match_keys
from pretrain.methods.detcon import DetConViews, pool_regions, region_weights, sample_regions

ROOT = Path(__file__).resolve().parents[1]
# Views that only crop and flip: what is left to compare is geometry.
GEOMETRY_ONLY = {"cj_prob": 0.0, "random_gray_scale": 0.0, "gaussian_blur_t1": 0.0, "gaussian_blur_t2": 0.0,
                 "normalize": None}


def smoke_config(method: str, *overrides: str) -> dict:
    return plain_config(compose_config("pretrain", overrides=["experiment=smoke", f"method={method}", *overrides]))


def build(config: dict) -> SSLMethod:
    return hydra.utils.get_class(config["method"]["module"])(config)


def noise_batch(config: dict, n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """One collated batch of the method's real transform on random RGB images."""
    rng = np.random.default_rng(seed)
    transform = hydra.utils.instantiate(config["method"]["transform"])
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(n)]
    return list(default_collate([transform(im) for im in images]))


def cell_image(size: int = 96, grid: int = 4) -> Image.Image:
    """An image whose 4x4 grid cells say where they are: red = 40 + 50 col, green = 40 + 50 row."""
    cell = np.arange(size) * grid // size
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., 0] = 40 + 50 * cell[None, :]
    arr[..., 1] = 40 + 50 * cell[:, None]
    return Image.fromarray(arr)


def cell_ids(view: torch.Tensor) -> torch.Tensor:
    """The grid cell each pixel of a ``(3, H, W)`` view of :func:`cell_image` shows."""
    col = ((view[0] * 255 - 40) / 50).round().clamp(0, 3)
    row = ((view[1] * 255 - 40) / 50).round().clamp(0, 3)
    return (row * 4 + col).long()


# --------------------------------------------------------------------------------------- DenseCL
def test_densecl_matches_every_query_location_to_its_most_similar_key_location():
    g = torch.Generator().manual_seed(0)
    q_map = torch.randn(2, 16, 3, 4, generator=g)
    # The key view is the query view mirrored (and scaled: similarity is a cosine).
    k_map = 3.0 * q_map.flip(-1) + 0.01 * torch.randn(2, 16, 3, 4, generator=g)
    k_dense = torch.randn(2, 12, 8, generator=g)
    matched = match_keys(q_map, k_map, k_dense)
    mirror = torch.tensor([i * 4 + (3 - j) for i in range(3) for j in range(4)])
    assert torch.equal(matched, k_dense[:, mirror])
    # Against the unmirrored map every location matches itself.
    assert torch.equal(match_keys(q_map, q_map, k_dense), k_dense)


def test_dense_info_nce_is_cross_entropy_over_the_positive_and_the_queue():
    q, negatives = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss = dense_info_nce(q, torch.tensor([[5.0, 0.0]]), negatives, temperature=0.5)  # cosines 1, 0, -1
    assert float(loss) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2))), rel=1e-5)
    wrong = dense_info_nce(q, torch.tensor([[0.0, 1.0]]), negatives, temperature=0.5)
    assert float(wrong) == pytest.approx(math.log(2 + math.exp(-2)), rel=1e-5)  # cosines 0, 0, -1


def reset_queues(model, saved) -> None:
    for bank, (keys, ptr) in zip(model.queues(), saved):
        bank.bank.copy_(keys)
        bank.bank_ptr.copy_(ptr)


def test_densecl_dense_loss_rewards_matching_views_and_falls_with_training():
    config = smoke_config("densecl", "method.queue_size=64")
    model = build(config).train()
    views = noise_batch(config)
    saved = [(b.bank.clone(), b.bank_ptr.clone()) for b in model.queues()]
    # The same view as key: every query location finds its own features (a cosine of 1) as positive.
    _, same = model.compute_loss([views[0], views[0].clone()])
    reset_queues(model, saved)
    _, other = model.compute_loss([views[0], views[0].roll(1, dims=0)])  # keys of other images
    assert same["densecl_dense_loss"] < other["densecl_dense_loss"] - 0.1
    assert same["densecl_global_loss"] < other["densecl_global_loss"] - 0.1
    # With the queue's negatives held fixed, SGD on one batch lowers the loss.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        reset_queues(model, saved)
        loss, stats = model.compute_loss(views)
        assert torch.isfinite(loss) and set(stats) == {"densecl_global_loss", "densecl_dense_loss",
                                                      "densecl_momentum"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_densecl_dense_queue_holds_one_mean_key_per_image():
    config = smoke_config("densecl", "method.queue_size=16")
    model = build(config).train()
    model.compute_loss(noise_batch(config))
    assert model.dense_queue.bank.shape == (16, 32) and int(model.dense_queue.bank_ptr) == 8  # 8 images
    assert torch.allclose(model.dense_queue.bank[:8].norm(dim=1), torch.ones(8))
    with pytest.raises(ValueError, match="dense negatives come from its queue"):
        build(smoke_config("densecl", "method.queue_size=0"))


# ---------------------------------------------------------------------------------------- DetCon
def test_detcon_masks_follow_the_flip_and_the_crop_of_the_image():
    image = cell_image()
    whole_flipped = DetConViews((4, 4), input_size=48, min_scale=1.0, hf_prob=1.0, **GEOMETRY_ONLY)
    v0, v1, m0, m1 = whole_flipped(image)
    assert v0.shape == (3, 48, 48) and m0.shape == (48, 48) and m0.dtype == torch.int64
    # Mirrored: the top-left pixel shows cell 3 (top-right of the image), and its mask says so.
    assert (int(m0[0, 0]), int(m0[0, -1]), int(m0[-1, 0])) == (3, 0, 15)
    for view, mask in ((v0, m0), (v1, m1)):
        assert (cell_ids(view) == mask).float().mean() > 0.9
    random_views = DetConViews((4, 4), input_size=48, min_scale=0.2, hf_prob=0.5, **GEOMETRY_ONLY)
    for seed in range(6):
        torch.manual_seed(seed)
        v0, v1, m0, m1 = random_views(image)
        assert not torch.equal(m0, m1)  # two different crops
        for view, mask in ((v0, m0), (v1, m1)):
            # Only pixels on a cell border (bilinear image, nearest-neighbour mask) may disagree; a
            # mask with the other flip agrees only where a cell meets its mirror image (at most ~1/3).
            agree = (cell_ids(view) == mask).float().mean()
            assert agree > 0.85 and agree - (cell_ids(view) == mask.flip(-1)).float().mean() > 0.5, seed


def test_region_pooling_weighs_each_feature_cell_by_the_region_area_in_it():
    masks = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 3], [2, 2, 3, 3]]])
    weights = region_weights(masks, 4, (2, 2))
    assert weights[0, :, 1, 1].tolist() == [0.0, 0.0, 0.25, 0.75]  # the bottom-right cell: 1/4 of 2, 3/4 of 3
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pooled = pool_regions(features, weights, torch.tensor([[2, 3, 0]]))
    assert pooled[0, :, 0].tolist() == pytest.approx([(3 + 0.25 * 4) / 1.25, 4.0, 1.0])
    with pytest.raises(ValueError, match=r"mask ids must be in \[0, 4\)"):
        region_weights(masks + 1, 4, (2, 2))


def test_detcon_pooled_regions_line_up_across_views():
    """The same region id pools the same pixels in both views, whatever their crop and flip."""
    transform = DetConViews((4, 4), input_size=48, min_scale=0.3, hf_prob=0.5, **GEOMETRY_ONLY)
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        v0, v1, m0, m1 = transform(cell_image())
        # "Features" at pixel resolution: the red and green levels, which say the cell.
        feats = torch.stack([v0[:2], v1[:2]]) * 255
        weights = region_weights(torch.stack([m0, m1]), 16, (48, 48))
        area = weights.sum(dim=(2, 3))
        ids0, ids1 = sample_regions(area[:1] > 0, area[1:] > 0, 16)
        assert torch.equal(ids0, ids1)  # shared regions: the same ids in both views
        p0 = pool_regions(feats[:1], weights[:1], ids0)[0]
        p1 = pool_regions(feats[1:], weights[1:], ids1)[0]
        big = (area[0, ids0[0]] >= 49) & (area[1, ids0[0]] >= 49)  # 7x7 px or more in both views
        expected = torch.stack([40 + 50 * (ids0[0] % 4), 40 + 50 * (ids0[0] // 4)], dim=1).float()
        assert (p0[big] - expected[big]).abs().max() < 12, seed  # neighbouring cells are 50 apart
        assert (p1[big] - expected[big]).abs().max() < 12, seed
        checked += int(big.sum())
    assert checked >= 30


def test_regions_of_views_that_share_none_are_drawn_from_each_view():
    present0 = torch.tensor([[True, True, False, False], [True, False, True, False]])
    present1 = torch.tensor([[False, False, True, True], [True, False, True, True]])
    ids0, ids1 = sample_regions(present0, present1, 32, generator=torch.Generator().manual_seed(0))
    assert set(ids0[0].tolist()) <= {0, 1} and set(ids1[0].tolist()) <= {2, 3}  # no positives
    assert torch.equal(ids0[1], ids1[1]) and set(ids0[1].tolist()) == {0, 2}  # the shared ones


def test_detcon_loss_prefers_masks_that_follow_the_pixels_and_falls_with_training():
    config = smoke_config("detcon")
    model = build(config).train()
    views = noise_batch(config)
    torch.manual_seed(0)
    loss, stats = model.compute_loss(views)
    assert torch.isfinite(loss) and 1 <= float(stats["detcon_shared_regions"]) <= 16
    # One image as both views: with its own masks a region's positive is itself; with the masks
    # mirrored, the "same" region sits elsewhere.
    image, mask = views[0], views[2]
    torch.manual_seed(0)
    aligned, _ = model.compute_loss([image, image.clone(), mask, mask.clone()])
    torch.manual_seed(0)
    mirrored, _ = model.compute_loss([image, image.clone(), mask, mask.flip(-1)])
    assert float(aligned) < float(mirrored) - 0.5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # the same regions each step
        loss, _ = model.compute_loss(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_detcon_refuses_the_tensor_path_with_the_override_that_works():
    with pytest.raises(ValueError, match="method=detcon needs data.augment=pil"):
        build(smoke_config("detcon", "data.augment=tensor"))
    assert smoke_config("detcon")["data"]["augment"] == "pil"  # the method's own default


@pytest.mark.parametrize("method", ["densecl", "detcon"])
def test_demo_presets_size_the_method_for_the_demo_scenes(method):
    config = plain_config(compose_config("pretrain", overrides=[f"experiment=demo_{method}"]))
    views = config["method"]["transform"]
    assert views["input_size"] == 64 and views["random_gray_scale"] == 1.0
    assert config["optimizer"]["_target_"] == "torch.optim.SGD" and config["optimizer"]["base_lr"] == 0.2
    model = build(config)  # refuses what cannot run (DetCon on the demo's tensor path)
    if method == "densecl":
        assert config["data"]["augment"] == "tensor" and model.tensor_views is not None
        assert model.momentum() == 0.99
    else:
        assert config["data"]["augment"] == "pil" and model.num_regions == 4  # a 2x2 grid on a 2x2 map


# ------------------------------------------------------------------------- runs, export, finetune
@pytest.mark.parametrize("method, augment", [("densecl", "tensor"), ("detcon", "pil")])
def test_smoke_run_exports_a_backbone_the_detector_loads(tmp_path, monkeypatch, method, augment):
    from finetune.backbone import load_backbone
    from pretrain.train import train

    monkeypatch.chdir(tmp_path)
    metrics = train(smoke_config(method, f"data.augment={augment}"))
    assert metrics["method"] == method and metrics["global_step"] == 4 and math.isfinite(metrics["final_loss"])
    assert set(metrics["diagnostics"]) == ({"densecl_global_loss", "densecl_dense_loss", "densecl_momentum"}
                                           if method == "densecl" else {"detcon_shared_regions"})
    meta = json.loads((tmp_path / "backbone.json").read_text())
    settings = meta["method_settings"]
    assert meta["method"] == method and settings["temperature"] == (0.2 if method == "densecl" else 0.1)
    if method == "densecl":
        assert settings["dense_lambda"] == 0.5 and settings["queue_size"] == "auto"
        assert settings["queue_length"] == 8 == metrics["resolved_settings"]["queue_length"]  # 32 images
    else:
        assert settings["num_samples"] == 4 and settings["views"]["grid_size"] == [4, 4]
    # Into fine-tuning's ResNet, strictly, from the backbone file and from the Lightning checkpoint.
    exported = load_file(tmp_path / "backbone.safetensors")
    for path in (tmp_path / "backbone.safetensors", tmp_path / "checkpoints" / "last.ckpt"):
        resnet, report = load_backbone(path, "auto", "frozen_bn")
        assert len(report.matched) == 100 and not report.missing and not report.unexpected, path
        assert torch.equal(resnet.layer4[1].conv2.weight, exported["layer4.1.conv2.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["densecl", "detcon"])
def test_cli_smoke_pretrain_then_finetune_on_its_backbone(tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    synthetic = f"data.synthetic_dir={tmp_path / 'synthetic'}"
    run = tmp_path / "pretrain"
    subprocess.run([sys.executable, "-m", "pretrain", "experiment=smoke", f"method={method}", synthetic,
                    f"hydra.run.dir={run}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert json.loads((run / "backbone.json").read_text())["method"] == method
    out = tmp_path / "finetune"
    subprocess.run([sys.executable, "-m", "finetune", "experiment=smoke", synthetic,
                    f"backbone.checkpoint={run / 'backbone.safetensors'}", f"hydra.run.dir={out}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert (out / "metrics.json").is_file() and (out / "predictions.json").is_file()
