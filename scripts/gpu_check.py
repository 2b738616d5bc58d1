"""The GPU check (issue 33): one command that proves every stage on CUDA, measures it, and spends the
rest of the lent GPU's time on the accuracy benchmark, inside 10 minutes on one H100.

    bash scripts/gpu_check.sh                     # on the GPU machine (make gpu-check): installs the wheels, runs this
    bash scripts/gpu_check.sh --cpu-smoke         # the same on a CPU at toy sizes (make test-full runs it)
    python scripts/gpu_check.py --report DIR --benchmarks BENCHMARKS.md --readme README.md --save-to benchmarks/gpu

Phases, in this order so that a run cut short keeps the most important part (``OUT/gpu_check.json`` is
rewritten after every finished item; each item is its own process with a time budget, and a failure is
recorded with its error and the check goes on):

1. correctness (scripts/gpu_check_correct.py): every pretraining method, every detector, every semi
   mode, evaluate and predict, a few steps each on CUDA at ``trainer.precision=auto`` (checked to be
   bf16-mixed on a GPU that computes bf16), channels_last, pinned memory, fp16 forced, 1-GPU DDP of
   each stage, a SIGKILL and resume, the device's detection ops against the CPU;
2. speed (scripts/gpu_check_speed.py, scripts/bench_infer.py), each against its plain reference: SwAV
   R50 2x224+6x96 from files on disk (goal: 2,500 images/s on one H100), Faster R-CNN R50-FPN
   training at 800 px, inference with the fast path; peak GPU memory of each;
3. accuracy (scripts/gpu_check_accuracy.py): bench_ssl's SSL-vs-random protocol with GPU-scale
   pretraining and bench_semi's labeled-only-vs-semi protocol with 10k unlabeled scenes, 5 seeds, into
   their ledger formats (``OUT/ssl_synthetic.json``, ``OUT/semi_synthetic.json``).

Writes into OUT (the ``OUT`` environment variable, else outputs/gpu_check): gpu_check.json, the two
ledgers and gpu_check.log (the shell wrapper's copy of this output), four files; run folders and each
item's log go to ``--work`` (outputs/gpu_check_work).

On a lent GPU, one call of the device tool's ``run`` (wheels: ``make gpu-wheels`` first, here):

    run(command="bash scripts/gpu_check.sh", carry=["wheels/gpu"], timeout_s=600)

then, here, on the files it returns (files_at): ``python scripts/gpu_check.py --report <files_at>
--benchmarks BENCHMARKS.md --readme README.md --save-to benchmarks/gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gpu_check_accuracy as accuracy
import gpu_check_correct as correct
import gpu_check_speed as speed
from gpu_check_jobs import REPO, Job, Record, headline, now, result_of, run_jobs

DEADLINE_S = {"gpu": 540.0, "toy": 1800.0}  # the run tool's command limit is 600 s
# Where each phase must end, as fractions of the deadline (a phase that ends early leaves its time to the next).
PHASE_END = {"correctness": 0.33, "speed": 0.70}
PRETRAIN_S = {"gpu": 90.0, "toy": 10.0}


def machine(gpu: bool) -> dict[str, Any]:
    """The machine as the benchmarks describe it, plus the GPU's own figures and the library versions."""
    import torch
    from bench_common import machine_info

    info = machine_info("cuda" if gpu else "cpu")
    if gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_multiprocessors=p.multi_processor_count,
                    gpu_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            smi = subprocess.run(query, check=False, capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib import metadata

    info["packages"] = {n: metadata.version(n) for n in ("torchvision", "pytorch-lightning", "lightly", "hydra-core")}
    return info


def smoke_data() -> Path:
    """experiment=smoke's tiny set, made once before the items that share it start."""
    import yaml

    from pretrain.core.data.synthetic import ensure_synthetic

    conf = yaml.safe_load((REPO / "conf" / "shared" / "synthetic" / "smoke.yaml").read_text())
    ensure_synthetic(REPO / conf["synthetic_dir"], **conf["synthetic"])
    return REPO / conf["synthetic_dir"]


def phase(record: Record, name: str, jobs: Sequence[Job], deadline: float, parallel: int,
          work: Path, on_done: Any = None) -> dict[str, dict[str, Any]]:
    record.phase(name)
    t0 = time.monotonic()

    def done(item: str, result: dict[str, Any]) -> None:
        record.item(name, item, result)
        mark = {"pass": "ok  ", "fail": "FAIL", "timeout": "TIME"}.get(result["status"], result["status"][:4])
        print(f"[{name}] {mark} {item} ({result.get('wall_s', 0)} s)"
              + (f": {headline(result['error'])[:200]}" if result.get("error") else ""), flush=True)
        if on_done is not None:
            on_done(item, result)

    results = run_jobs(jobs, work / "logs" / name, deadline, parallel, done)
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("pass", "fail", "timeout", "skipped",
                                                                            "not run")}
    record.update(name, status="done" if time.monotonic() < deadline else "cut at its deadline",
                  wall_s=round(time.monotonic() - t0, 1), counts=counts)
    return results


