"""Faults and hostile files: a pickle that would run code, torn checkpoints, SIGKILL and SIGTERM
mid-run, non-finite losses in fine-tuning and semi.

The kill tests run the real commands as subprocesses on the session's tiny synthetic set.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_semi_train import smoke_cfg

from finetune.backbone import load_backbone
from finetune.module import DetectionModule
from finetune.semi.module import SemiDetectionModule
from finetune.train import train as finetune_train
from pretrain.core.runtime import AtomicCheckpointIO, NonFiniteLossError, last_checkpoint
from pretrain.core.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_torch_file

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the folder ``marker``: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (self.marker,))


@pytest.fixture()
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would run ``os.makedirs(marker)``."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"payload": _Payload(marker)}}, path)
    return path, marker


def _assert_refusal(err: BaseException | str, path: Path) -> None:
    text = str(err)
    assert "refused to load" in text and str(path) in text and "os.makedirs" in text, text
    assert "safetensors" in text and "weights_only=False" not in text, text


def test_hostile_pickle_is_refused_by_every_loader(hostile, synthetic_data, tmp_path):
    path, marker = hostile
    from finetune.evaluate import main as evaluate_main
    from finetune.predict import main as predict_main
    from pretrain.export import main as export_main

    # finetune backbone.checkpoint
    with pytest.raises(UnsafeCheckpointError) as e:
        load_backbone(path, "resnet18", "bn")
    _assert_refusal(e.value, path)
    # evaluate and predict
    with pytest.raises(UnsafeCheckpointError) as e:
        evaluate_main([str(path), "--ann", str(synthetic_data["val_json"])])
    _assert_refusal(e.value, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        predict_main([str(path), str(synthetic_data["unlabeled"])])
    _assert_refusal(e.value, path)
    # export (a CLI returning 1 with the message)
    assert export_main([str(path), "--out", str(tmp_path / "export")]) == 1
    # semi: init_from, the way the pipeline's semi stage starts
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", f"init_from={path}")
    with pytest.raises(UnsafeCheckpointError) as e:
        finetune_train(cfg, tmp_path / "semi")
    _assert_refusal(e.value, path)
    # a resume: a hostile last.ckpt in the run directory is refused, never skipped silently
    run = tmp_path / "resume"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointError):
        last_checkpoint(run)
    with pytest.raises(UnsafeCheckpointError):
        finetune_train(smoke_cfg(synthetic_data["root"]), run)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_refusal_on_the_command_line_is_one_message(hostile):
    path, marker = hostile
    r = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(path), "--ann", "x.json"], check=False,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    _assert_refusal(r.stderr, path)
    assert not marker.exists()


def test_corrupt_and_empty_files_are_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(1000.0)}, good)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint\n")
    for p, words in ((torn, "truncated"), (empty, "empty"), (text, "not a torch checkpoint")):
        with pytest.raises(CorruptCheckpointError, match=words) as e:
            load_torch_file(p, "resume checkpoint")
        assert str(p) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_torch_file(tmp_path / "missing.ckpt")


def test_atomic_saves_keep_the_previous_checkpoint_for_a_torn_one(tmp_path, caplog):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(3)}, last)
    io.save_checkpoint({"global_step": 4, "w": torch.full((3,), 2.0)}, last)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert load_torch_file(last)["global_step"] == 4 and io.load_checkpoint(last.parent / "last.prev.ckpt")[
        "global_step"] == 3
    assert last_checkpoint(tmp_path) == last
    # A kill inside torch.save leaves only a .tmp beside intact files.
    last.with_name("last.ckpt.tmp").write_bytes(b"PK\x03\x04 half")
    assert last_checkpoint(tmp_path) == last
    # A torn last.ckpt anyway (a copy cut short): reported, kept aside, the previous one used.
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING):
        found = last_checkpoint(tmp_path)
    assert found == last.parent / "last.prev.ckpt" and load_torch_file(found)["global_step"] == 3
    assert (last.parent / "last.ckpt.corrupt").is_file() and not last.exists()
    assert "truncated" in caplog.text and "previous checkpoint" in caplog.text
    # Both unreadable: a fresh start, said so.
    found.write_bytes(b"")
    assert last_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------------ kills, real runs
def _pretrain_cmd(run: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", "method=swav", "experiment=smoke", f"data.root={data_root}",
            "data.synthetic=null", "data.knn_val_json=null", "checkpoint_every_n_steps=1",
            f"hydra.run.dir={run}", *extra]


def _finetune_cmd(run: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "experiment=smoke", f"data.root={data_root}", "data.synthetic=null",
            "eval.plots=false", "checkpoint_every_n_steps=1", f"hydra.run.dir={run}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _step_of(ckpt: Path) -> int:
    return int(load_torch_file(ckpt, mmap=True)["global_step"])


def _signal_after_step(cmd: list[str], run: Path, sig: int, min_step: int, timeout: float = 240.0
                       ) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` once ``last.ckpt`` holds ``min_step`` or more, wait for the exit."""
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout and proc.poll() is None:
            if last.is_file():
                try:
                    if _step_of(last) >= min_step:
                        proc.send_signal(sig)
                        break
                except (CorruptCheckpointError, FileNotFoundError):
                    pass  # renamed under our feet: read it on the next poll
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _rerun(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def test_sigkilled_pretraining_resumes_at_its_saved_step(synthetic_data, tmp_path):
    """SIGKILL between step checkpoints; the re-run starts at the saved step with the saved SwAV
    queue and optimizer state and finishes the schedule (32 images, batch 8: 4 steps per epoch)."""
    run = tmp_path / "pre"
    cmd = _pretrain_cmd(run, synthetic_data["root"], "trainer.max_epochs=3", "method.queue_length=8",
                        "method.queue_start_epoch=0")
    killed = _signal_after_step(cmd, run, signal.SIGKILL, min_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    saved = load_torch_file(last_checkpoint(run))
    step = int(saved["global_step"])
    assert 4 <= step < 12, step
    queue = {k: v for k, v in saved["state_dict"].items() if "queue" in k}
    assert queue and saved["optimizer_states"][0]["state"]
    r = _rerun(cmd)
    assert "resuming from" in r.stdout + r.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["epochs"] == 3
    # The loss log has every step once: the re-run continued at the saved step, not at 0.
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss"))
    assert steps == list(range(12))


def test_sigterm_saves_exits_cleanly_and_the_rerun_resumes(synthetic_data, tmp_path):
    """What SLURM and Kubernetes send: the run stops after the step it is in, with last.ckpt at
    that step, exit status 143 and no traceback; the same command then finishes the schedule."""
    run = tmp_path / "ft"
    cmd = _finetune_cmd(run, synthetic_data["root"], "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=8")
    stopped = _signal_after_step(cmd, run, signal.SIGTERM, min_step=2)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "Traceback" not in stopped.stdout and "stopped by SIGTERM at global step" in stopped.stdout
    said = int(stopped.stdout.split("stopped by SIGTERM at global step ")[1].split(";")[0])
    assert 2 <= said < 24 and _step_of(run / "checkpoints" / "last.ckpt") == said
    assert not (run / "metrics.json").exists()
    r = _rerun(cmd)
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in r.stdout
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 24  # 8 epochs of 3 steps


def test_rerun_after_a_torn_last_checkpoint_uses_the_previous_one(synthetic_data, tmp_path):
    run = tmp_path / "ft"
    cmd = _finetune_cmd(run, synthetic_data["root"], "trainer.max_epochs=1")
    _rerun(cmd)
    last = run / "checkpoints" / "last.ckpt"
    prev_step = _step_of(run / "checkpoints" / "last.prev.ckpt")
    last.write_bytes(last.read_bytes()[:1000])
    r = _rerun(_finetune_cmd(run, synthetic_data["root"], "trainer.max_epochs=2"))
    assert "truncated" in r.stdout + r.stderr and "last.prev.ckpt" in r.stdout
    assert (run / "checkpoints" / "last.ckpt.corrupt").is_file()
    assert prev_step == 3 and json.loads((run / "metrics.json").read_text())["global_step"] == 6


# ------------------------------------------------------------------------------ non-finite losses
@pytest.mark.parametrize("module_cls, overrides", [
    (DetectionModule, ()),
    (SemiDetectionModule, ("semi=unbiased_teacher", "semi.burn_in=1", "semi.threshold=0.0")),
], ids=["finetune", "semi"])
def test_non_finite_loss_stops_with_the_last_good_checkpoint(module_cls, overrides, synthetic_data, tmp_path,
                                                            monkeypatch):
    original = module_cls.training_step

    def poisoned(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(module_cls, "training_step", poisoned)
    cfg = smoke_cfg(synthetic_data["root"], *overrides, "checkpoint_every_n_steps=1", "trainer.max_epochs=3")
    with pytest.raises(NonFiniteLossError, match="global step 5"):
        finetune_train(cfg, tmp_path)
    ckpt = load_torch_file(last_checkpoint(tmp_path))
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    if module_cls is SemiDetectionModule:
        assert any(k.startswith("teacher.") for k in ckpt["state_dict"])
