"""Throughput of SwAV multi-crop pretraining: ours against a plain loop and against the machine's ceiling.

Compute only (crops made once, up front; one process, modes interleaved over ``--rounds``):

- ``ours``: :class:`pretrain.methods.swav.SwAV` trained by a Lightning Trainer (LARS, warmup +
  cosine, prototype normalisation, Sinkhorn, logging: the real training step) at the precision and
  memory format that ``auto`` chooses on this machine (or ``--precision`` / ``--channels-last``).
- ``plain``: a minimal PyTorch loop written like lightly's documented SwAV example
  (examples/pytorch/swav.py): fp32, NCHW, one backbone call per crop, Adam, same heads and crops.
- ``ceiling``: the backbone's forward + backward alone on random tensors of the same crop shapes, one
  call per resolution, in *every* precision (fp32, bf16 autocast) and memory format (NCHW, NHWC);
  the best of the four is the ceiling. It does not depend on our settings, so a wrong precision
  choice shows up as ours falling short of it.

End to end (``--e2e``; files on disk -> decoded -> augmented -> optimiser step):

- ``plain_e2e``: the plain loop fed by a PIL DataLoader with lightly's SwaVTransform
  (``--workers`` processes), as lightly's example does.
- ``ours_e2e``: our data path (``--augment pil``: lightly's transform in the workers, as the
  plain loop; ``--augment tensor``: batched views, ``--views-on loader|device``) and module under
  Lightning, as ``python -m pretrain`` runs them.

Figures are medians over rounds; ``--json FILE`` writes them for scripts/bench_report.py.

    python scripts/bench_pretrain.py [--batch-size 32 --crops 96x2,48x4 --e2e --json out.json]
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
from bench_common import StepTimer, describe, machine_info, median, write_json
from hydra import compose, initialize_config_dir
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.transforms import SwaVTransform
from PIL import Image
from torch import nn

from pretrain.core.backbone.resnet import FEATURE_DIMS, build_resnet
from pretrain.core.run.precision import choose
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


def make_batches(n: int, batch_size: int, sizes: list[int], counts: list[int],
                 seed: int = 0) -> list[list[torch.Tensor]]:
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


def swav_config(args: argparse.Namespace, sizes: list[int], counts: list[int], *extra: str) -> dict:
    overrides = [
        "method=swav", f"backbone.arch={args.arch}", f"data.batch_size={args.batch_size}",
        f"method.num_prototypes={args.prototypes}", f"method.transform.crop_sizes={sizes}",
        f"method.transform.crop_counts={counts}", f"backbone.channels_last={args.channels_last}",
        "method.freeze_prototypes_iters=1", *extra,
    ]
    with initialize_config_dir(CONF, version_base="1.3"):
        return plain_config(compose("pretrain", overrides=overrides))


def bench_ours(args: argparse.Namespace, batches: list[list[torch.Tensor]], sizes: list[int],
               counts: list[int]) -> float:
    model = SwAV(swav_config(args, sizes, counts))
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=len(batches), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], num_sanity_val_steps=0,
    )
    # batch_size=None: each dataset item already is a batch.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    return args.batch_size / timer.per_step


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


CEILING_CONFIGS = (("32", False), ("32", True), ("bf16-mixed", False), ("bf16-mixed", True))


def bench_ceiling(args: argparse.Namespace, batches: list[list[torch.Tensor]], precision: str,
                  channels_last: bool) -> float:
    """Backbone forward + backward alone, one call per crop resolution, in one configuration."""
    backbone = build_resnet(args.arch, "bn")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=fmt)
    shapes: dict[tuple[int, ...], int] = {}
    for v in batches[0]:
        shapes[tuple(v.shape[1:])] = shapes.get(tuple(v.shape[1:]), 0) + v.shape[0]
    inputs = [torch.randn(n, *s).contiguous(memory_format=fmt) for s, n in shapes.items()]
    bf16 = precision.startswith("bf16")
    start = 0.0
    for i in range(len(batches)):
        if i == args.warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(backbone(x).float().mean() for x in inputs)
        loss.backward()  # type: ignore[union-attr]
        backbone.zero_grad(set_to_none=True)
    return args.batch_size * (len(batches) - args.warmup) / (time.perf_counter() - start)


def e2e_folder(args: argparse.Namespace) -> Path:
    """A folder of image files on disk: ``--images`` or the demo's synthetic unlabeled set."""
    if args.images:
        return Path(args.images)
    from pretrain.core.data.synthetic import ensure_synthetic

    return Path(ensure_synthetic(Path(args.synthetic_dir))["unlabeled"])