def speed_phase(record: Record, size: str, work: Path, deadline: float) -> None:
    py, me = sys.executable, str(Path(speed.__file__).resolve())
    data = work / "speed"
    flag = ["--toy"] if size == "toy" else []
    infer_json = data / "infer.json"

    def infer_rows(log: str) -> dict[str, Any]:
        rows = json.loads(infer_json.read_text())["rows"]
        return {"rows": {m: {k: r.get(k) for k in ("images_per_s", "vs_plain", "precision", "channels_last",
                                                   "peak_mem_mb", "peak_rss_mb", "rpn_post_nms_top_n_test",
                                                   "time_shares")} for m, r in rows.items()}}

    jobs = [Job("data", [py, me, "data", "--data", str(data), *flag], 120, check=result_of)]
    for bench in ("swav", "frcnn"):
        jobs += [Job(f"{bench}_{m}", [py, me, bench, "--one", m, "--data", str(data), *flag], 150, needs=["data"],
                     check=result_of) for m in ("ours", "plain")]
    jobs.append(Job("inference", [py, str(REPO / "scripts" / "bench_infer.py"), *speed.INFER[size], "--json",
                                  str(infer_json)], 200, check=infer_rows))
    results = phase(record, "speed", jobs, deadline, 1, work)  # one at a time: nothing else on the GPU

    def pair(bench: str) -> dict[str, Any]:
        ours, plain = results.get(f"{bench}_ours", {}), results.get(f"{bench}_plain", {})
        out: dict[str, Any] = {"ours": ours.get("images_per_s"), "plain": plain.get("images_per_s"),
                               "peak_mem_mb": {"ours": ours.get("peak_mem_mb"), "plain": plain.get("peak_mem_mb")}}
        out["vs_plain"] = round(out["ours"] / out["plain"], 3) if out["ours"] and out["plain"] else None
        return out

    figures = {"swav_e2e_images_per_s": pair("swav"), "frcnn_train_images_per_s": pair("frcnn")}
    goal = speed.GOAL_SWAV_IMAGES_PER_S
    ours = figures["swav_e2e_images_per_s"]["ours"]
    figures["swav_e2e_images_per_s"].update(goal=goal, vs_goal=round(ours / goal, 3) if ours else None)
    rows = (results.get("inference") or {}).get("rows") or {}
    fast = next((m for m in ("ours_p100", "ours") if m in rows), None)
    figures["inference_images_per_s"] = {
        "ours": rows[fast]["images_per_s"] if fast else None, "ours_mode": fast,
        "plain": (rows.get("plain") or {}).get("images_per_s"),
        "vs_plain": rows[fast]["vs_plain"] if fast else None,
        "peak_mem_mb": {m: r.get("peak_mem_mb") for m, r in rows.items()}}
    record.update("speed", figures=figures)


