"""Benchmark: a training step of each stage's real entry point, and its peak memory, against plain torchvision.

    python scripts/bench_steps.py [--min-size 320] [--batch-size 4] [--steps 12] [--json outputs/bench/steps.json]

Three modes, each in its own process (so that its peak memory is its own), on the same generated
images (the synthetic scenes, 160 px, resized to ``--min-size``), Faster R-CNN R18-FPN:

- ``plain``: torchvision's reference training loop on the same model, data, optimiser and
  schedule, fp32 (``scripts/bench_finetune.py``'s);
- ``finetune``: ``finetune.train.train``, what ``python -m finetune`` runs (Lightning, the data
  loader, logging, checkpoints), at ``trainer.precision=auto``;
- ``semi``: the same with ``semi=unbiased_teacher`` after burn-in: per step the teacher's forward
  pass on the unlabeled images' weak views, and the student's on the labeled and strong views
  (``data.batch_size`` labeled + as many unlabeled images).

Reports seconds per optimizer step (the mean over the ``--steps`` after ``--warmup``, timed alike in
every mode: from the first timed step's start to the last one's end, so data loading and whatever
runs between steps are inside), labeled images/s, the ratio of each step to the plain loop's and
of the semi step to the fine-tuning step, and peak memory (CUDA: max allocated; CPU: the
process's peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import StepTimer, describe, machine_info, run_mode_process, write_json
from bench_report import steps_table

REPO = Path(__file__).resolve().parents[1]
MODES = ("plain", "finetune", "semi")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def overrides(args: argparse.Namespace, data: dict[str, Any], mode: str) -> list[str]:
    out = ["detector=fasterrcnn", "backbone.arch=resnet18", "backbone.norm=frozen_bn", "data=coco",
           f"data.train_json={data['train_json']}", f"data.val_json={data['val_json']}",
           f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
           f"detector.min_size={args.min_size}", f"detector.max_size={int(args.min_size * 4 / 3)}",
           "optimizer.lr=0.005", f"trainer.max_steps={args.warmup + args.steps}", "trainer.max_epochs=-1",
           "trainer.enable_progress_bar=false", "eval.plots=false",
           f"trainer.precision={args.precision}",
           # Random init at lr 0.005 spikes to NaN within ~10 steps without clipping (measured); clipping
           # is a per-step norm over the gradients, negligible next to the step itself.
           "trainer.gradient_clip_val=10"]
    if mode == "semi":
        out += ["semi=unbiased_teacher", "semi.burn_in=0", f"semi.unlabeled={data['unlabeled_json']}"]
    return out


def one_mode(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from pretrain.core.data.synthetic import make_synthetic

    device = torch.device(args.device)
    n = args.batch_size * (args.warmup + args.steps)
    data = make_synthetic(tmp / "data", seed=0, num_train=n, num_val=2, num_unlabeled=n, image_size=160)
    if args.one == "plain":
        import bench_finetune
        from hydra import compose, initialize_config_dir

        from finetune.transforms import build_transforms
        from pretrain.core.data.coco import CocoDetection

        ns = argparse.Namespace(**{**vars(args), "plain_precision": "32", "arch": "resnet18"})
        with initialize_config_dir(config_dir=str(REPO / "conf" / "finetune"), version_base="1.3"):
            cfg = compose("finetune", overrides=overrides(args, data, "plain"))
        ds = CocoDetection(data["train_json"], transforms=build_transforms(True, hflip=0.5), train=True)
        rate, _ = bench_finetune.bench_plain(cfg, ds, ns, device)  # images/s over the timed steps
        return {"s_per_step": round(args.batch_size / rate, 4), "labeled_images_per_s": round(rate, 3),
                "precision": "32", **peak_memory_mb(device)}

    from hydra import compose, initialize_config_dir

    from finetune.run import run

    times = StepTimer(args.warmup, device)
    with initialize_config_dir(config_dir=str(REPO / "conf" / "finetune"), version_base="1.3"):
        cfg = compose("finetune", overrides=overrides(args, data, args.one))
    with contextlib.redirect_stderr(io.StringIO()):
        metrics = run(cfg, tmp / "run", callbacks=[times])
    step = times.per_step
    return {"s_per_step": round(step, 4), "labeled_images_per_s": round(args.batch_size / step, 3),
            "steps_timed": times.steps, "precision": metrics.get("precision"), **peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--min-size", type=int, default=320)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "32", "bf16-mixed"), help="ours (plain: 32)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = p.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory(prefix="bench_steps_") as tmp:
            row = one_mode(args, Path(tmp))
        print("RESULT " + json.dumps(row), flush=True)
        return
    info = machine_info(torch.device(args.device).type)
    print(f"machine: {describe(info)}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for mode in args.modes:
        rows[mode] = run_mode_process(Path(__file__).resolve(), passthrough, mode)
        print(f"  {mode}: {rows[mode]}", flush=True)
    if "plain" in rows:
        for r in rows.values():
            r["step_vs_plain"] = round(r["s_per_step"] / rows["plain"]["s_per_step"], 3)
    if "semi" in rows and "finetune" in rows:
        rows["semi"]["step_vs_finetune"] = round(rows["semi"]["s_per_step"] / rows["finetune"]["s_per_step"], 3)
    print("\n" + "\n".join(steps_table({"rows": rows})))  # the table make bench writes
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k not in ("json", "one")}
        print(f"wrote {write_json(args.json, 'steps', info, rows, settings)}")


if __name__ == "__main__":
    main()
