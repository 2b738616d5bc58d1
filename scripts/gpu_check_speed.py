"""Phase 2 of the GPU check: speed, each figure against its plain reference in the same run.

- ``swav``: SwAV multi-crop pretraining end to end, image files on disk -> decoded -> views -> optimiser
  step. ``ours`` is the project's path for a GPU (``data.augment=tensor``: the loader workers decode
  each file once with torchvision.io and fit it into a square, the views are made in batches on the
  GPU, ``data.views_on=device``; the SwAV module under Lightning at ``auto`` precision and
  channels_last, pinned memory); ``plain`` is lightly's SwAV example moved to the GPU (lightly's PIL
  ``SwaVTransform`` in the same number of DataLoader workers, fp32, NCHW, one backbone call per crop).
  On a GPU: ResNet-50, 2x224 + 6x96 crops, read against the goal of 2,500 images/s on one H100.
- ``frcnn``: Faster R-CNN R50-FPN training at 800 px, ours (the fine-tuning module under Lightning,
  ``auto`` precision) against torchvision's reference loop in fp32 (scripts/bench_finetune.py's two
  loops, on its synthetic data resized up to 800 px by the detector).
- inference: scripts/bench_infer.py (plain torchvision against ``auto`` precision, channels_last and
  the 100-proposal fast path), run by the check as its own command.

Each mode runs in its own process (its peak GPU memory is its own) and prints a ``RESULT`` line::

    python scripts/gpu_check_speed.py data --out DIR [--toy]
    python scripts/gpu_check_speed.py swav --one ours|plain --data DIR [--toy]
    python scripts/gpu_check_speed.py frcnn --one ours|plain --data DIR [--toy]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from gpu_check_jobs import REPO, RESULT

GOAL_SWAV_IMAGES_PER_S = 2500  # issue 33: SwAV R50 2x224+6x96 end to end on one H100
# Sizes: (GPU, toy CPU dry run)
SWAV: dict[str, dict[str, Any]] = {
    "gpu": {"arch": "resnet50", "crops": "224x2,96x6", "batch_size": 128, "prototypes": 3000, "warmup": 5,
            "steps": 25, "images": 4096, "image_size": (400, 320)},
    "toy": {"arch": "resnet18", "crops": "64x2,32x2", "batch_size": 8, "prototypes": 16, "warmup": 1, "steps": 2,
            "images": 32, "image_size": (96, 80)}}
FRCNN: dict[str, dict[str, Any]] = {
    "gpu": {"arch": "resnet50", "min_size": 800, "batch_size": 8, "warmup": 5, "steps": 20, "image_size": 160},
    "toy": {"arch": "resnet18", "min_size": 128, "batch_size": 2, "warmup": 1, "steps": 2, "image_size": 96}}
INFER = {"gpu": ["--arch", "resnet50", "--min-size", "800", "--images", "32", "--batch-size", "4", "--repeats", "3",
                 "--modes", "plain", "ours", "ours_p100"],
         "toy": ["--arch", "resnet18", "--min-size", "128", "--images", "4", "--batch-size", "2", "--repeats", "1",
                 "--modes", "plain", "ours_p100"]}


def workers() -> int:
    """DataLoader workers of both end-to-end loops: the cores less two (the training process and the
    check), at most 12."""
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def _photo(job: tuple[Path, int, tuple[int, int]]) -> None:
    """A photograph-like JPEG: smooth colour fields plus sensor-like noise, so that it decodes like a
    photo (random noise would not compress, and would decode slower than a real image)."""
    import numpy as np
    from PIL import Image

    path, seed, (w, h) = job
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(low, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_data(out: Path, size: str) -> dict[str, Any]:
    """The image folder of ``swav`` and the synthetic detection set of ``frcnn``."""
    from pretrain.core.data.synthetic import ensure_synthetic

    s, f = SWAV[size], FRCNN[size]
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    todo = [(photos / f"{i:06d}.jpg", i, s["image_size"]) for i in range(s["images"])
            if not (photos / f"{i:06d}.jpg").is_file()]
    t0 = time.perf_counter()
    with Pool(max(1, (os.cpu_count() or 1))) as pool:
        pool.map(_photo, todo, chunksize=16)
    data = ensure_synthetic(out / "detection", seed=0, num_train=f["batch_size"] * (f["warmup"] + f["steps"]),
                            num_val=2, num_unlabeled=0, image_size=f["image_size"])
    return {"photos": s["images"], "detection_images": f["batch_size"] * (f["warmup"] + f["steps"]),
            "wall_s": round(time.perf_counter() - t0, 1), "train_json": str(data["train_json"])}


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_start(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: Any) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def swav(mode: str, data: Path, size: str) -> dict[str, Any]:
    import hydra.utils
    import pytorch_lightning as pl
    import torch
    from bench_common import StepTimer, sync
    from bench_pretrain import _ExampleSwaV, parse_crops, swav_config

    from pretrain.core.run.precision import choose

    s = SWAV[size]
    device = _device()
    sizes, counts = parse_crops(s["crops"])
    folder = data / "photos"
    n_workers = workers()
    torch.manual_seed(0)
    _peak_start(device)
    if mode == "ours":
        from pretrain.data import train_loader
        from pretrain.methods.swav import SwAV

        auto = choose({"accelerator": device.type, "precision": "auto"}, "auto")
        ns = argparse.Namespace(arch=s["arch"], batch_size=s["batch_size"], prototypes=s["prototypes"],
                                channels_last=auto.channels_last)
        config = swav_config(ns, sizes, counts, f"data.root={folder}", f"data.num_workers={n_workers}",
                             "data.augment=tensor", "data.views_on=device", "data.cache_decoded=false")
        model = SwAV(config)
        timer = StepTimer(s["warmup"], device)
        trainer = pl.Trainer(accelerator=device.type, devices=1, precision=auto.precision,  # type: ignore[arg-type]
                             max_steps=s["warmup"] + s["steps"], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                             num_sanity_val_steps=0)
        loader = train_loader(config["data"], hydra.utils.instantiate(config["method"]["transform"]),
                              config["method"]["transform"])
        trainer.fit(model, loader)
        rate = s["batch_size"] / timer.per_step
        row = {"precision": auto.precision, "channels_last": auto.channels_last,
               "data": "data.augment=tensor (torchvision.io decode in the workers), views on the device",
               "pin_memory": loader.pin_memory}
    else:
        from lightly.loss import SwaVLoss
        from lightly.transforms import SwaVTransform

        from pretrain.core.backbone.resnet import FEATURE_DIMS, build_resnet
        from pretrain.core.data.unlabeled import UnlabeledImages

        transform = SwaVTransform(crop_sizes=tuple(sizes), crop_counts=tuple(counts),  # type: ignore[arg-type]
                                  crop_min_scales=(0.14,) + (0.05,) * (len(sizes) - 1),  # type: ignore[arg-type]
                                  crop_max_scales=(1.0,) + (0.14,) * (len(sizes) - 1))  # type: ignore[arg-type]
        loader = torch.utils.data.DataLoader(UnlabeledImages(folder, transform=transform),
                                             batch_size=s["batch_size"], shuffle=True, drop_last=True,
                                             num_workers=n_workers)
        example = _ExampleSwaV(build_resnet(s["arch"], "bn"), FEATURE_DIMS[s["arch"]], s["prototypes"]).to(device)
        criterion = SwaVLoss()
        optimizer = torch.optim.Adam(example.parameters(), lr=0.001)
        example.train()
        t0, steps = 0.0, 0
        for i, batch in enumerate(loader):
            if i == s["warmup"]:
                sync(device)
                t0 = time.perf_counter()
            if i >= s["warmup"] + s["steps"]:
                break
            views = [v.to(device) for v in batch]
            example.prototypes.normalize()
            feats = [example(x) for x in views]
            loss = criterion(feats[:counts[0]], feats[counts[0]:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += i >= s["warmup"]
        sync(device)
        rate = s["batch_size"] * steps / (time.perf_counter() - t0)
        row = {"precision": "32", "channels_last": False, "data": "lightly SwaVTransform (PIL) in the workers"}
    return {**row, "images_per_s": round(rate, 2), "peak_mem_mb": _peak_mb(device), "arch": s["arch"],
            "crops": s["crops"], "batch_size": s["batch_size"], "workers": n_workers, "timed_steps": s["steps"],
            "device": str(device)}


def frcnn(mode: str, data: Path, size: str) -> dict[str, Any]:
    import tempfile

    from bench_finetune import bench_ours, bench_plain, compose_cfg

    from finetune.transforms import build_transforms
    from pretrain.core.data.coco import CocoDetection
    from pretrain.core.run.precision import choose

    f = FRCNN[size]
    device = _device()
    args = argparse.Namespace(detector="fasterrcnn", arch=f["arch"], batch_size=f["batch_size"], workers=workers(),
                              min_size=f["min_size"], warmup=f["warmup"], steps=f["steps"], plain_precision="32",
                              precision=choose({"accelerator": device.type, "precision": "auto"}).precision)
    root = data / "detection"
    cfg = compose_cfg(args, root)
    ds = CocoDetection(root / "train.json", transforms=build_transforms(True, hflip=0.5), train=True)
    _peak_start(device)
    if mode == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            wall, _ = bench_ours(cfg, ds, args, device, Path(tmp))
        precision = args.precision
    else:
        wall, _ = bench_plain(cfg, ds, args, device)
        precision = "32"
    return {"images_per_s": round(wall, 2), "precision": precision, "peak_mem_mb": _peak_mb(device),
            "arch": f["arch"], "min_size": f["min_size"], "max_size": int(f["min_size"] * 1.333),
            "batch_size": f["batch_size"], "timed_steps": f["steps"], "device": str(device)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("data", "swav", "frcnn"))
    p.add_argument("--one", choices=("ours", "plain"))
    p.add_argument("--data", "--out", dest="data", type=Path, required=True)
    p.add_argument("--toy", action="store_true", help="the CPU dry run's sizes")
    a = p.parse_args(argv)
    os.chdir(REPO)
    size = "toy" if a.toy else "gpu"
    if a.what == "data":
        result = make_data(a.data, size)
    else:
        if a.one is None:
            raise SystemExit("--one ours|plain")
        result = (swav if a.what == "swav" else frcnn)(a.one, a.data, size)
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
