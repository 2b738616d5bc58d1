"""The GPU check (scripts/gpu_check.py, issue 33) must run the first time a GPU is lent: its plumbing,
its Hydra overrides for the GPU-only items, its report, the wheels it carries, and (slow) the whole
script as a CPU dry run at toy sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check
import gpu_check_accuracy
import gpu_check_correct
import gpu_check_report
import gpu_wheels
from gpu_check_jobs import Job, Record, result_of, run_jobs


# ------------------------------------------------------------------------------------- plumbing
def test_jobs_pass_fail_time_out_and_skip_and_the_record_keeps_each_as_it_ends(tmp_path: Path) -> None:
    py = sys.executable
    record = Record(tmp_path / "check.json", {"check": "test"})
    seen: list[str] = []

    def done(name: str, result: dict) -> None:
        record.item("p", name, result)
        seen.append(json.loads((tmp_path / "check.json").read_text())["phases"]["p"]["items"][name]["status"])

    jobs = [
        Job("ok", [py, "-c", "print('RESULT {\"x\": 1}')"], 30, check=result_of),
        Job("raises", [py, "-c", "raise ValueError('broken on purpose')"], 30),
        Job("hangs", [py, "-c", "import time; time.sleep(60)"], 1.0),
        Job("after_raises", [py, "-c", "pass"], 30, needs=["raises"]),
        Job("no_result", [py, "-c", "print('no figures')"], 30, check=result_of),
    ]
    t0 = time.monotonic()
    results = run_jobs(jobs, tmp_path / "logs", time.monotonic() + 60, parallel=2, on_done=done)
    assert time.monotonic() - t0 < 20  # the hanging job was killed at its budget, not waited for
    assert results["ok"]["status"] == "pass" and results["ok"]["x"] == 1
    assert results["raises"]["status"] == "fail" and "broken on purpose" in results["raises"]["error"]
    assert results["raises"]["error"].startswith("Traceback")
    assert results["hangs"]["status"] == "timeout" and "time budget" in results["hangs"]["error"]
    assert results["after_raises"]["status"] == "skipped" and "raises" in results["after_raises"]["error"]
    assert results["no_result"]["status"] == "fail" and "RESULT" in results["no_result"]["error"]
    assert sorted(seen) == sorted(r["status"] for r in results.values())  # written as each one ended


def test_a_deadline_kills_what_runs_and_leaves_the_rest_not_run(tmp_path: Path) -> None:
    py = sys.executable
    jobs = [Job("long", [py, "-c", "import time; time.sleep(60)"], 120, min_start_s=0),
            Job("later", [py, "-c", "pass"], 120, min_start_s=0.5)]
    results = run_jobs(jobs, tmp_path, time.monotonic() + 1.5, parallel=1)
    assert results["long"]["status"] == "timeout" and "deadline" in results["long"]["error"]
    assert results["later"]["status"] == "not run"


def test_a_stopped_check_takes_its_running_jobs_with_it(tmp_path: Path) -> None:
    """SIGTERM to the check (what a time limit sends) kills the jobs it runs, and their children."""
    pid_file = tmp_path / "pids"
    child = (f"import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{p.pid}}'); time.sleep(60)")
    driver = (f"import signal, sys, time; sys.path.insert(0, {str(SCRIPTS)!r}); import gpu_check; "
              "signal.signal(signal.SIGTERM, gpu_check._stop); from gpu_check_jobs import Job, run_jobs; "
              f"from pathlib import Path; run_jobs([Job('j', [sys.executable, '-c', {child!r}], 120)], "
              f"Path({str(tmp_path / 'logs')!r}), time.monotonic() + 120)")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
    t0 = time.monotonic()
    while not pid_file.is_file() or not pid_file.read_text().strip():
        assert time.monotonic() - t0 < 60 and proc.poll() is None
        time.sleep(0.1)
    pids = [int(p) for p in pid_file.read_text().split()]
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    t0 = time.monotonic()
    while not all(_gone(pid) for pid in pids) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)


def _gone(pid: int) -> bool:
    """Dead, or a zombie: a killed grandchild is re-parented to PID 1, which in a container may never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# ------------------------------------------------------------------------- what runs on the GPU
def _compose(argv: list[str]) -> object:
    module = argv[argv.index("-m") + 1]
    stage = "pretrain" if module == "pretrain" else "finetune"
    overrides = [a for a in argv[argv.index("-m") + 2:] if not a.startswith("hydra.")]
    with initialize_config_dir(str(REPO / "conf" / stage), version_base="1.3"):
        return compose(stage, overrides=overrides)


