"""Throughput of a SwAV multi-crop training step: our Lightning module vs a plain loop vs the ceiling.

Three measurements on the same crop shapes, one process, one after the other:

- ``ours``: :class:`pretrain.methods.swav.SwAV` trained by a Lightning Trainer (LARS, warmup +
  cosine schedule, prototype normalisation, Sinkhorn, logging: the real training step) at the
  chosen precision and memory format, on precomputed batches of real SwaVTransform crops.
- ``plain``: a minimal PyTorch loop written like lightly's documented SwAV example
  (examples/pytorch/swav.py): fp32, NCHW, one backbone call per crop, Adam, same heads and crops.
- ``ceiling``: only the backbone's forward + backward on random tensors of the same crop shapes,
  at our precision and memory format, one call per resolution: what the step cannot beat.

Data loading is left out of all three (the crops are made once, up front).

    python scripts/bench_pretrain.py --batch-size 32 --crops 96x2,48x4
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.transforms import SwaVTransform
from PIL import Image
from torch import nn

from pretrain.core.resnet import FEATURE_DIMS, build_resnet
from pretrain.methods.base import plain_config
from pretrain.methods.swav import SwAV

CONF = str(Path(__file__).resolve().parents[1] / "conf" / "pretrain")


def parse_crops(spec: str) -> tuple[list[int], list[int]]:
    """``"96x2,48x4"`` -> sizes [96, 48], counts [2, 4]."""
    sizes, counts = [], []
    for part in spec.split(","):
        size, count = part.lower().split("x")
        sizes.append(int(size))
        counts.append(int(count))
    return sizes, counts


def make_batches(n: int, batch_size: int, sizes: list[int], counts: list[int], seed: int = 0) -> list[list[torch.Tensor]]:
    """``n`` batches of SwaVTransform crops of random-texture images (content does not matter here)."""
    rng = np.random.default_rng(seed)
    transform = SwaVTransform(crop_sizes=tuple(sizes), crop_counts=tuple(counts),
                              crop_min_scales=(0.14,) + (0.05,) * (len(sizes) - 1),
                              crop_max_scales=(1.0,) + (0.14,) * (len(sizes) - 1))
    side = max(sizes) * 2
    batches = []
    for _ in range(n):
        views = [transform(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)))
                 for _ in range(batch_size)]
        batches.append([torch.stack([v[i] for v in views]) for i in range(len(views[0]))])
    return batches


class _Timer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx >= self.warmup:
            self.end = time.perf_counter()
            self.steps += 1


def bench_ours(args: argparse.Namespace, batches: list[list[torch.Tensor]], sizes: list[int],
               counts: list[int]) -> float:
    overrides = [
        "method=swav", f"backbone={args.arch}", f"data.batch_size={args.batch_size}",
        f"method.num_prototypes={args.prototypes}", f"method.transform.crop_sizes={sizes}",
        f"method.transform.crop_counts={counts}", f"backbone.channels_last={args.channels_last}",
        "method.freeze_prototypes_iters=1",
    ]
    with initialize_config_dir(CONF, version_base="1.3"):
        config = plain_config(compose("pretrain", overrides=overrides))
    model = SwAV(config)
    timer = _Timer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=len(batches), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], num_sanity_val_steps=0,
    )
    # batch_size=None: each dataset item already is a batch.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    assert timer.start is not None
    return args.batch_size * timer.steps / (timer.end - timer.start)


class _ExampleSwaV(nn.Module):
    """The model of lightly's examples/pytorch/swav.py, with our head sizes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, prototypes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(feature_dim, 2048, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        x = self.projection_head(x)
        x = nn.functional.normalize(x, dim=1, p=2)
        return self.prototypes(x)


def bench_plain(args: argparse.Namespace, batches: list[list[torch.Tensor]], num_high: int) -> float:
    model = _ExampleSwaV(build_resnet(args.arch, "bn"), FEATURE_DIMS[args.arch], args.prototypes)
    criterion = SwaVLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    start = 0.0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            start = time.perf_counter()
        model.prototypes.normalize()
        multi_crop_features = [model(x) for x in batch]
        loss = criterion(multi_crop_features[:num_high], multi_crop_features[num_high:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return args.batch_size * (len(batches) - args.warmup) / (time.perf_counter() - start)


def bench_ceiling(args: argparse.Namespace, batches: list[list[torch.Tensor]]) -> float:
    backbone = build_resnet(args.arch, "bn")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    backbone.to(memory_format=fmt)
    # One tensor per resolution, as our step batches crops of equal size.
    shapes: dict[tuple[int, ...], int] = {}
    for v in batches[0]:
        shapes[tuple(v.shape[1:])] = shapes.get(tuple(v.shape[1:]), 0) + v.shape[0]
    inputs = [torch.randn(n, *s).contiguous(memory_format=fmt) for s, n in shapes.items()]
    bf16 = args.precision.startswith("bf16")
    start = 0.0
    for i in range(len(batches)):
        if i == args.warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(backbone(x).float().mean() for x in inputs)
        loss.backward()  # type: ignore[union-attr]
        backbone.zero_grad(set_to_none=True)
    return args.batch_size * (len(batches) - args.warmup) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--crops", default="96x2,48x4",
                        help="crop SIZExCOUNT groups, high resolution first (default 96x2,48x4)")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--precision", default="bf16-mixed", choices=("32", "bf16-mixed"),
                        help="precision of ours and the ceiling (the plain loop is always fp32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC for ours and the ceiling (default on)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--modes", default="plain,ceiling,ours", help="comma-separated subset to run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved repetitions; the best round of each mode counts (default 2), "
                             "which filters out other processes' bursts on a shared machine")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes, counts = parse_crops(args.crops)
    batches = make_batches(args.warmup + args.steps, args.batch_size, sizes, counts)
    modes = args.modes.split(",")
    print(f"SwAV {args.arch}, batch {args.batch_size}, crops {args.crops}, {args.prototypes} prototypes, "
          f"{args.threads} threads, ours/ceiling: precision {args.precision}, channels_last {args.channels_last}; "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)
    results: dict[str, float] = {}
    for r in range(args.rounds):
        for mode in modes:
            if mode == "plain":
                ips = bench_plain(args, batches, counts[0])
            elif mode == "ceiling":
                ips = bench_ceiling(args, batches)
            elif mode == "ours":
                ips = bench_ours(args, batches, sizes, counts)
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            results[mode] = max(results.get(mode, 0.0), ips)
            print(f"  round {r + 1} {mode}: {ips:.2f} images/s", flush=True)

    print(f"\nbest of {args.rounds} rounds:\n{'mode':<10}{'images/s':>10}{'ms/step':>10}{'vs plain':>10}{'vs ceiling':>12}")
    for mode, ips in results.items():
        vs_plain = f"{ips / results['plain']:.2f}x" if "plain" in results else "-"
        vs_ceiling = f"{ips / results['ceiling']:.2f}" if "ceiling" in results else "-"
        print(f"{mode:<10}{ips:>10.2f}{1000 * args.batch_size / ips:>10.0f}{vs_plain:>10}{vs_ceiling:>12}")


if __name__ == "__main__":
    main()
