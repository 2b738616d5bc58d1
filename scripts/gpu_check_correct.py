"""Phase 1 of the GPU check: every stage for a few steps on the device, as a user runs it.

Each item is one real command (``python -m pretrain``, ``python -m finetune``, ``finetune.evaluate``,
``finetune.predict``) on the tiny ``experiment=smoke`` data at ``trainer.precision=auto``, and a check
of what it wrote: it ran on the device, ``auto`` picked the precision the hardware computes natively
(on a GPU of compute capability 8.0 or more, bf16-mixed, read from the GPU here and not from the
code under test), channels_last where it applies, a finite loss, the files the stage promises.
Beside them: fp16 (16-mixed, loss scaling) on the GPU, a 1-process DDP run of each stage, a run
SIGKILLed after a step checkpoint and resumed (``resume``), and ``probe``: NMS, RoIAlign, box IoU and
the EMA update on the device against the CPU, a pretraining step in autocast with channels_last, and
pinned host memory in the pretraining loader.

    python scripts/gpu_check_correct.py probe --device cuda     # one child of the check (prints RESULT)
    python scripts/gpu_check_correct.py resume --accelerator gpu --dir D
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpu_check_jobs import REPO, RESULT, CheckFailed, Job, result_of

CONF = REPO / "conf"
SMOKE_DATA = REPO / "data" / "synthetic_smoke"  # experiment=smoke's set (conf/shared/synthetic/smoke.yaml)
# Semi modes at smoke size: a teacher after 1 step scores far below the modes' thresholds, so they keep
# every detection (threshold 0) to exercise pseudo-labelling; as tests/test_semi_train.py runs them.
FAST_TEACHER = ("semi.burn_in=1", "semi.ema_decay=0.5", "semi.threshold=0.0", "detector.detections_per_img=20")
# item name -> (the semi.mode it runs, its overrides); every registered mode must have one.
SEMI_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "unbiased_teacher": ("unbiased_teacher", ("semi=unbiased_teacher", *FAST_TEACHER)),
    "unbiased_teacher_soft": ("unbiased_teacher", ("semi=unbiased_teacher_soft", *FAST_TEACHER)),
    # A 1-step RetinaNet scores near its 0.01 prior: a GMM fallback of 0 lets its first scores through.
    "mean_teacher": ("mean_teacher", ("semi=mean_teacher", "detector=retinanet", "semi.burn_in=1", "semi.ema_decay=0.5",
                                      "semi.threshold=gmm", "semi.gmm_fallback=0.0", "detector.detections_per_img=20",
                                      "detector.score_thresh=0.001")),
    "consistency": ("consistency", ("semi=consistency", "detector=retinanet")),
    "self_training": ("self_training", ("semi=self_training", "semi.threshold=0.0", "detector.detections_per_img=5")),
}
TEACHER_MODES = ("unbiased_teacher", "mean_teacher")
Check = Callable[[str], dict[str, Any]]  # a job's log -> the details it recorded (or CheckFailed)


def config_names(group: str) -> list[str]:
    """The options of a config group (``pretrain/method``: swav, vicreg, ...): the registry to cover."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def semi_modes() -> list[str]:
    """Every registered semi mode (a new one without a recipe here fails its item)."""
    import finetune.semi  # noqa: F401 - imports every mode's file, which registers it
    from finetune.semi.base import SEMI_MODES

    return sorted(SEMI_MODES)


def expected_hardware(gpu: bool) -> dict[str, Any]:
    """What ``auto`` must choose here, found independently of the code under test on a GPU: bf16-mixed
    from compute capability 8.0 (Ampere) on, else 16-mixed; channels_last on."""
    import torch

    if gpu:
        major, minor = torch.cuda.get_device_capability(0)
        return {"device": "cuda", "precision": "bf16-mixed" if major >= 8 else "16-mixed", "channels_last": True,
                "capability": f"{major}.{minor}"}
    from pretrain.core.run.precision import cpu_has_native_bf16

    return {"device": "cpu", "precision": "bf16-mixed" if cpu_has_native_bf16() else "32", "channels_last": True}


