"""Benchmark: our fine-tuning module and COCO evaluation against the plain libraries, in one run.

Training: images/s of ``finetune.module.DetectionModule`` driven by the Lightning Trainer (with the
callbacks and logging a real run uses) against a plain torchvision training loop on the same model,
batch, data, optimiser and schedule. Evaluation: seconds for ``finetune.coco_eval.evaluate_coco``
against pycocotools called directly (and faster-coco-eval) on the same predictions.

    python scripts/bench_finetune.py [--detector fasterrcnn] [--arch resnet18] [--batch-size 4]
        [--min-size 320] [--steps 30] [--precision auto|32|bf16-mixed] [--device auto] [--repeats 3]

Ours runs at the precision ``trainer.precision=auto`` chooses on this machine (``--precision``
overrides it); the plain loop is torchvision's reference loop in fp32, as a user would write it.
Timings are the median of ``--repeats`` alternating runs. Training is also reported per CPU-second of
this process, which other jobs on the machine disturb far less than wall time. ``--json FILE``
writes the figures (with the machine) for scripts/bench_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from bench_common import StepTimer, clocks, describe, machine_info, median, sync, write_json
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from finetune.coco_eval import evaluate_coco
from finetune.module import IMAGENET_MEAN, IMAGENET_STD, DetectionModule, build_model
from finetune.optim import param_groups
from finetune.transforms import build_transforms
from pretrain.core.backbone.resnet import build_resnet
from pretrain.core.data.coco import CocoDetection, collate_fn
from pretrain.core.data.synthetic import make_synthetic
from pretrain.core.run.precision import choose
from pretrain.core.run.schedule import lr_factor
from pretrain.core.run.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]  # for conf/finetune


def compose_cfg(args: argparse.Namespace, data_root: Path) -> Any:
    overrides = [
        f"detector={args.detector}", f"backbone.arch={args.arch}", f"data.root={data_root}",
        "data.synthetic=null",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"detector.min_size={args.min_size}", f"detector.max_size={int(args.min_size * 1.333)}",
        "backbone.norm=frozen_bn", "optimizer.lr=0.005", f"trainer.precision={args.precision}",
        "eval.plots=false",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "finetune"), version_base="1.3"):
        return compose("finetune", overrides=overrides)


def make_loader(ds: CocoDetection, args: argparse.Namespace) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate_fn,
                      generator=g, persistent_workers=args.workers > 0, pin_memory=torch.cuda.is_available())


def bench_ours(cfg: Any, ds: CocoDetection, args: argparse.Namespace, device: torch.device,
               out: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    plain = OmegaConf.to_container(cfg, resolve=True)
    info = {"arch": args.arch, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "summary": {}}
    module = DetectionModule(plain, ds.label_map.to_json(), info)  # type: ignore[arg-type]
    timer = StepTimer(args.warmup, device)
    trainer_cfg = {**plain["trainer"], "max_steps": args.warmup + args.steps, "max_epochs": -1,  # type: ignore[index]
                   "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                   "accelerator": device.type, "devices": 1}
    trainer = build_trainer(trainer_cfg, out, callbacks=[timer])
    trainer.fit(module, make_loader(ds, args))
    return timer.rate


def bench_plain(cfg: Any, ds: CocoDetection, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """The reference: torchvision's detection training loop (references/detection/engine.py) reduced."""
    torch.manual_seed(0)
    plain = OmegaConf.to_container(cfg, resolve=True)
    info = {"arch": args.arch, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    model = build_model(plain, ds.num_classes, info, build_resnet(args.arch, "frozen_bn")).to(device)  # type: ignore[arg-type]
    model.train()
    groups = param_groups(model, 0.005, 1e-4)
    opt = torch.optim.SGD(groups, lr=0.005, momentum=0.9, weight_decay=1e-4)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, total_steps=total, name="step"))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.plain_precision == "bf16-mixed"
                else contextlib.nullcontext())
    step, images, t0 = 0, 0, (0.0, 0.0)
    while step < total:
        for imgs, targets in make_loader(ds, args):
            if step == args.warmup:
                sync(device)
                t0 = clocks()
            imgs = [im.to(device, non_blocking=True) for im in imgs]
            tg = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)}
                  for t in targets]
            with autocast:
                losses = model(imgs, tg)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            step += 1
            if step > args.warmup:
                images += len(imgs)
            if step >= total:
                break
    sync(device)
    t1 = clocks()
    return images / (t1[0] - t0[0]), images / (t1[1] - t0[1])


def noisy_predictions(coco: Any, per_box: int, seed: int = 0) -> list[dict[str, Any]]:
    """Realistic-volume detections: jittered, partly mislabeled copies of the ground truth plus clutter."""
    rng = random.Random(seed)
    cats = sorted(coco.getCatIds())
    preds = []
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(per_box):
            preds.append({"image_id": a["image_id"],
                          "category_id": a["category_id"] if rng.random() < 0.7 else rng.choice(cats),
                          "bbox": [x + rng.gauss(0, 0.15 * w), y + rng.gauss(0, 0.15 * h), w * rng.uniform(0.6, 1.4),
                                   h * rng.uniform(0.6, 1.4)], "score": rng.random()})
    for img in coco.dataset["images"]:
        for _ in range(20):
            W, H = img["width"], img["height"]
            x, y = rng.uniform(0, W * 0.9), rng.uniform(0, H * 0.9)
            preds.append({"image_id": img["id"], "category_id": rng.choice(cats),
                          "bbox": [x, y, rng.uniform(4, W - x), rng.uniform(4, H - y)], "score": rng.random() * 0.5})
    return preds


