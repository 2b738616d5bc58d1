"""Benchmark: detector inference on a CPU or GPU: where the time goes, and what the fast path buys and costs.

    python scripts/bench_infer.py                                   # random-init R18-FPN, 80 classes, 320 px
    python scripts/bench_infer.py --ckpt RUN/checkpoints/best.ckpt --ann VAL.json --json outputs/bench/infer.json

Modes, each in its own process (so that its peak memory is its own), on the same images:

- ``plain``: the model as torchvision users run it: ``model.eval()`` under ``torch.no_grad()``, fp32,
  NCHW, torchvision's test-time budget (1000 RPN proposals per level before NMS, 1000 after);
- ``ours``: ``finetune.inference.prepare`` with precision ``auto`` and channels_last where it helps,
  at the same 1000/1000 budget (set explicitly: a checkpoint may carry a smaller one);
- ``ours_p300`` / ``ours_p100``: the fast path: also 300 / 100 proposals (``--proposals`` of
  ``finetune.evaluate`` / ``finetune.predict``);
- ``ours_fp32_p100``: 100 proposals in fp32 (on a CPU without bf16 units it is what ``auto`` runs);
- ``onnx_p100`` / ``torchscript_p100``: the detector exported by ``finetune.export`` at 100 proposals
  (fp32), run as its users run it: onnxruntime's CPU provider one image per call (on a GPU too: the
  ``export`` extra installs the CPU build), ``torch.jit.load`` on the device in batches.

Each reports images/s (median of ``--repeats`` passes over the images, after a warm-up), peak
memory (CUDA: max allocated; CPU: the process's peak RSS, and its growth over the loaded model),
where the time of one forward pass goes (resize/normalise, ResNet+FPN, RPN, RoIAlign, box head,
post-processing) and, with ``--ckpt`` and ``--ann``, COCO AP / AP50 on that set, so that speed is
read against accuracy. ``--json FILE`` writes the figures with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_common import describe, machine_info, median, run_mode_process, write_json
from bench_report import infer_table

REPO = Path(__file__).resolve().parents[1]
MODES = {  # name: (precision, proposals); plain is torchvision as is
    "plain": ("32", 1000),
    "ours": ("auto", 1000),
    "ours_p300": ("auto", 300),
    "ours_p100": ("auto", 100),
    "ours_fp32_p100": ("32", 100),
}
# Exported files (finetune.export), fp32 at 100 proposals: compare with ours_fp32_p100.
EXPORTED = {"onnx_p100": "onnx", "torchscript_p100": "torchscript"}
PARTS = ("transform", "backbone", "rpn", "box_roi_pool", "box_head", "box_predictor")


class PartTimer:
    """Wall time per part of a torchvision Faster R-CNN forward pass, from forward (pre-)hooks."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.device = device
        self._start: dict[str, float] = {}
        mods = {"transform": model.transform, "backbone": model.backbone, "rpn": getattr(model, "rpn", None)}
        heads = getattr(model, "roi_heads", None)
        if heads is not None:
            mods |= {"roi_heads": heads, "box_roi_pool": heads.box_roi_pool, "box_head": heads.box_head,
                     "box_predictor": heads.box_predictor}
        else:  # RetinaNet: its head instead of the RPN and RoI heads
            mods["head"] = getattr(model, "head", None)
        for name, m in mods.items():
            if m is not None:
                m.register_forward_pre_hook(self._pre(name))
                m.register_forward_hook(self._post(name))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self._sync()
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self._sync()
            self.totals[name] += time.perf_counter() - self._start[name]
        return hook

    def shares(self, total: float) -> dict[str, float]:
        """Fraction of ``total`` per part; the RoI heads' own remainder is the per-class post-processing
        (box decoding, score threshold, NMS), the rest of the forward pass (``other``) the final resize."""
        t = dict(self.totals)
        out = {p: t[p] / total for p in (*PARTS, "head") if p in t}
        if "roi_heads" in t:
            out["postprocess"] = (t["roi_heads"] - sum(t.get(p, 0.0) for p in PARTS[3:])) / total
        out["other"] = 1.0 - sum(out.values())
        return {k: round(v, 3) for k, v in out.items()}


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """(DetectionModule, CocoDetection or None): the checkpoint's model, or a random-init one."""
    from finetune.checkpoint import load_detection_checkpoint
    from finetune.module import DetectionModule
    from finetune.transforms import build_transforms
    from pretrain.core.data.coco import CocoDetection

    if args.ckpt:
        module = load_detection_checkpoint(args.ckpt)
        ds = CocoDetection(args.ann, transforms=build_transforms(train=False), train=False,
                           label_map=module.label_map) if args.ann else None
        return module, ds
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"backbone.arch={args.arch}", "backbone.norm=frozen_bn", f"detector={args.detector}",
                 f"detector.min_size={args.min_size}", f"detector.max_size={int(args.min_size * 4 / 3)}"]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "finetune"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("finetune", overrides=overrides), resolve=True)
    classes = [{"label": i + 1, "category_id": i + 1, "name": f"class{i + 1}"} for i in range(args.classes)]
    info = {"arch": args.arch, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "summary": {}}
    torch.manual_seed(0)
    return DetectionModule(cfg, {"classes": classes}, info), None  # type: ignore[arg-type]