def test_every_gpu_item_is_a_valid_command_and_covers_every_method_detector_and_semi_mode(tmp_path: Path) -> None:
    """The GPU-only items (fp16, SyncBN) never run on a CPU: their overrides are composed here instead."""
    gpu_check.smoke_data()
    expect = {"device": "cuda", "precision": "bf16-mixed", "channels_last": True}
    jobs = {j.name: j for j in gpu_check_correct.items(True, tmp_path, expect)}
    for method in gpu_check_correct.config_names("pretrain/method"):
        assert f"pretrain_{method}" in jobs
    for det in ("fasterrcnn", "retinanet"):
        assert f"finetune_{det}" in jobs
    for mode in gpu_check_correct.semi_modes():
        assert f"semi_{mode}" in jobs
    assert {"evaluate", "predict", "ddp_pretrain_swav", "ddp_finetune", "ddp_semi_unbiased_teacher",
            "resume_after_kill", "probe", "pretrain_swav_16mixed", "finetune_fasterrcnn_16mixed"} <= set(jobs)
    for name, job in jobs.items():
        argv = list(job.argv)  # type: ignore[arg-type]
        if "-m" in argv and argv[argv.index("-m") + 1] in ("pretrain", "finetune"):
            cfg = _compose(argv)
            assert cfg.trainer.accelerator == "gpu", name  # type: ignore[attr-defined]
    assert _compose(list(jobs["finetune_fasterrcnn_16mixed"].argv)).trainer.precision == "16-mixed"  # type: ignore
    assert _compose(list(jobs["ddp_finetune"].argv)).backbone.norm == "syncbn"  # type: ignore


def test_the_gpu_pretraining_recipe_composes_with_its_calibrated_epochs() -> None:
    import bench_ssl

    recipe = gpu_check_accuracy.with_epochs(" ".join([bench_ssl.PRETRAIN, *gpu_check_accuracy.GPU_PRETRAIN_EXTRA]),
                                            40)
    assert recipe.count("trainer.max_epochs=") == 1
    with initialize_config_dir(str(REPO / "conf" / "pretrain"), version_base="1.3"):
        cfg = compose("pretrain", overrides=recipe.split())
    assert (cfg.trainer.max_epochs, cfg.trainer.check_val_every_n_epoch) == (40, 10)
    assert (cfg.trainer.accelerator, cfg.data.batch_size, cfg.method.name) == ("gpu", 256, "simclr")
    # bench_ssl's own parser takes the check's command line (the report rebuilds its table from it).
    a = bench_ssl.parse(gpu_check_accuracy.ssl_argv("gpu", Path("/w"), recipe))
    assert a.pretrain == recipe and a.labels == [20, 100] and a.seeds == [0, 1, 2, 3, 4]


def test_the_dry_run_shrinks_bench_ssl_through_its_dataset_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_ssl

    monkeypatch.setitem(bench_ssl.DATASETS, "synthetic", bench_ssl.DATASETS["synthetic"])  # restored afterwards
    gpu_check_accuracy.toy()
    a = bench_ssl.parse(gpu_check_accuracy.ssl_argv("toy", Path("/w"), gpu_check_accuracy.TOY_PRETRAIN))
    assert a.labels == [4] and a.seeds == [0, 1] and a.finetune == gpu_check_accuracy.TOY_FINETUNE
    # 4 labels at experiment=smoke's batch 2: 2 steps an epoch, so the toy's 4 steps are 2 epochs.
    assert bench_ssl.schedule(4, a) == ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1"]


def test_the_semi_protocol_runs_at_the_scenes_size_with_the_benchmarks_own_recipe() -> None:
    import shlex

    import bench_semi

    protocol = bench_semi.load_protocol()
    for arm in ("semi", "control"):
        cfg = bench_semi.finetune_config([*shlex.split(protocol["finetune"]),
                                          *shlex.split(gpu_check_accuracy.SEMI_ARGS["gpu"]),
                                          *shlex.split(protocol["semi"])] + (["semi.unsup_weight=0"]
                                                                             if arm == "control" else []))
        assert (cfg.detector.min_size, cfg.detector.max_size, cfg.semi.mode) == (128, 128, "unbiased_teacher")