def pycocotools_direct(ann_file: Path, pred_file: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(str(pred_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def ours_from_files(ann_file: Path, pred_file: Path, backend: str) -> list[float]:
    result = evaluate_coco(ann_file, json.loads(pred_file.read_text()), backend=backend)
    return list(result.stats.values())


def median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default="fasterrcnn", choices=("fasterrcnn", "retinanet"))
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=160, help="synthetic image side")
    p.add_argument("--min-size", type=int, default=320, help="detector input short side")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "32", "bf16-mixed"),
                   help="ours (default auto: chosen from the hardware)")
    p.add_argument("--plain-precision", default="32", choices=("32", "bf16-mixed"),
                   help="the plain loop's (default 32, torchvision's reference)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--json", "--out", dest="json", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.precision = choose({"accelerator": device.type, "precision": args.precision}).precision
    tmp = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        run(args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # data and the Lightning runs' checkpoints


def run(args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    n_train = args.batch_size * (args.warmup + args.steps)
    data = make_synthetic(tmp / "data", seed=0, num_train=n_train, num_val=args.eval_images, num_unlabeled=0,
                          image_size=args.image_size)
    cfg = compose_cfg(args, data["root"])
    ds = CocoDetection(data["train_json"], transforms=build_transforms(True, hflip=0.5), train=True)

    info = machine_info(device.type)
    print(f"machine: {describe(info)}\n{args.detector} {args.arch}, batch {args.batch_size}, min_size "
          f"{args.min_size}, ours at precision {args.precision}, plain at {args.plain_precision}; {args.steps} "
          f"timed steps after {args.warmup}, median of {args.repeats}", flush=True)
    plain_rates, our_rates = [], []
    for r in range(args.repeats):  # alternate so that machine load hits both alike
        plain_rates.append(bench_plain(cfg, ds, args, device))
        with contextlib.redirect_stderr(io.StringIO()):
            our_rates.append(bench_ours(cfg, ds, args, device, tmp / f"run{r}"))
        print(f"  repeat {r}: plain {plain_rates[-1][0]:.2f} img/s ({plain_rates[-1][1]:.2f} per CPU-s), "
              f"ours {our_rates[-1][0]:.2f} img/s ({our_rates[-1][1]:.2f} per CPU-s)", flush=True)
    plain_best, ours_best = median([r[0] for r in plain_rates]), median([r[0] for r in our_rates])
    plain_cpu, ours_cpu = median([r[1] for r in plain_rates]), median([r[1] for r in our_rates])

    # Evaluation on the same predictions.
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data["val_json"]))
    preds = noisy_predictions(gt, per_box=5)
    pred_file = tmp / "predictions.json"
    pred_file.write_text(json.dumps(preds))
    t_direct, s_direct = median_time(lambda: pycocotools_direct(data["val_json"], pred_file), args.repeats)
    t_ours, s_ours = median_time(lambda: ours_from_files(data["val_json"], pred_file, "pycocotools"), args.repeats)
    t_fast, s_fast = median_time(lambda: ours_from_files(data["val_json"], pred_file, "faster_coco_eval"), args.repeats)
    assert s_ours == s_direct, "our numbers differ from pycocotools'"
    assert max(abs(a - b) for a, b in zip(s_fast, s_direct)) < 1e-12, "faster-coco-eval differs"

    rows = [
        ("train: plain torchvision loop", f"{plain_best:.2f} img/s", "1.00x"),
        ("train: ours (Lightning module)", f"{ours_best:.2f} img/s", f"{ours_best / plain_best:.2f}x"),
        ("train per CPU-second: plain loop", f"{plain_cpu:.2f} img/s", "1.00x"),
        ("train per CPU-second: ours", f"{ours_cpu:.2f} img/s", f"{ours_cpu / plain_cpu:.2f}x"),
        (f"eval: pycocotools direct ({args.eval_images} img, {len(preds)} det)", f"{t_direct:.3f} s", "1.00x"),
        ("eval: ours, backend pycocotools", f"{t_ours:.3f} s", f"{t_direct / t_ours:.2f}x"),
        ("eval: ours, backend faster_coco_eval", f"{t_fast:.3f} s", f"{t_direct / t_fast:.2f}x"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'':<{w}}  {'result':>12}  {'speed vs ref':>12}")
    for name, val, ratio in rows:
        print(f"{name:<{w}}  {val:>12}  {ratio:>12}")
    print("AP (identical across evaluators):", round(s_direct[0], 4))
    if args.json:
        rows_json = {
            "train_plain": {"images_per_s": round(plain_best, 2), "per_cpu_s": round(plain_cpu, 2),
                            "runs": [round(r[0], 2) for r in plain_rates], "vs_plain": 1.0,
                            "precision": args.plain_precision},
            "train_ours": {"images_per_s": round(ours_best, 2), "per_cpu_s": round(ours_cpu, 2),
                           "runs": [round(r[0], 2) for r in our_rates], "vs_plain": round(ours_best / plain_best, 3),
                           "vs_plain_cpu": round(ours_cpu / plain_cpu, 3), "precision": args.precision},
            "eval_pycocotools": {"seconds": round(t_direct, 4), "vs_plain": 1.0},
            "eval_ours": {"seconds": round(t_ours, 4), "vs_plain": round(t_direct / t_ours, 3)},
            "eval_ours_faster_coco_eval": {"seconds": round(t_fast, 4), "vs_plain": round(t_direct / t_fast, 3)},
        }
        settings = {k: str(v) for k, v in vars(args).items() if k != "json"}
        print(f"wrote {write_json(args.json, 'finetune', info, rows_json, settings)}")


if __name__ == "__main__":
    main()