def _metrics(run_dir: Path, name: str = "metrics.json") -> dict[str, Any]:
    path = run_dir / name
    if not path.is_file():
        raise CheckFailed(f"{path} was not written")
    return dict(json.loads(path.read_text()))


def _hardware(m: Mapping[str, Any], expect: Mapping[str, Any], precision: str | None = None) -> dict[str, Any]:
    hw = m.get("hardware") or {}
    want = precision or expect["precision"]
    if hw.get("device") != expect["device"]:
        raise CheckFailed(f"ran on {hw.get('device')!r}, not {expect['device']}")
    if m.get("precision") != want:
        raise CheckFailed(f"precision {m.get('precision')!r}, expected {want} ({hw.get('reason')})")
    return {"device": hw.get("device"), "precision": m.get("precision"), "channels_last": hw.get("channels_last")}


def check_pretrain(run_dir: Path, method: str, expect: Mapping[str, Any], precision: str | None = None) -> Check:
    def check(log: str) -> dict[str, Any]:
        m = _metrics(run_dir)
        out = _hardware(m, expect, precision)
        if m.get("method") != method:
            raise CheckFailed(f"metrics.json says method {m.get('method')!r}, not {method}")
        if not m.get("hardware", {}).get("channels_last"):
            raise CheckFailed("channels_last is off")
        loss = m.get("final_loss")
        if loss is None or not math.isfinite(loss):
            raise CheckFailed(f"final loss {loss}")
        if not (run_dir / "backbone.safetensors").is_file():
            raise CheckFailed("no backbone.safetensors")
        return {**out, "steps": m.get("global_step"), "final_loss": round(loss, 4), "knn_top1": m.get("knn_top1"),
                "train_s": m.get("wall_time_s")}
    return check


def check_detection(run_dir: Path, expect: Mapping[str, Any], precision: str | None = None,
                    mode: str | None = None, world_size: int | None = None) -> Check:
    def check(log: str) -> dict[str, Any]:
        m = _metrics(run_dir)
        out = _hardware(m, expect, precision)
        ap = (m.get("coco") or {}).get("AP")
        if ap is None or not math.isfinite(ap):
            raise CheckFailed(f"no COCO AP in metrics.json ({ap})")
        if not m.get("best_checkpoint") or not Path(m["best_checkpoint"]).is_file():
            raise CheckFailed("no best checkpoint")
        out.update(steps=m.get("global_step"), AP=round(ap, 4), train_s=m.get("train_time_s"))
        if mode is not None:
            semi = m.get("semi") or {}
            if semi.get("mode") != mode:
                raise CheckFailed(f"semi mode {semi.get('mode')!r}, not {mode}")
            if mode in TEACHER_MODES and not semi.get("pseudo_labels"):
                raise CheckFailed("the teacher's pseudo-label health is missing")
            out["pseudo_boxes_per_image"] = (semi.get("pseudo_labels") or {}).get("pseudo_boxes_per_image")
        if world_size is not None:
            d = m.get("distributed") or {}
            if d.get("world_size") != world_size or d.get("student_weights_agree") is not True:
                raise CheckFailed(f"distributed report {d}")
            out["distributed"] = {k: v for k, v in d.items() if k != "first_epoch_shards_overlap"}
        return out
    return check


def check_evaluate(out_dir: Path, device: str) -> Check:
    def check(log: str) -> dict[str, Any]:
        m = _metrics(out_dir)
        inference = m.get("inference") or {}
        if not str(inference.get("device", "")).startswith(device):
            raise CheckFailed(f"evaluated on {inference.get('device')!r}, not {device}")
        if "AP" not in (m.get("coco") or {}):
            raise CheckFailed("no COCO AP")
        return {"device": inference.get("device"), "precision": inference.get("precision"),
                "AP": round(m["coco"]["AP"], 4), "images": m.get("num_images")}
    return check