def accuracy_phase(record: Record, size: str, work: Path, out: Path, deadline: float, parallel: int,
                   background: subprocess.Popen | None) -> None:
    record.phase("accuracy")
    if size == "toy":
        accuracy.toy()
    if background is not None:  # the data, started first; it must be there before any run
        while background.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if background.poll() is None:
            background.kill()
            background.wait()
        ok = background.returncode == 0
        record.update("accuracy", data={"status": "pass" if ok else "fail", "returncode": background.returncode,
                                        "log": str(work / "logs" / "background_data.log")})
        if not ok:
            record.update("accuracy", status="data failed")
            return
    ledgers = accuracy.ledgers(work)
    targets = {"ssl": out / "ssl_synthetic.json", "semi": out / "semi_synthetic.json"}
    threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
    # Pretraining is the critical path: at most 40% of what is left, so that its fine-tuning runs fit after it.
    pretrain_s = round(min(float(record.data["pretrain_s"]), max(10.0, 0.4 * (deadline - time.monotonic()) - 30)))

    def keep(item: str, result: dict[str, Any]) -> None:
        for name, ledger in ledgers.items():
            if ledger.is_file():
                shutil.copyfile(ledger, targets[name])
        ph = record.phase("accuracy")
        if item == "ssl_pretrain" and result["status"] == "pass":
            ph["pretrain"] = result
        try:  # rendered here, where the runs' files are (the report only copies the text)
            ph["tables"] = accuracy.tables(size, work, (ph.get("pretrain") or {}).get("pretrain"))
        except Exception as e:  # noqa: BLE001 - a table that cannot be drawn must not stop the runs
            ph["tables_error"] = f"{type(e).__name__}: {e}"
        record.save()

    record.update("accuracy", pretrain_budget_s=pretrain_s, ledgers={name: path.name for name, path in targets.items()})
    phase(record, "accuracy", accuracy.jobs(size, work, pretrain_s, threads), deadline, parallel, work, on_done=keep)