def test_the_pretraining_budget_is_timed_on_training_steps_only(tmp_path: Path) -> None:
    """StepClock's rows of a 2-epoch run, 4 steps an epoch: LR-monitor rows (no epoch) and a validation's
    later row at a step are not training time; the first epoch (decoding) is timed apart."""
    rows = [(0, -1, 0.0), (0, 0, 0.1), (1, 0, 3.1), (2, 0, 6.1), (3, 0, 9.1),
            (4, 1, 10.0), (5, 1, 11.0), (6, 1, 12.0), (7, 1, 13.0), (7, 1, 40.0)]
    (tmp_path / "clock.json").write_text(json.dumps(rows))
    first, later = gpu_check_accuracy.epoch_seconds(tmp_path / "clock.json", 4)
    assert (first, later) == (pytest.approx(12.0), pytest.approx(4.0))


# ------------------------------------------------------------------------------------ the report
def _record(tmp_path: Path) -> Path:
    data = {
        "check": "gpu_check", "version": 1, "mode": "gpu", "started": "2027-01-05 10:00:00 UTC",
        "finished": "2027-01-05 10:08:50 UTC", "wall_s": 530.0, "deadline_s": 540,
        "command": "bash scripts/gpu_check.sh",
        "machine": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "gpu_capability": "9.0",
                    "gpu_multiprocessors": 132, "driver": "580.159.04", "cuda": "13.0", "cudnn": 91000,
                    "cpu": "AMD EPYC", "cores": 16, "torch": "2.11.0+cu130", "python": "3.12.3",
                    "auto": {"precision": "bf16-mixed", "channels_last": True,
                             "reason": "the GPU computes bf16 natively"},
                    "packages": {"torchvision": "0.26.0"}},
        "phases": {
            "correctness": {"status": "done", "wall_s": 95.0, "counts": {"pass": 2, "fail": 1},
                            "expected": {"precision": "bf16-mixed", "channels_last": True},
                            "items": {"pretrain_swav": {"status": "pass", "wall_s": 12.0, "device": "cuda",
                                                        "precision": "bf16-mixed", "steps": 4},
                                      "probe": {"status": "pass", "wall_s": 5.0, "device": "cuda:0"},
                                      "semi_consistency": {"status": "fail", "wall_s": 9.0,
                                                           "error": "Traceback\nRuntimeError: boom | here"}}},
            "speed": {"status": "done", "wall_s": 150.0, "items": {
                "swav_ours": {"status": "pass", "arch": "resnet50", "crops": "224x2,96x6", "batch_size": 128,
                              "workers": 12, "precision": "bf16-mixed", "images_per_s": 1500.0},
                "frcnn_ours": {"status": "pass", "arch": "resnet50", "min_size": 800, "batch_size": 8,
                               "precision": "bf16-mixed", "images_per_s": 60.0},
                "inference": {"status": "pass", "rows": {"plain": {"images_per_s": 20.0, "peak_mem_mb": 900.0},
                                                         "ours_p100": {"images_per_s": 80.0, "peak_mem_mb": 700.0}}}},
                      "figures": {"swav_e2e_images_per_s": {"ours": 1500.0, "plain": 500.0, "vs_plain": 3.0,
                                                            "goal": 2500, "vs_goal": 0.6,
                                                            "peak_mem_mb": {"ours": 30000.0, "plain": 50000.0}},
                                  "frcnn_train_images_per_s": {"ours": 60.0, "plain": 30.0, "vs_plain": 2.0,
                                                               "peak_mem_mb": {"ours": 12000.0, "plain": 20000.0}},
                                  "inference_images_per_s": {"ours": 80.0, "ours_mode": "ours_p100", "plain": 20.0,
                                                             "vs_plain": 4.0}}},
        },
    }
    (tmp_path / "gpu_check.json").write_text(json.dumps(data))
    return tmp_path


def test_report_writes_the_gpu_section_with_ratios_goal_and_failures(tmp_path: Path) -> None:
    folder = _record(tmp_path)
    md, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    md.write_text("# Benchmarks\n\n## Speed\n\nCPU figures.\n")
    readme.write_text("# x\n\n## Speed\n\nCPU text.\n\n## Next\n\nmore\n")
    gpu_check_report.main(folder, md, readme, tmp_path / "keep")
    gpu_check_report.main(folder, md, readme, None)  # a second report replaces its section
    text = md.read_text()
    assert text.count("### NVIDIA H100 80GB HBM3, 2027-01-05") == 1 and "CPU figures." in text
    assert "| 1500.0 | 500.0 | 3.00x | 30000 / 50000 |" in text and "goal 2500: 0.60 of it" in text
    assert "| semi_consistency | fail |" in text and "RuntimeError: boom / here" in text
    assert "| 60.0 | 30.0 | 2.00x |" in text and "`ours_p100` | 80.0 | 20.0 | 4.00x" in text
    r = readme.read_text()
    assert r.index("CPU text.") < r.index("2 of 3 correctness items passed on CUDA (not: semi_consistency)") < r.index(
        "## Next")
    assert "0.60 of the 2,500 goal" in r and r.count("<!-- gpu:") == 1
    assert (tmp_path / "keep" / "NVIDIA_H100_80GB_HBM3_2027-01-05" / "gpu_check.json").is_file()