def check_predict(out_dir: Path, device: str, images: int) -> Check:
    def check(log: str) -> dict[str, Any]:
        p = _metrics(out_dir, "predictions.json")
        inference = p.get("inference") or {}
        if not str(inference.get("device", "")).startswith(device):
            raise CheckFailed(f"predicted on {inference.get('device')!r}, not {device}")
        if len(p.get("images") or []) != images:
            raise CheckFailed(f"{len(p.get('images') or [])} images predicted, not {images}")
        return {"device": inference.get("device"), "precision": inference.get("precision"), "images": images,
                "detections": sum(len(r.get("detections", [])) for r in p["images"])}
    return check


def items(gpu: bool, work: Path, expect: Mapping[str, Any]) -> list[Job]:
    """The correctness jobs, in the order they should run."""
    py = sys.executable
    accel = "gpu" if gpu else "cpu"
    device = "cuda" if gpu else "cpu"
    pre = ["experiment=smoke", f"trainer.accelerator={accel}", "trainer.enable_progress_bar=false"]
    ft = ["experiment=smoke", f"trainer.accelerator={accel}", "eval.plots=false"]
    d = work / "correctness"
    me = str(Path(__file__).resolve())
    # First the probe (seconds; the device's ops against the CPU), then every stage.
    jobs: list[Job] = [Job("probe", [py, me, "probe", "--device", device, "--precision", str(expect["precision"])],
                           120, check=result_of)]

    def stage(name: str, module: str, args: Sequence[str], check: Any, timeout: float = 120, **kw: Any) -> None:
        jobs.append(Job(name, [py, "-m", module, *args, f"hydra.run.dir={d / name}"], timeout, check=check, **kw))

    for method in config_names("pretrain/method"):
        stage(f"pretrain_{method}", "pretrain", [*pre, f"method={method}"], check_pretrain(d / f"pretrain_{method}",
                                                                                          method, expect))
    for det in config_names("finetune/detector"):
        stage(f"finetune_{det}", "finetune", [*ft, f"detector={det}"], check_detection(d / f"finetune_{det}", expect))
    best = d / "finetune_fasterrcnn" / "checkpoints" / "best.ckpt"
    val_json = SMOKE_DATA / "val.json"  # made before the check starts (gpu_check.py)
    val_images = len(json.loads(val_json.read_text())["images"])
    jobs.append(Job("evaluate", [py, "-m", "finetune.evaluate", str(best), "--ann", str(val_json),
                                 "--device", device, "--out", str(d / "evaluate")], 120,
                    needs=["finetune_fasterrcnn"], check=check_evaluate(d / "evaluate", device)))
    jobs.append(Job("predict", [py, "-m", "finetune.predict", str(best), str(SMOKE_DATA / "val"), "--device", device,
                                "--out", str(d / "predict")], 120,
                    needs=["finetune_fasterrcnn"], check=check_predict(d / "predict", device, val_images)))
    for name in sorted(set(semi_modes()) | set(SEMI_RECIPES)):
        if name not in SEMI_RECIPES:  # a mode added without a recipe here: its item says so
            why = f"semi mode {name}: no recipe in scripts/gpu_check_correct.py SEMI_RECIPES"
            jobs.append(Job(f"semi_{name}", [py, "-c", f"raise SystemExit({why!r})"], 10))
            continue
        mode, overrides = SEMI_RECIPES[name]
        stage(f"semi_{name}", "finetune", [*ft, *overrides], check_detection(d / f"semi_{name}", expect, mode=mode))
    # data.augment=tensor: the multi-crop views made in batches on the training device (GPU-side augmentation).
    stage("pretrain_swav_views_on_device", "pretrain", [*pre, "method=swav", "data.augment=tensor",
                                                         "data.views_on=device"],
          check_pretrain(d / "pretrain_swav_views_on_device", "swav", expect))
    # One process under DDP: the NCCL (gloo on a CPU) process group, the distributed sampler and, on a
    # GPU, SyncBatchNorm (pretraining's BN; fine-tuning's norm=syncbn), each rank's report.
    ddp = ["trainer.strategy=ddp", "trainer.devices=1"]
    stage("ddp_pretrain_swav", "pretrain", [*pre, "method=swav", *ddp], check_pretrain(d / "ddp_pretrain_swav", "swav",
                                                                                       expect),
          env={"MASTER_PORT": "29517"})
    stage("ddp_finetune", "finetune", [*ft, *ddp, *(["backbone.norm=syncbn"] if gpu else [])],
          check_detection(d / "ddp_finetune", expect, world_size=1), env={"MASTER_PORT": "29518"})
    stage("ddp_semi_unbiased_teacher", "finetune", [*ft, *ddp, *SEMI_RECIPES["unbiased_teacher"][1]],
          check_detection(d / "ddp_semi_unbiased_teacher", expect, mode="unbiased_teacher", world_size=1),
          env={"MASTER_PORT": "29519"})
    if gpu:  # fp16 with loss scaling: what auto picks on GPUs without bf16 (V100, T4), forced here
        stage("pretrain_swav_16mixed", "pretrain", [*pre, "method=swav", "trainer.precision=16-mixed"],
              check_pretrain(d / "pretrain_swav_16mixed", "swav", expect, precision="16-mixed"))
        stage("finetune_fasterrcnn_16mixed", "finetune", [*ft, "trainer.precision=16-mixed"],
              check_detection(d / "finetune_fasterrcnn_16mixed", expect, precision="16-mixed"))
    # 40 steps on a GPU (fast enough that a shorter run could end before the kill), 12 on a CPU.
    jobs.append(Job("resume_after_kill", [py, me, "resume", "--accelerator", accel, "--dir", str(d / "resume"),
                                          "--epochs", "10" if gpu else "3"], 240, check=result_of))
    return jobs


