"""Faults and hostile files: a pickle that would run code, torn checkpoints, SIGKILL and SIGTERM
mid-run, non-finite losses in fine-tuning and semi.

On the session's tiny synthetic set: SIGKILL hits a real `python -m pretrain` subprocess; SIGTERM
is delivered for real to this process during a fine-tuning step (Lightning's handler is installed
only while training runs).
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_pretrain_train import smoke_cfg as pretrain_cfg
from test_semi_train import smoke_cfg

from finetune.backbone import load_backbone
from finetune.module import DetectionModule
from finetune.run import run as finetune_train
from finetune.semi.module import SemiDetectionModule
from pretrain.core.run.checkpoints import AtomicCheckpointIO, last_checkpoint
from pretrain.core.run.guards import NonFiniteLossError
from pretrain.core.run.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_torch_file
from pretrain.methods.swav import SwAV
from pretrain.train import train as pretrain_train

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


def test_refusal_on_the_command_line_is_one_message(hostile, capsys):
    """`python -m finetune.evaluate hostile.ckpt` ends with one line on stderr and status 2."""
    from finetune.evaluate import main as evaluate_main
    from pretrain.core.run.safe_load import run_cli

    path, marker = hostile
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: evaluate_main([str(path), "--ann", "x.json"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: refused to load") and err.count("\n") == 1, err
    _assert_refusal(err, path)
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


def test_sigkilled_pretraining_resumes_at_its_saved_step(synthetic_data, tmp_path, monkeypatch, caplog):
    """A real SIGKILL between step checkpoints; the re-run (the same config, in this process) starts
    at the saved step with the saved SwAV queue and optimizer state and finishes the schedule
    (32 images, batch 8: 4 steps per epoch)."""
    run = tmp_path / "pre"
    overrides = ("method=swav", f"data.root={synthetic_data['root']}", "data.synthetic=null",
                 "data.knn_val_json=null", "checkpoint_every_n_steps=1", "trainer.max_epochs=3",
                 "method.queue_length=8", "method.queue_start_epoch=0")
    cmd = [sys.executable, "-m", "pretrain", "experiment=smoke", *overrides, f"hydra.run.dir={run}"]
    killed = _signal_after_step(cmd, run, signal.SIGKILL, min_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    saved = load_torch_file(last_checkpoint(run))
    step = int(saved["global_step"])
    assert 4 <= step < 12, step
    assert any("queue" in k for k in saved["state_dict"]) and saved["optimizer_states"][0]["state"]
    resumed: dict[str, object] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            resumed["step"] = trainer.global_step
            resumed["queue"] = {k: v.clone() for k, v in pl_module.state_dict().items() if "queue" in k}
            resumed["momentum"] = [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()
                                   if "momentum_buffer" in s]

    method_callbacks = SwAV.method_callbacks
    monkeypatch.setattr(SwAV, "method_callbacks", lambda self: [*method_callbacks(self), Probe()])
    monkeypatch.chdir(run)
    with caplog.at_level(logging.INFO):
        metrics = pretrain_train(pretrain_cfg(*overrides))
    assert "resuming from" in caplog.text
    assert resumed["step"] == step
    for k, v in resumed["queue"].items():  # type: ignore[union-attr]
        assert torch.equal(v, saved["state_dict"][k]), k
    saved_momentum = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()
                      if "momentum_buffer" in s]
    assert resumed["momentum"] and all(torch.equal(a, b) for a, b in zip(resumed["momentum"], saved_momentum))
    assert metrics["global_step"] == 12 and metrics["epochs"] == 3
    # The loss log has every step once: the re-run continued at the saved step, not at 0.
    with open(run / "logs" / "metrics.csv") as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss"))
    assert steps == list(range(12))


def test_sigterm_saves_exits_cleanly_and_the_rerun_resumes(synthetic_data, tmp_path, monkeypatch, capsys):
    """What SLURM and Kubernetes send, delivered for real to this process mid-step: the run stops
    after that step with last.ckpt at it, exits with status 143 and a one-line message; the same
    config then finishes the schedule."""
    original = DetectionModule.training_step

    def step_then_sigterm(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DetectionModule, "training_step", step_then_sigterm)
    overrides = ("eval.plots=false", "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=5")
    with pytest.raises(SystemExit) as stop:
        finetune_train(smoke_cfg(synthetic_data["root"], *overrides), tmp_path)
    out = capsys.readouterr().out
    assert stop.value.code == 143
    assert "stopped by SIGTERM at global step 5;" in out and "Re-run the same command" in out
    assert _step_of(tmp_path / "checkpoints" / "last.ckpt") == 5  # mid-epoch: 3 steps per epoch
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(DetectionModule, "training_step", original)
    metrics = finetune_train(smoke_cfg(synthetic_data["root"], *overrides), tmp_path)
    assert f"resuming from {tmp_path / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert metrics["global_step"] == 15  # 5 epochs of 3 steps


def test_rerun_after_a_torn_last_checkpoint_uses_the_previous_one(synthetic_data, tmp_path, caplog):
    cfg = smoke_cfg(synthetic_data["root"], "eval.plots=false", "checkpoint_every_n_steps=1", "trainer.max_epochs=1")
    finetune_train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _step_of(tmp_path / "checkpoints" / "last.prev.ckpt") == 3  # the step save, then the epoch-end one
    last.write_bytes(last.read_bytes()[:1000])  # a kill during a non-atomic copy
    with caplog.at_level(logging.WARNING):
        metrics = finetune_train(smoke_cfg(synthetic_data["root"], "eval.plots=false", "trainer.max_epochs=2"),
                                 tmp_path)
    assert "truncated" in caplog.text and "last.prev.ckpt" in caplog.text
    assert (tmp_path / "checkpoints" / "last.ckpt.corrupt").is_file()
    assert metrics["global_step"] == 6  # resumed at step 3, not from scratch


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
    with pytest.raises(NonFiniteLossError, match="global step 4.*nonfinite_loss=skip"):
        finetune_train(cfg, tmp_path)
    ckpt = load_torch_file(last_checkpoint(tmp_path))
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    if module_cls is SemiDetectionModule:
        assert any(k.startswith("teacher.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("module_cls, overrides", [
    (DetectionModule, ()),
    pytest.param(SemiDetectionModule, ("semi=unbiased_teacher", "semi.burn_in=1", "semi.threshold=0.0"),
                 marks=pytest.mark.slow),
], ids=["finetune", "semi"])
def test_non_finite_loss_skip_drops_that_update_and_goes_on(module_cls, overrides, synthetic_data, tmp_path,
                                                           monkeypatch, caplog):
    original = module_cls.training_step
    before: dict[int, list[torch.Tensor]] = {}

    def poisoned(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step in (4, 5):  # the weights just before and just after the poisoned step
            before[self.global_step] = [p.detach().clone() for p in self.model.parameters()]
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(module_cls, "training_step", poisoned)
    cfg = smoke_cfg(synthetic_data["root"], *overrides, "nonfinite_loss=skip", "trainer.max_epochs=3",
                    "eval.plots=false")
    with caplog.at_level(logging.WARNING):
        metrics = finetune_train(cfg, tmp_path)
    assert metrics["global_step"] == 9 and metrics["skipped_nonfinite_steps"] == [4]
    assert "global step 4: step skipped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before[4], before[5], strict=True))  # no NaN, no update
    ckpt = load_torch_file(last_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert [v["skipped_steps"] for k, v in ckpt["callbacks"].items() if "NonFinite" in k] == [[4]]  # for resumes


@pytest.mark.slow
def test_non_finite_loss_skip_stops_a_diverged_run(synthetic_data, tmp_path, monkeypatch):
    original = DetectionModule.training_step

    def diverged(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss

    monkeypatch.setattr(DetectionModule, "training_step", diverged)
    cfg = smoke_cfg(synthetic_data["root"], "nonfinite_loss=skip", "checkpoint_every_n_steps=1",
                    "trainer.max_epochs=5", "eval.plots=false")
    with pytest.raises(NonFiniteLossError, match="global step 12 after 10 skipped steps in a row"):
        finetune_train(cfg, tmp_path)
    ckpt = load_torch_file(last_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    (),
    ("semi=unbiased_teacher", "semi.burn_in=2", "semi.ema_decay=0.5", "semi.threshold=0.0",
     "detector.detections_per_img=20", "trainer.gradient_clip_val=5.0"),  # every teacher box, x4: clip
], ids=["finetune", "unbiased_teacher"])
def test_sigkilled_detection_run_resumes_at_its_saved_step(overrides, synthetic_data, tmp_path, monkeypatch,
                                                           capsys):
    """Fine-tuning and semi as real ``python -m finetune`` subprocesses, SIGKILLed after a step
    checkpoint; the re-run starts at the saved step with the saved optimizer state and, in semi,
    the saved teacher (12 labeled images at batch 4: 3 steps per epoch, 4 epochs)."""
    run = tmp_path / "run"
    common = ("eval.plots=false", "checkpoint_every_n_steps=1", "trainer.max_epochs=4",
              "trainer.check_val_every_n_epoch=4", *overrides)
    cmd = [sys.executable, "-m", "finetune", "experiment=smoke", f"data.root={synthetic_data['root']}",
           "data.synthetic=null", *common, f"hydra.run.dir={run}"]
    killed = _signal_after_step(cmd, run, signal.SIGKILL, min_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    saved = load_torch_file(last_checkpoint(run))
    step = int(saved["global_step"])
    assert 4 <= step < 12, step
    module_cls = SemiDetectionModule if overrides else DetectionModule
    resumed: dict[str, object] = {}
    original_start = module_cls.on_train_start

    def probe(self):  # type: ignore[no-untyped-def]
        resumed["step"] = self.trainer.global_step
        resumed["state"] = {k: v.clone() for k, v in self.state_dict().items()}
        resumed["momentum"] = [s["momentum_buffer"].clone() for s in self.trainer.optimizers[0].state.values()
                               if "momentum_buffer" in s]
        return original_start(self)

    monkeypatch.setattr(module_cls, "on_train_start", probe)
    metrics = finetune_train(smoke_cfg(synthetic_data["root"], *common), run)
    assert "resuming from" in capsys.readouterr().out
    assert resumed["step"] == step
    state = resumed["state"]
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items()), "weights differ from last.ckpt"
    if overrides:
        assert any(k.startswith("teacher.") for k in saved["state_dict"])  # and equal, by the line above
    saved_momentum = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()
                      if "momentum_buffer" in s]
    assert resumed["momentum"] and all(torch.equal(a, b) for a, b in zip(resumed["momentum"], saved_momentum))
    assert metrics["global_step"] == 12