def run(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    size = "toy" if a.cpu_smoke else "gpu"
    gpu = not a.cpu_smoke
    import torch

    if gpu and not torch.cuda.is_available():
        print("no CUDA device here: run the GPU check on a GPU machine, or --cpu-smoke for the CPU dry run",
              file=sys.stderr)
        return 2
    deadline = t_start + (a.deadline_s or DEADLINE_S[size])
    out, work = a.out.resolve(), a.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for scratch in ("correctness", "speed", "logs"):  # a re-run checks afresh (a stale run dir would resume);
        shutil.rmtree(work / scratch, ignore_errors=True)  # the accuracy runs resume, as their benchmarks do
    work.mkdir(parents=True, exist_ok=True)
    record = Record(out / "gpu_check.json", {
        "check": "gpu_check", "version": 1, "mode": "gpu" if gpu else "cpu-smoke", "started": now(),
        "command": " ".join(["bash scripts/gpu_check.sh", *(a.passthrough or [])]).strip(),
        "deadline_s": round(deadline - t_start), "pretrain_s": a.pretrain_s or PRETRAIN_S[size],
        "machine": machine(gpu)})
    print(f"GPU check ({record.data['mode']}) on {record.data['machine'].get('gpu') or record.data['machine']['cpu']}"
          f", deadline {record.data['deadline_s']} s; record: {out / 'gpu_check.json'}", flush=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    background = None
    if "accuracy" in a.phases:  # the 10k SSL scenes take minutes to generate on one core: start them now
        with open(work / "logs" / "background_data.log", "w") as log:
            background = subprocess.Popen([sys.executable, str(Path(accuracy.__file__).resolve()), "data",
                                           "--work", str(work), *(["--toy"] if size == "toy" else [])],
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    smoke_data()
    cpus = os.cpu_count() or 2
    span = deadline - t_start
    try:
        if "correctness" in a.phases:
            expect = correct.expected_hardware(gpu)
            record.update("correctness", expected=expect)
            parallel = a.parallel or (max(1, min(6, cpus // 2)) if gpu else 2)
            jobs = correct.items(gpu, work, expect)
            threads = str(max(1, cpus // parallel))
            for job in jobs:
                job.env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **job.env}
            results = phase(record, "correctness", jobs, min(deadline, t_start + PHASE_END["correctness"] * span),
                            parallel, work)
            if not a.keep:  # checkpoints of ~20 detectors: gigabytes; a failed item's run stays to be read
                for name, r in results.items():
                    if r["status"] == "pass":
                        shutil.rmtree(work / "correctness" / name, ignore_errors=True)
        if "speed" in a.phases:
            speed_phase(record, size, work, min(deadline, t_start + PHASE_END["speed"] * span))
            if not a.keep:
                shutil.rmtree(work / "speed", ignore_errors=True)
        if "accuracy" in a.phases:
            accuracy_phase(record, size, work, out, deadline - 5, a.parallel or (max(1, cpus // 2 - 1) if gpu else 2),
                           background)
    finally:
        if background is not None and background.poll() is None:
            background.kill()
        record.update(finished=now(), wall_s=round(time.monotonic() - t_start, 1))
    return summary(record.data)


def summary(data: dict[str, Any]) -> int:
    """Print what passed and the speed figures; non-zero when a correctness item or a speed figure is missing."""
    bad = []
    for name, ph in data["phases"].items():
        c = ph.get("counts", {})
        print(f"{name}: {ph.get('status')}, {ph.get('wall_s')} s, "
              + ", ".join(f"{k} {v}" for k, v in c.items() if v), flush=True)
        if name != "accuracy":
            bad += [f"{name}/{i}" for i, r in ph["items"].items() if r["status"] not in ("pass", "skipped")]
    figures = (data["phases"].get("speed") or {}).get("figures") or {}
    for key, f in figures.items():
        print(f"  {key}: ours {f.get('ours')} vs plain {f.get('plain')} ({f.get('vs_plain')}x)"
              + (f", goal {f['goal']} ({f.get('vs_goal')})" if f.get("goal") else ""), flush=True)
        if not f.get("ours"):
            bad.append(f"speed/{key}")
    if bad:
        print("not passed: " + ", ".join(bad), flush=True)
    return 1 if bad else 0


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_jobs, which kills the jobs it runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the dry run on a CPU at toy sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "outputs" / "gpu_check"))
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "gpu_check_work",
                   help="run folders and logs (default outputs/gpu_check_work: OUT holds only what comes back)")
    p.add_argument("--phases", nargs="+", default=["correctness", "speed", "accuracy"],
                   choices=("correctness", "speed", "accuracy"))
    p.add_argument("--deadline-s", type=float, default=None, help="seconds for the whole check (default 540 on a "
                                                                  "GPU, 1800 for --cpu-smoke)")
    p.add_argument("--pretrain-s", type=float, default=None, help="phase 3's SSL pretraining budget (default 90 s)")
    p.add_argument("--parallel", type=int, default=None, help="jobs at a time in phases 1 and 3")
    p.add_argument("--keep", action="store_true", help="keep every run folder (default: only failed items' and "
                                                       "the accuracy runs, which resume)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="render DIR/gpu_check.json (and its ledgers) as markdown instead of running")
    p.add_argument("--benchmarks", type=Path, default=None, help="with --report: write the GPU section here")
    p.add_argument("--readme", type=Path, default=None, help="with --report: write the summary into README's Speed")
    p.add_argument("--save-to", type=Path, default=None, help="with --report: keep the JSON files under this folder")
    a = p.parse_args(argv)
    if a.report is not None:
        import gpu_check_report

        gpu_check_report.main(a.report, a.benchmarks, a.readme, a.save_to)
        return 0
    a.passthrough = list(argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _stop)
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