def images_for(args: argparse.Namespace, ds: Any) -> list[torch.Tensor]:
    if ds is not None:
        return [ds[i][0] for i in range(min(args.images, len(ds)))]
    g = torch.Generator().manual_seed(0)
    side = int(args.min_size * 1.2)  # resized down to min_size, as photographs are
    return [torch.rand(3, side, int(side * 4 / 3), generator=g) for _ in range(args.images)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def exported_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Time an exported file of the model (written to a temporary folder) over the same images."""
    import tempfile

    from finetune.export import SUFFIXES, export_metadata, write_onnx, write_torchscript
    from finetune.inference import set_test_budget

    fmt = EXPORTED[args.one]
    device = torch.device(args.device if fmt == "torchscript" else "cpu")
    module, ds = build(args)
    model = module.model.eval()
    budget = set_test_budget(model, 100, 100)
    path = Path(tempfile.mkdtemp()) / f"model{SUFFIXES[fmt]}"
    meta = export_metadata(module, fmt, path, budget)
    (write_onnx if fmt == "onnx" else write_torchscript)(model, path, meta)
    base_rss = rss_mb()
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch gets, not every core
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            out = []
            for im in batch:  # the ONNX graph takes one image
                b, s, lab = session.run(None, {"image": im.numpy()})
                out.append({"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s),
                            "labels": torch.from_numpy(lab)})
            return out
    else:
        scripted = torch.jit.load(str(path), map_location=device)

        def run(batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            with torch.no_grad():
                return [dict(d) for d in scripted([im.to(device) for im in batch])]

    images = images_for(args, ds)
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    def run_all() -> float:
        t = time.perf_counter()
        for b in batches:
            run(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    run(batches[0])  # warm-up
    times = [run_all() for _ in range(args.repeats)]
    row: dict[str, Any] = {
        "images_per_s": round(len(images) / median(times), 3),
        "runs": [round(len(images) / t, 3) for t in times],
        "precision": f"32 ({'onnxruntime CPU' if fmt == 'onnx' else 'TorchScript'})", "channels_last": False,
        **budget, "time_shares": {}, "file_mb": round(path.stat().st_size / 2**20, 1),
        "peak_rss_mb": round(rss_mb(), 1), "rss_growth_mb": round(rss_mb() - base_rss, 1),
    }
    if ds is not None:
        from finetune.coco_eval import evaluate_coco
        from finetune.coco_results import detections_to_coco
        from finetune.module import original_scale

        preds, ids = [], []
        for i in range(len(ds)):
            image, target = ds[i]
            iid = int(target["image_id"])
            d = run([image])[0]
            preds += detections_to_coco(iid, d["boxes"].cpu(), d["scores"].cpu(), d["labels"].cpu(),
                                        module.label_map.label_to_cat_id,
                                        scale=original_scale(ds.coco.imgs[iid], image))
            ids.append(iid)
        with contextlib.redirect_stdout(io.StringIO()):
            result = evaluate_coco(ds.coco, preds, image_ids=ids)
        row["AP"], row["AP50"] = round(result.stats["AP"], 4), round(result.stats["AP50"], 4)
    return row


def one_mode(args: argparse.Namespace) -> dict[str, Any]:
    from finetune.inference import InferenceSetup, prepare, set_test_budget

    if args.one in EXPORTED:
        return exported_mode(args)

    device = torch.device(args.device)
    precision, proposals = MODES[args.one]
    module, ds = build(args)
    module.to(device)
    model = module.model
    if args.one == "plain":  # torchvision as is: eval mode, fp32 (no autocast), NCHW
        model.eval()
        setup = InferenceSetup(str(device), "32", False, "plain torchvision",
                               set_test_budget(model, proposals, proposals))
    else:
        setup = prepare(model, device, precision, proposals)
    images = [im.to(device) for im in images_for(args, ds)]
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_all() -> float:
        t = time.perf_counter()
        with torch.no_grad(), setup.autocast():
            for b in batches:
                model(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    with torch.no_grad(), setup.autocast():
        model(batches[0])  # warm-up (oneDNN / cuDNN pick their kernels)
    times = [run_all() for _ in range(args.repeats)]
    timer = PartTimer(model, device)
    t_profiled = run_all()
    row: dict[str, Any] = {
        "images_per_s": round(len(images) / median(times), 3),
        "runs": [round(len(images) / t, 3) for t in times],
        "precision": setup.precision, "channels_last": setup.channels_last, **setup.proposals,
        "time_shares": timer.shares(t_profiled),
    }
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        row["peak_rss_mb"] = round(rss_mb(), 1)
        row["rss_growth_mb"] = round(rss_mb() - base_rss, 1)
    if ds is not None:
        from finetune.coco_eval import evaluate_coco
        from finetune.evaluate import predict_dataset

        with contextlib.redirect_stdout(io.StringIO()):
            preds, ids = predict_dataset(module, ds, batch_size=args.batch_size, device=device, setup=setup)
            result = evaluate_coco(ds.coco, preds, image_ids=ids)
        row["AP"], row["AP50"] = round(result.stats["AP"], 4), round(result.stats["AP50"], 4)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, default=None, help="a fine-tuning checkpoint (default: random init)")
    p.add_argument("--ann", type=Path, default=None, help="COCO JSON to take images from and evaluate on")
    p.add_argument("--detector", default="fasterrcnn", choices=("fasterrcnn",))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--classes", type=int, default=80, help="random init only")
    p.add_argument("--min-size", type=int, default=320, help="random init only (a checkpoint keeps its own)")
    p.add_argument("--images", type=int, default=16, help="images timed per pass")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=[*MODES, *EXPORTED], choices=[*MODES, *EXPORTED])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", choices=[*MODES, *EXPORTED], help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_mode(args)), flush=True)
        return
    info = machine_info(torch.device(args.device).type)
    print(f"machine: {describe(info)}", flush=True)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        rows[mode] = run_mode_process(Path(__file__).resolve(), passthrough, mode)
        r = rows[mode]
        print(f"  {mode}: {r['images_per_s']:.2f} img/s, precision {r['precision']}, "
              f"{r.get('rpn_post_nms_top_n_test', r.get('topk_candidates'))} proposals"
              + (f", AP {100 * r['AP']:.1f} / AP50 {100 * r['AP50']:.1f}" if "AP" in r else ""), flush=True)
    for r in rows.values():
        r["vs_plain"] = round(r["images_per_s"] / rows["plain"]["images_per_s"], 3) if "plain" in rows else None
    print("\n" + "\n".join(infer_table({"rows": rows})))  # the table make bench writes
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k not in ("json", "one")}
        print(f"wrote {write_json(args.json, 'infer', info, rows, settings)}")


if __name__ == "__main__":
    main()
