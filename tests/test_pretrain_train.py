"""train(cfg) end to end on the smoke experiment: outputs, resume, NaN stop, collapse warnings, CLI."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from PIL import Image
from safetensors.torch import load_file

from pretrain.callbacks import LossNearValueWarning, MetricBelowWarning
from pretrain.core.run.guards import NonFiniteLossError
from pretrain.methods.base import SSLMethod, plain_config
from pretrain.methods.moco import MoCoV2
from pretrain.methods.swav import SwAV
from pretrain.train import train, warn_if_no_knn_gain

ROOT = Path(__file__).resolve().parents[1]


def smoke_cfg(*overrides: str):
    return compose_config("pretrain", overrides=["experiment=smoke", *overrides])


def test_smoke_run_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run directory outside Hydra is the working directory
    metrics = train(smoke_cfg("method=swav"))
    for name in ("config.yaml", "checkpoints/last.ckpt", "logs/metrics.csv", "metrics.json",
                 "backbone.safetensors", "backbone.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["stage"] == "pretrain" and saved["method"] == "swav" and saved["num_prototypes"] == 16
    assert saved["epochs"] == 1 and saved["global_step"] == 4 and saved["images_seen"] == 32
    assert math.isfinite(saved["final_loss"])
    # The kNN figure reported is the one the probe logged at the last validation.
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        knn = [float(r["knn_top1"]) for r in csv.DictReader(f) if r.get("knn_top1")]
    assert knn and saved["knn_top1"] == pytest.approx(knn[-1])
    assert set(saved["diagnostics"]) == {"swav_code_entropy", "swav_embedding_cos"}
    # trainer.precision=auto: chosen from the hardware, recorded with its reason.
    from pretrain.core.run.precision import choose

    assert saved["precision"] == choose({"accelerator": "cpu", "precision": "auto"}).precision
    assert saved["hardware"]["reason"] != "set explicitly"
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == "resnet18" and meta["epochs"] == 1 and meta["images_seen"] == 32
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train_loss") for r in rows) and any(r.get("knn_top1") for r in rows)
    assert any(k.startswith("lr-") for k in rows[0])
    # The random-init reference: the same probe at step 0, logged and kept beside the history.
    step0 = [(r["step"], float(r["knn_top1_step0"])) for r in rows if r.get("knn_top1_step0")]
    assert step0 == [("0", pytest.approx(saved["knn_top1_random"]))] and 0 <= saved["knn_top1_random"] <= 1
    assert saved["knn_history"] == [{"step": 4, "epoch": 0, "knn_top1": pytest.approx(saved["knn_top1"])}]
    assert saved["knn_gain_over_random"] == pytest.approx(saved["knn_top1"] - saved["knn_top1_random"], abs=1e-6)
    # The curves as PNGs: loss and LR per step, the kNN probe per epoch.
    for name in ("loss.png", "lr.png", "knn.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.size[0] > 300 and im.getextrema() != ((255, 255),) * 3, name
    # Lightning checkpoints load without unpickling objects.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["method"]["name"] == "swav"


def test_rerun_in_the_same_directory_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(smoke_cfg("method=swav", "data.knn_val_json=null"))
    assert first["global_step"] == 4
    resumed_state = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            resumed_state["step"] = trainer.global_step
            resumed_state["queue_count"] = int(pl_module.queue_count)
            resumed_state["optimizer_state"] = len(trainer.optimizers[0].state)

    monkeypatch.setattr(SwAV, "method_callbacks", lambda self: [Probe()])
    second = train(smoke_cfg("method=swav", "data.knn_val_json=null", "trainer.max_epochs=2"))
    assert resumed_state["step"] == 4 and resumed_state["queue_count"] == 16
    assert resumed_state["optimizer_state"] > 0  # LARS momentum buffers came back
    assert second["global_step"] == 8 and second["epochs"] == 2 and second["images_seen"] == 64
    assert json.loads((tmp_path / "backbone.json").read_text())["epochs"] == 2
    # The CSV log keeps the first run's rows, and the LR schedule spans the new length.
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = sorted(int(r["step"]) for r in rows if r.get("train_loss"))
    assert loss_steps == list(range(8))
    lrs = [float(r["lr-LARS/decay"]) for r in rows if r.get("lr-LARS/decay")]
    assert len(lrs) == 8 and lrs[4] > lrs[3] and lrs[4] > lrs[-1] > 0


def test_step0_knn_is_measured_before_any_update_and_kept_by_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probes = []
    probe = SSLMethod.knn_probe

    def recording(self, loader):
        probes.append((self.global_step, {k: v.clone() for k, v in self.backbone.state_dict().items()}))
        return probe(self, loader)

    monkeypatch.setattr(SSLMethod, "knn_probe", recording)
    cfg = smoke_cfg("method=moco")
    first = train(cfg)
    # One extra pass, at step 0, on the weights the run was initialised with.
    assert len(probes) == 1 and probes[0][0] == 0
    pl.seed_everything(0)
    init = MoCoV2(plain_config(cfg)).backbone.state_dict()
    assert all(torch.equal(probes[0][1][k], init[k]) for k in init)
    assert not torch.equal(init["conv1.weight"], load_file(tmp_path / "backbone.safetensors")["conv1.weight"])
    random_knn = first["knn_top1_random"]
    assert random_knn is not None and first["resolved_settings"] == {"queue_length": 8}  # auto: 32 images

    # A resume keeps the checkpoint's reference: no new probe on the trained weights.
    second = train(smoke_cfg("method=moco", "trainer.max_epochs=2"))
    assert len(probes) == 1 and second["knn_top1_random"] == random_knn
    assert [h["step"] for h in second["knn_history"]] == [4, 8]
    assert second["resolved_settings"] == {"queue_length": 8}  # the auto queue of the first start
    assert json.loads((tmp_path / "backbone.json").read_text())["method_settings"]["queue_length"] == 8
    # A checkpoint from before the reference existed: metrics.json's value is kept, nothing re-measured.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["knn"]
    torch.save(ckpt, tmp_path / "checkpoints" / "last.ckpt")
    third = train(smoke_cfg("method=moco", "trainer.max_epochs=3"))
    assert len(probes) == 1 and third["knn_top1_random"] == random_knn and third["global_step"] == 12


def test_knn_plot_draws_the_random_init_reference(tmp_path):
    from pretrain.core.run.curves import plot_pretrain_curves

    def reference_pixels(png: Path) -> int:  # the dashed line's colour, matplotlib's tab:red
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
        return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())

    rows = ["epoch,knn_top1,step,train_loss", "0,,0,3.0", "0,0.3,4,", "1,0.4,9,"]
    (tmp_path / "plain.csv").write_text("\n".join(rows) + "\n")
    # What base.py logs at step 0 (no epoch column): the reference comes from the CSV itself.
    (tmp_path / "step0.csv").write_text("\n".join([rows[0] + ",knn_top1_step0", ",,0,,0.25",
                                                   *(r + "," for r in rows[1:])]) + "\n")
    plot_pretrain_curves(tmp_path / "plain.csv", tmp_path / "plain")
    plot_pretrain_curves(tmp_path / "step0.csv", tmp_path / "step0")
    plot_pretrain_curves(tmp_path / "plain.csv", tmp_path / "given", knn_reference=0.25)
    assert reference_pixels(tmp_path / "plain" / "knn.png") == 0
    assert reference_pixels(tmp_path / "step0" / "knn.png") > 200
    assert reference_pixels(tmp_path / "given" / "knn.png") > 200


def test_a_final_knn_not_above_the_random_init_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="pretrain.train"):
        assert warn_if_no_knn_gain(0.30, 0.35, "simclr")
    assert "kNN top-1 0.3000 is not above the random-init backbone's 0.3500 (step 0; 0.0500 below it)" in caplog.text
    assert "trainer.max_epochs" in caplog.text and "method=densecl" in caplog.text
    caplog.clear()
    assert warn_if_no_knn_gain(0.35, 0.35, "simclr")  # equal is not above
    assert warn_if_no_knn_gain(0.1818181872367859, 2 / 11, "simclr")  # nor equal up to float32 rounding
    assert not warn_if_no_knn_gain(0.36, 0.35, "simclr") and not warn_if_no_knn_gain(None, 0.35, "simclr")
    assert not warn_if_no_knn_gain(0.3, None, "simclr")


@pytest.mark.slow  # test_reliability kills a real run; test_rerun_in_the_same_directory_resumes stays fast
def test_killed_run_resumes_from_its_last_finished_epoch(tmp_path, monkeypatch):
    """last.ckpt is written at every epoch end, not only when training ends: a run killed in
    its third epoch re-runs from the end of the second."""
    monkeypatch.chdir(tmp_path)

    class Kill(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("killed")

    method_callbacks = SwAV.method_callbacks
    monkeypatch.setattr(SwAV, "method_callbacks", lambda self: [*method_callbacks(self), Kill()])
    with pytest.raises(RuntimeError, match="killed"):
        train(smoke_cfg("method=swav", "data.knn_val_json=null", "trainer.max_epochs=3"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["state_dict"]["epochs_done"] == 2  # 2 epochs of 4 steps
    monkeypatch.setattr(SwAV, "method_callbacks", method_callbacks)
    metrics = train(smoke_cfg("method=swav", "data.knn_val_json=null", "trainer.max_epochs=3"))
    assert metrics["global_step"] == 12 and metrics["epochs"] == 3 and metrics["images_seen"] == 96
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = SwAV.compute_loss

    def poisoned(self, views):
        loss, stats = original(self, views)
        return (loss * float("nan") if self.global_step == 2 else loss), stats

    monkeypatch.setattr(SwAV, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="global step 2.*nonfinite_loss=skip"):
        train(smoke_cfg("method=swav", "data.knn_val_json=null", "checkpoint_every_n_steps=1"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_step0_reference_without_validation_in_the_first_epoch(tmp_path, monkeypatch):
    """A run that validates every few epochs (long runs probe every 100) still measures its
    random-features reference at step 0, before any update."""
    monkeypatch.chdir(tmp_path)
    saved = train(smoke_cfg("method=simclr", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2"))
    assert saved["knn_top1_random"] is not None and 0 <= saved["knn_top1_random"] <= 1
    assert [h["epoch"] for h in saved["knn_history"]] == [1]  # the validations themselves keep their cadence


def test_collapse_warnings_fire_after_their_patience():
    trainer = SimpleNamespace(global_step=0, callback_metrics={})
    swav = LossNearValueWarning(value=math.log(16), margin=0.05, patience=3, message="collapse")
    near = {"loss": torch.tensor(math.log(16) + 0.01)}
    for _ in range(2):
        swav.on_train_batch_end(trainer, None, near, None, 0)
    assert not swav.warned
    with pytest.warns(UserWarning, match="collapse"):
        swav.on_train_batch_end(trainer, None, near, None, 0)
    swav.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 0)
    assert swav.streak == 0 and not swav.warned

    # SimCLR: ln(2N - 1) with N the images per step over all processes (here 8 x 2 processes)
    from pretrain.methods.simclr import UniformSimilarityWarning

    simclr = UniformSimilarityWarning(batch_size=8, margin=0.02, patience=2)
    simclr.setup(SimpleNamespace(world_size=2), None, "fit")
    assert simclr.target == pytest.approx(math.log(31))
    simclr.on_train_batch_end(trainer, None, {"loss": torch.tensor(math.log(31) - 0.01)}, None, 0)
    with pytest.warns(UserWarning, match=r"ln\(2N - 1\) = 3.434 \(N = 16 .*min_scale"):
        simclr.on_train_batch_end(trainer, None, {"loss": torch.tensor(math.log(31) + 0.01)}, None, 0)

    vic = MetricBelowWarning("vicreg_std", threshold=0.05, patience=2, message="std near zero")
    trainer.callback_metrics = {"vicreg_std": torch.tensor(0.5)}
    vic.on_train_batch_end(trainer, None, None, None, 0)
    trainer.callback_metrics = {"vicreg_std": torch.tensor(0.001)}
    vic.on_train_batch_end(trainer, None, None, None, 0)
    with pytest.warns(UserWarning, match="std near zero"):
        vic.on_train_batch_end(trainer, None, None, None, 0)


def test_bad_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="frozen BN"):
        train(smoke_cfg("backbone.norm=frozen_bn"))
    with pytest.raises(FileNotFoundError, match="data.root"):
        train(smoke_cfg("data.root=/nonexistent/folder"))


@pytest.mark.slow
def test_cli_multirun_sweeps_every_combination(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pretrain", "-m", "experiment=smoke", "method=swav",
           "method.num_prototypes=8,16", "trainer.max_epochs=1,2", "data.knn_val_json=null",
           f"data.synthetic_dir={tmp_path / 'synthetic'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    metas = [json.loads((tmp_path / "sweep" / str(i) / "backbone.json").read_text()) for i in range(4)]
    assert sorted((m["num_prototypes"], m["epochs"]) for m in metas) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert not (tmp_path / "sweep" / "4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vicreg", "moco", "simclr"])
def test_cli_smoke_run_and_export_command(tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pretrain", f"method={method}", "experiment=smoke",
                    f"data.synthetic_dir={tmp_path / 'synthetic'}", f"hydra.run.dir={run}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert json.loads((run / "metrics.json").read_text())["method"] == method
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(run / "checkpoints" / "last.ckpt"), "--out",
                    str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    from pretrain.core.backbone.backbone_file import read_backbone_file

    a, meta = read_backbone_file(run / "backbone.safetensors")
    b, _ = read_backbone_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["method"] == method


@pytest.mark.slow
def test_cpu_ddp_two_processes(tmp_path):
    # Exercises the distributed paths (Sinkhorn all-reduce, kNN all_gather with padding removed).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pretrain", "method=swav", "experiment=smoke", "trainer.strategy=ddp",
                    "trainer.devices=2", "trainer.accelerator=cpu", f"data.synthetic_dir={tmp_path / 'synthetic'}",
                    f"hydra.run.dir={run}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_batch_size"] == 16 and metrics["global_step"] == 2 and metrics["images_seen"] == 32
    assert 0.0 <= metrics["knn_top1"] <= 1.0


@pytest.mark.parametrize(
    ("trainer", "norm", "expected"),
    [
        ({"strategy": "ddp", "accelerator": "gpu"}, "bn", True),
        ({"strategy": "ddp", "accelerator": "gpu"}, "gn", False),
        ({"strategy": "ddp", "accelerator": "cpu"}, "bn", False),  # torch's SyncBN is GPU-only
        ({"strategy": "auto", "accelerator": "gpu"}, "bn", False),
        ({"strategy": "ddp", "accelerator": "gpu", "sync_batchnorm": False}, "bn", False),
    ],
)
def test_sync_batchnorm_is_chosen_for_bn_under_gpu_ddp(trainer, norm, expected):
    from pretrain.train import _trainer_kwargs

    kwargs = _trainer_kwargs({"trainer": {"sync_batchnorm": None, **trainer}, "backbone": {"norm": norm}})
    assert kwargs["sync_batchnorm"] is expected


def test_one_sync_batchnorm_rule_for_both_stages():
    from pretrain.core.run.trainer import use_sync_batchnorm

    gpu_ddp = {"strategy": "ddp", "accelerator": "gpu"}
    assert use_sync_batchnorm(gpu_ddp, "syncbn", norms=("syncbn",))  # fine-tuning asks by norm
    assert not use_sync_batchnorm(gpu_ddp, "bn", norms=("syncbn",))
    assert not use_sync_batchnorm({"strategy": "ddp", "accelerator": "cpu"}, "syncbn", norms=("syncbn",))
    # An explicit true on a CPU is not honoured: torch's SyncBatchNorm would fail at the first step.
    assert not use_sync_batchnorm({"strategy": "ddp", "accelerator": "cpu", "sync_batchnorm": True}, "bn")


@pytest.mark.slow
def test_demo_swav_recipe_gets_past_the_uniform_phase(tmp_path, monkeypatch):
    # The demo's SwAV recipe (experiment=demo) on the demo's kind of data and its 300 steps
    # (about 5 minutes on a 2-core CPU): the loss must leave ln(num_prototypes) and the
    # embeddings must not converge. The paper's recipe (colour views, temperature 0.1, LARS)
    # stays at ln K here (README, demo section).
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("pretrain", overrides=[
        # The 160 px scenes of every size that recipe was tuned on (the demo itself now runs
        # SimCLR on 128 px medium/large scenes, where this recipe stays at ln K: README).
        "experiment=demo_swav", "synthetic@data=default",
        f"data.synthetic_dir={tmp_path / 'synthetic'}",
        "data.synthetic.num_train=4", "data.synthetic.num_val=4", "data.synthetic.num_unlabeled=960",
        "data.knn_val_json=null", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    assert metrics["global_step"] == 300  # 20 epochs of 15 batches
    assert metrics["final_loss"] < math.log(32) - 0.15, metrics["final_loss"]
    assert metrics["diagnostics"]["swav_embedding_cos"] < 0.5, metrics["diagnostics"]
    assert metrics["diagnostics"]["swav_code_entropy"] < 0.85, metrics["diagnostics"]