# ------------------------------------------------------------------------------------ the wheels
def test_the_manifest_lists_exactly_what_the_device_lacks() -> None:
    need = gpu_wheels.needed(gpu_wheels.project_requirements())
    listed = {w.name: w.version for w in gpu_wheels.read_manifest()}
    assert listed == need, "setup.cfg's requirements changed: run make gpu-wheels and commit wheels/gpu.txt"
    assert {"lightly", "hydra-core", "omegaconf", "antlr4-python3-runtime", "pycocotools", "faiss-cpu"} <= set(need)
    assert not {"torch", "torchvision", "pytorch-lightning", "numpy"} & set(need)


def test_the_tree_and_the_wheels_fit_one_device_call() -> None:
    wheels = sum(w.size for w in gpu_wheels.read_manifest())
    assert gpu_wheels.tree_bytes() + wheels < gpu_wheels.LIMIT_BYTES


def test_check_names_missing_changed_and_extra_wheels_and_the_size(tmp_path: Path) -> None:
    dest = tmp_path / "gpu"
    dest.mkdir()
    rows = []
    for name, version in gpu_wheels.needed(gpu_wheels.project_requirements()).items():
        f = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        f.write_bytes(name.encode())
        rows.append(gpu_wheels.Wheel(name, version, f.name, f.stat().st_size, gpu_wheels.sha256(f)))
    manifest = tmp_path / "gpu.txt"
    gpu_wheels.write_manifest(rows, manifest)
    assert gpu_wheels.check(dest, manifest)["ok"]
    (dest / rows[0].file).unlink()
    (dest / rows[1].file).write_bytes(b"changed")
    (dest / "other-1.0-py3-none-any.whl").write_bytes(b"x")
    r = gpu_wheels.check(dest, manifest, limit=1000)
    text = "\n".join(r["problems"])
    assert f"{rows[0].file} is missing" in text and f"{rows[1].file} differs" in text
    assert "other-1.0-py3-none-any.whl" in text and "over the" in text


@pytest.mark.slow  # downloads about 19 MiB of wheels when they are not here yet
def test_the_wheels_are_here_intact_and_under_the_limit() -> None:
    if not gpu_wheels.WHEELS.is_dir():
        gpu_wheels.download()
    r = gpu_wheels.check()
    assert r["ok"], r["problems"]


# ----------------------------------------------------------------------------- the whole dry run
@pytest.mark.slow  # the whole check at toy sizes: about 30 commands on a CPU, several minutes
def test_cpu_smoke_runs_every_phase_and_the_report_renders_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--cpu-smoke", "--work", str(tmp_path / "work")],
                           check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    finally:  # the accuracy runs' checkpoints: a few GB that pytest would keep for three sessions
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["mode"] == "cpu-smoke" and data.get("finished")
    items = data["phases"]["correctness"]["items"]
    assert all(v["status"] == "pass" for v in items.values()), {k: v.get("error") for k, v in items.items()}
    assert items["resume_after_kill"]["final_step"] == 12 and items["predict"]["images"] > 0
    figures = data["phases"]["speed"]["figures"]
    for key in ("swav_e2e_images_per_s", "frcnn_train_images_per_s", "inference_images_per_s"):
        assert figures[key]["ours"] > 0 and figures[key]["plain"] > 0 and figures[key]["vs_plain"] > 0, key
    ssl = json.loads((out / "ssl_synthetic.json").read_text())
    assert {"random/n4/seed0", "ssl/n4/seed0"} <= set(ssl["runs"]) and ssl["pretrain"]["knn"] is not None
    semi = json.loads((out / "semi_synthetic.json").read_text())
    assert {"converge/seed1", "semi/seed1", "labeled/seed1", "control/seed1"} <= set(semi["runs"])
    assert (out / "gpu_check.log").read_text().count("[correctness] ok") == len(items)
    md = tmp_path / "BENCHMARKS.md"
    gpu_check.main(["--report", str(out), "--benchmarks", str(md)])
    text = md.read_text()
    assert "CPU dry run (--cpu-smoke" in text and "#### Synthetic scenes: SSL against random init" in text
    assert "| 4 | SSL, fine-tuned | 2 |" in text and "Labeled only against semi" in text