# ---------------------------------------------------------------------------------- child: resume
def _step(ckpt: Path) -> int:
    from pretrain.core.run.safe_load import load_torch_file

    return int(load_torch_file(ckpt, mmap=True)["global_step"])


def resume(accelerator: str, run_dir: Path, kill_at: int = 4, epochs: int = 10) -> dict[str, Any]:
    """SwAV with its queue, checkpointed every step, SIGKILLed once last.ckpt holds ``kill_at`` steps,
    then the same command again: it must resume from the saved step and finish the schedule
    (32 images at batch 8: 4 steps per epoch)."""
    from pretrain.core.run.safe_load import CorruptCheckpointError

    cmd = [sys.executable, "-m", "pretrain", "experiment=smoke", "method=swav", f"trainer.accelerator={accelerator}",
           "checkpoint_every_n_steps=1", f"trainer.max_epochs={epochs}", "data.knn_val_json=null",
           "method.queue_length=8", "method.queue_start_epoch=0", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < 180:
        try:
            if last.is_file() and _step(last) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
        except (CorruptCheckpointError, FileNotFoundError, RuntimeError, EOFError):
            pass  # being renamed under our feet: the next poll reads it
        time.sleep(0.02)
    first, _ = proc.communicate(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run was not killed mid-way (exit {proc.returncode}):\n{first[-3000:]}")
    saved = _step(last)
    total = 4 * epochs
    if not kill_at <= saved < total:
        raise SystemExit(f"last.ckpt holds step {saved}, not in [{kill_at}, {total})")
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    text = again.stdout + again.stderr
    if again.returncode != 0:
        raise SystemExit(f"the re-run failed (exit {again.returncode}):\n{text[-3000:]}")
    if "resuming from" not in text:
        raise SystemExit(f"the re-run did not resume:\n{text[-3000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    if m["global_step"] != total:
        raise SystemExit(f"the resumed run ended at step {m['global_step']}, not {total}")
    return {"killed_at_step": saved, "final_step": total, "device": m["hardware"]["device"],
            "precision": m["precision"]}


# ----------------------------------------------------------------------------------- child: probe
def _rel(a: Any, b: Any) -> float:
    import torch

    return float(torch.linalg.vector_norm((a.float() - b.float()).flatten())
                 / torch.linalg.vector_norm(b.float().flatten()).clamp_min(1e-12))


def probe(device_name: str, precision: str) -> dict[str, Any]:
    """The device's detection ops against the CPU, the EMA update, one pretraining step in the
    expected precision with channels_last, and pinned memory in the pretraining loader."""
    import hydra.utils
    import torch
    from hydra import compose, initialize_config_dir
    from torchvision.ops import batched_nms, box_iou, nms, roi_align

    from finetune.semi.ema import ema_update
    from pretrain.data import train_loader
    from pretrain.methods.base import plain_config

    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"device": str(device)}
    xy = torch.rand(2000, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 8 + torch.rand(2000, 2, generator=g) * 200], 1)
    scores, classes = torch.rand(2000, generator=g), torch.randint(0, 20, (2000,), generator=g)
    keep_cpu, keep_dev = nms(boxes, scores, 0.5), nms(boxes.to(device), scores.to(device), 0.5).cpu()
    bkeep_cpu = batched_nms(boxes, scores, classes, 0.5)
    bkeep_dev = batched_nms(boxes.to(device), scores.to(device), classes.to(device), 0.5).cpu()
    if not (torch.equal(keep_cpu, keep_dev) and torch.equal(bkeep_cpu, bkeep_dev)):
        raise SystemExit(f"NMS on {device} keeps other boxes than on the CPU")
    out["nms_kept"] = [len(keep_cpu), len(bkeep_cpu)]
    out["box_iou_rel_err"] = _rel(box_iou(boxes[:300].to(device), boxes[:500].to(device)).cpu(),
                                  box_iou(boxes[:300], boxes[:500]))
    feats = torch.randn(2, 64, 50, 50, generator=g)
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=g).float(), boxes[:300] / 16], 1)
    ra_cpu = roi_align(feats, rois, (7, 7), 1.0, 2, aligned=True)
    ra_dev = roi_align(feats.to(device), rois.to(device), (7, 7), 1.0, 2, aligned=True).cpu()
    out["roi_align_rel_err"] = _rel(ra_dev, ra_cpu)
    teacher, student = torch.nn.Linear(64, 8).to(device), torch.nn.Linear(64, 8).to(device)
    expect_w = 0.9 * teacher.weight.detach().clone() + 0.1 * student.weight.detach()
    ema_update(teacher, student, 0.9)
    out["ema_rel_err"] = _rel(teacher.weight.detach(), expect_w)
    for key in ("box_iou_rel_err", "roi_align_rel_err", "ema_rel_err"):
        if not out[key] < 1e-5:
            raise SystemExit(f"{key} = {out[key]:.2e} on {device}")

    with initialize_config_dir(str(CONF / "pretrain"), version_base="1.3"):
        config = plain_config(compose("pretrain", overrides=["experiment=smoke", "method=swav",
                                                             "backbone.channels_last=true"]))
    model = hydra.utils.get_class(config["method"]["module"])(config).to(device)
    if not model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last):
        raise SystemExit("the pretraining backbone is not channels_last on the device")
    loader = train_loader(config["data"], hydra.utils.instantiate(config["method"]["transform"]),
                          config["method"]["transform"])
    views = next(iter(loader))
    out["loader_pin_memory"] = loader.pin_memory
    out["batch_pinned"] = all(v.is_pinned() for v in views)
    if device.type == "cuda" and not (loader.pin_memory and out["batch_pinned"]):
        raise SystemExit("the pretraining loader does not hand pinned memory to the GPU")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, _ = model.compute_loss([v.to(device, non_blocking=True) for v in views])
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    value = float(loss.detach())
    if not math.isfinite(value) or not grads or not all(torch.isfinite(gr).all() for gr in grads):
        raise SystemExit(f"a SwAV step in {precision} on {device} gave loss {value} or non-finite gradients")
    out.update(swav_step_loss=round(value, 4), autocast=precision)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--precision", default="bf16-mixed")
    rs = sub.add_parser("resume")
    rs.add_argument("--accelerator", default="gpu")
    rs.add_argument("--dir", type=Path, required=True)
    rs.add_argument("--epochs", type=int, default=10)
    a = p.parse_args(argv)
    os.chdir(REPO)  # experiment=smoke's data folder is relative to the repository
    result = probe(a.device, a.precision) if a.what == "probe" else resume(a.accelerator, a.dir, epochs=a.epochs)
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