def bench_plain_e2e(args: argparse.Namespace, folder: Path, sizes: list[int], counts: list[int]) -> float:
    """lightly's example: ImageFolder-style PIL dataset + SwaVTransform in DataLoader workers + plain loop."""
    from pretrain.core.data.unlabeled import UnlabeledImages

    transform = SwaVTransform(crop_sizes=tuple(sizes), crop_counts=tuple(counts),
                              crop_min_scales=(0.14,) + (0.05,) * (len(sizes) - 1),
                              crop_max_scales=(1.0,) + (0.14,) * (len(sizes) - 1))
    loader = torch.utils.data.DataLoader(UnlabeledImages(folder, transform=transform), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers)
    model = _ExampleSwaV(build_resnet(args.arch, "bn"), FEATURE_DIMS[args.arch], args.prototypes)
    criterion = SwaVLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    start, steps = 0.0, 0
    for i, batch in enumerate(loader):
        if i == args.warmup:
            start = time.perf_counter()
        if i >= args.warmup + args.steps:
            break
        model.prototypes.normalize()
        feats = [model(x) for x in batch]
        loss = criterion(feats[:counts[0]], feats[counts[0]:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += i >= args.warmup
    return args.batch_size * steps / (time.perf_counter() - start)


def bench_ours_e2e(args: argparse.Namespace, folder: Path, sizes: list[int], counts: list[int]) -> float:
    """Our data path and module under Lightning, as ``python -m pretrain data.root=FOLDER`` runs them."""
    import hydra.utils

    from pretrain.data import train_loader

    config = swav_config(args, sizes, counts, f"data.root={folder}", f"data.num_workers={args.workers}",
                         f"data.augment={args.augment}", f"data.views_on={args.views_on}",
                         f"data.cache_decoded={args.augment == 'tensor'}")
    model = SwAV(config)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], num_sanity_val_steps=0,
    )
    transform = hydra.utils.instantiate(config["method"]["transform"])
    trainer.fit(model, train_loader(config["data"], transform, config["method"]["transform"]))
    return args.batch_size / timer.per_step


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--crops", default="96x2,48x4",
                        help="crop SIZExCOUNT groups, high resolution first (default 96x2,48x4)")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16-mixed"),
                        help="precision of ours (default auto: chosen from the hardware); the plain loop is fp32")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"),
                        help="NHWC for ours (default auto)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--modes", default="plain,ceiling,ours", help="comma-separated subset to run")
    parser.add_argument("--e2e", action="store_true", help="add the end-to-end modes plain_e2e and ours_e2e")
    parser.add_argument("--images", default=None, help="end to end: a folder of images (default: synthetic set)")
    parser.add_argument("--synthetic-dir", default="data/synthetic", help="where the synthetic set is made")
    parser.add_argument("--workers", type=int, default=2, help="end to end: DataLoader workers (default 2)")
    parser.add_argument("--augment", default="pil", choices=("pil", "tensor"),
                        help="end to end: our data.augment (pil: lightly's transform in workers; tensor: batched)")
    parser.add_argument("--views-on", default="loader", choices=("loader", "device"),
                        help="end to end with --augment tensor: where the views are made (data.views_on)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved repetitions; each mode reports its median (default 3)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    auto = choose({"accelerator": "cpu", "precision": args.precision}, args.channels_last)
    args.precision, args.channels_last = auto.precision, auto.channels_last
    info = machine_info("cpu")
    sizes, counts = parse_crops(args.crops)
    batches = make_batches(args.warmup + args.steps, args.batch_size, sizes, counts)
    modes = args.modes.split(",") + (["plain_e2e", "ours_e2e"] if args.e2e else [])
    folder = e2e_folder(args) if args.e2e else None
    print(f"SwAV {args.arch}, batch {args.batch_size}, crops {args.crops}, {args.prototypes} prototypes; "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.rounds} rounds\n"
          f"machine: {describe(info)}\nours: precision {args.precision}, channels_last {args.channels_last}",
          flush=True)
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for mode in modes:
            if mode == "ceiling":
                for prec, nhwc in CEILING_CONFIGS:
                    name = f"ceiling_{prec}_{'nhwc' if nhwc else 'nchw'}"
                    runs.setdefault(name, []).append(bench_ceiling(args, batches, prec, nhwc))
                    print(f"  round {r + 1} {name}: {runs[name][-1]:.2f} images/s", flush=True)
                continue
            if mode == "plain":
                ips = bench_plain(args, batches, counts[0])
            elif mode == "ours":
                ips = bench_ours(args, batches, sizes, counts)
            elif mode == "plain_e2e":
                ips = bench_plain_e2e(args, folder, sizes, counts)  # type: ignore[arg-type]
            elif mode == "ours_e2e":
                ips = bench_ours_e2e(args, folder, sizes, counts)  # type: ignore[arg-type]
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            runs.setdefault(mode, []).append(ips)
            print(f"  round {r + 1} {mode}: {ips:.2f} images/s", flush=True)

    ips = {m: median(v) for m, v in runs.items()}
    ceilings = {m: v for m, v in ips.items() if m.startswith("ceiling_")}
    if ceilings:
        best = max(ceilings, key=ceilings.__getitem__)
        ips["ceiling"] = ceilings[best]
        print(f"ceiling: the best of {len(ceilings)} configurations is {best}")
    rows: dict[str, dict] = {}
    print(f"\nmedian of {args.rounds} rounds:\n"
          f"{'mode':<26}{'images/s':>10}{'ms/step':>10}{'vs plain':>10}{'vs ceiling':>12}")
    for mode, v in ips.items():
        base = "plain_e2e" if mode.endswith("_e2e") else "plain"
        vs_plain = v / ips[base] if base in ips else None
        vs_ceiling = v / ips["ceiling"] if "ceiling" in ips and not mode.endswith("_e2e") else None
        rows[mode] = {"images_per_s": round(v, 2), "runs": [round(x, 2) for x in runs.get(mode, [v])],
                      "vs_plain": round(vs_plain, 3) if vs_plain else None,
                      "vs_ceiling": round(vs_ceiling, 3) if vs_ceiling else None,
                      "precision": (args.precision if mode.startswith("ours") else
                                    "32" if mode.startswith("plain") else mode.split("_")[1] if "_" in mode
                                    else best.split("_")[1]),
                      "end_to_end": mode.endswith("_e2e")}
        print(f"{mode:<26}{v:>10.2f}{1000 * args.batch_size / v:>10.0f}"
              f"{f'{vs_plain:.2f}x' if vs_plain else '-':>10}{f'{vs_ceiling:.2f}' if vs_ceiling else '-':>12}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        print(f"wrote {write_json(args.json, 'pretrain', info, rows, settings)}")
    return rows


if __name__ == "__main__":
    main()
