"""The chained stages: the demo in smoke form, and a 2x2 sweep of whole pipelines into the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.pipeline import FinetuneAfterPretrain, quote, stage_done
from finetune.report import load_rows, write_report

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    result = subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_demo_smoke_chains_the_backbone_and_compares(tmp_path):
    out = tmp_path / "demo"
    # Two threads whatever the test workers got, so that the side-by-side stages run.
    result = _run([str(REPO / "scripts" / "demo.py"), "--smoke", "--out", str(out)], cwd=REPO, OMP_NUM_THREADS="2")

    backbone = out / "pretrain" / "backbone.safetensors"
    assert backbone.exists() and (out / "pretrain" / "backbone.json").exists()
    pre = json.loads((out / "finetune" / "metrics.json").read_text())
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    # The fine-tune was given the exported file explicitly; the baseline had none.
    assert Path(pre["backbone"]["checkpoint"]).resolve() == backbone.resolve()
    assert pre["backbone"]["method"] == "simclr"  # the demo's default method
    assert not base["backbone"].get("checkpoint")
    # On a CPU the baseline ran beside pretraining, each on one of the two threads, its output in its
    # own log; the SSL fine-tune after them had both.
    if not torch.cuda.is_available():
        assert base["hardware"]["torch_threads"] == 1
        assert json.loads((out / "pretrain" / "metrics.json").read_text())["hardware"]["torch_threads"] == 1
        assert pre["hardware"]["torch_threads"] == 2
        assert "run dir:" in (out / "baseline" / "stage.log").read_text()
    # what the record says is what ran: pretraining converts its backbone to channels_last (CPU and
    # CUDA), fine-tuning trains NCHW
    assert json.loads((out / "pretrain" / "metrics.json").read_text())["hardware"]["channels_last"] is True
    assert pre["hardware"]["channels_last"] is False
    summary = (out / "summary.txt").read_text()
    assert "SimCLR-pretrained" in summary and "random init" in summary and "difference" in summary
    openings = ("The pretrained backbone helped", "within the seed-to-seed spread", "did NOT help")
    assert sum(o in summary for o in openings) == 1, summary
    assert (out / "predictions_vs_ground_truth.png").stat().st_size > 10_000
    assert "SimCLR-pretrained" in result.stdout
    # The semi arm started from the SSL fine-tune's best checkpoint and reports its pseudo-labels.
    semi = json.loads((out / "semi" / "metrics.json").read_text())
    assert semi["semi"]["mode"] == "unbiased_teacher" and semi["semi"]["deployed"] == "teacher"
    cfg = (out / "semi" / "config.yaml").read_text()
    assert f"init_from: {pre['best_checkpoint']}" in cfg
    assert semi["semi"]["pseudo_labels"]["precision"] is not None
    assert "SimCLR + Unbiased Teacher" in summary and "hidden ground truth" in summary

    # Re-running skips the finished stages.
    again = _run([str(REPO / "scripts" / "demo.py"), "--smoke", "--out", str(out)], cwd=REPO)
    assert again.stdout.count("already done") == 4
    assert all(stage_done(s, out / d) for s, d in (("pretrain", "pretrain"), ("finetune", "finetune")))


@pytest.mark.slow
def test_sweep_gives_a_row_per_job_and_plots(tmp_path):
    # Two jobs (each a pretraining then its fine-tune): 40 s on 2 cores, four interpreters starting.
    sweep = tmp_path / "sweep"
    _run(["-m", "finetune.sweep", "-m", "experiment=smoke", "method=swav", "method.num_prototypes=8,16",
          "trainer.max_epochs=1", f"hydra.sweep.dir={quote(sweep)}"], cwd=REPO)
    rows = load_rows(sweep)
    assert len(rows) == 2
    assert {(r["epochs"], r["prototypes"]) for r in rows} == {(1, 8), (1, 16)}
    files = write_report(sweep)
    assert files["md"].read_text().count("| resnet18 | swav |") == 2
    assert files["prototypes"].exists()


def test_chain_passes_the_experiment_on():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"hydra": {"runtime": {"choices": {"experiment": "smoke"}}}})
    assert FinetuneAfterPretrain().finetune_overrides(cfg) == ["experiment=smoke"]
    assert FinetuneAfterPretrain(["experiment=demo"]).finetune_overrides(cfg) == ["experiment=demo"]
    none = OmegaConf.create({"hydra": {"runtime": {"choices": {"experiment": None}}}})
    assert FinetuneAfterPretrain(["detector=retinanet"]).finetune_overrides(none) == ["detector=retinanet"]


@pytest.mark.slow  # two interpreters (15 s of imports each on a slow CPU)
def test_failed_stage_says_how_to_resume(tmp_path):
    from finetune.pipeline import StageFailed, run_stage

    with pytest.raises(StageFailed, match="re-run the same command"):
        run_stage("finetune", tmp_path / "ft", ["data.root=/nonexistent/folder", "data.synthetic=null"])


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_verdict_says_whether_and_why():
    verdict = _demo_module().verdict
    better, worse = {"coco": {"AP": 0.05}}, {"coco": {"AP": 0.04}}
    narrow = {"spread": 0.5, "spread_seeds": 5}
    assert verdict(better, worse, {}, narrow).startswith("The pretrained backbone helped: AP 5.0 against 4.0")
    # A gain inside random init's seed spread is not called a gain; the benchmark's longer budget is named.
    wide = {"spread": 2.2, "spread_seeds": 5, "pretrain": {"steps": 3744},
            "gains": {20: ("ssl_lpft", 3.1, 1.2, 5), 100: ("ssl", 1.5, 0.9, 5)}}
    text = verdict(better, worse, {}, wide)
    assert text.startswith("The pretrained backbone is ahead but within the seed-to-seed spread")
    assert "+1.0 points" in text and "2.2 AP (std over 5 seeds)" in text and "3744 pretraining steps" in text
    assert "20 labels: LP-FT backbone +3.1 +- 1.2 AP over 5 seeds; 100 labels: fine-tuned backbone +1.5" in text
    assert "helped" not in text
    assert "not measured yet" in verdict(better, worse, {}, {})  # no benchmark: no verdict on the spread
    learned = {"final_loss": 2.64, "num_prototypes": 32, "global_step": 300, "knn_top1": 0.459,
               "diagnostics": {"swav_embedding_cos": 0.05, "swav_code_entropy": 0.43}}
    text = verdict(better, worse, learned, narrow)
    assert "+1.0 points (1.25x)" in text and "ended at 2.640 against ln(num_prototypes) = 3.466" in text
    assert "43% of the maximum entropy" in text and "0.459" in text and "after 300 steps" in text
    collapsed = {"final_loss": 3.47, "num_prototypes": 32, "global_step": 150,
                 "diagnostics": {"swav_embedding_cos": 0.91, "swav_code_entropy": 0.998}}
    text = verdict(worse, better, collapsed, {})
    assert "did NOT help" in text and "(-1.0 points)" in text
    assert "SwAV collapsed" in text and "mean cosine 0.91" in text and "100% of the maximum entropy" in text
    assert "after 150 steps" in text
    assert "collapsed" not in verdict(worse, better, {"final_loss": 2.1, "num_prototypes": 32}, {})
    # A method without prototypes (the demo's SimCLR): its loss and kNN, never a collapse verdict.
    simclr = {"method": "simclr", "final_loss": 4.43, "knn_top1": 0.357, "global_step": 300}
    text = verdict(better, worse, simclr, narrow)
    assert "SimCLR's loss ended at 4.430, kNN top-1 on the validation boxes 0.357 after 300 steps" in text
    assert "collapsed" not in verdict(worse, better, simclr, {})


def test_sweep_entry_adds_the_finetune_callback_and_keeps_user_settings():
    from finetune.sweep import sweep_argv

    argv = sweep_argv(["-m", "method=swav", "hydra.callbacks.finetune.overrides=[detector=retinanet]"])
    assert argv[:2] == ["-m", "method=swav"]
    assert "+hydra.callbacks.finetune._target_=finetune.pipeline.FinetuneAfterPretrain" in argv
    assert "+hydra.callbacks.finetune.overrides=[detector=retinanet]" in argv
    assert "+hydra.callbacks.finetune.baseline=false" in argv and len(argv) == 5


def test_demo_reads_its_spread_and_the_longer_budget_from_the_ssl_ledger(tmp_path):
    demo = _demo_module()
    assert demo.benchmark_figures(tmp_path / "none.json") == {}
    runs = {"random/n100/seed0": {"AP": 0.17}, "random/n100/seed1": {"AP": 0.19}, "random/n20/seed0": {"AP": 0.04},
            "random/n20/seed1": {"AP": 0.05}, "ssl/n20/seed0": {"AP": 0.07}, "ssl/n20/seed1": {"AP": 0.09},
            "ssl_frozen/n20/seed0": {"AP": 0.05}, "ssl_frozen/n20/seed1": {"AP": 0.05},
            "ssl/n100/seed0": {"AP": 0.18}}  # one paired seed at 100 labels: no figure
    ledger = tmp_path / "l.json"
    ledger.write_text(json.dumps({"runs": runs, "pretrain": {"steps": 3744}}))
    f = demo.benchmark_figures(ledger)
    assert f["spread"] == pytest.approx(1.414, abs=1e-3) and f["spread_seeds"] == 2
    arm, gain, sd, seeds = f["gains"][20]
    assert arm == "ssl" and gain == pytest.approx(3.5) and sd == pytest.approx(0.707, abs=1e-3) and seeds == 2
    assert 100 not in f["gains"]
    assert "20 labels: fine-tuned backbone +3.5 +- 0.7 AP over 2 seeds" in demo.longer_budget_note(f)


def test_demo_semi_note_says_why_and_reads_the_semi_ledgers(tmp_path):
    demo = _demo_module()
    assert demo.semi_benchmark_figures(tmp_path) == []
    runs = {"labeled/seed1": {"AP": 0.19}, "labeled/seed2": {"AP": 0.18}, "semi/seed1": {"AP": 0.18},
            "semi/seed2": {"AP": 0.18}, "semi:erase/seed1": {"AP": 0.22}, "semi:erase/seed2": {"AP": 0.20},
            "semi:t7/seed1": {"AP": 0.30}, "control/seed1": {"AP": 0.30}}  # one seed of t7: no figure
    (tmp_path / "synthetic_ssl.json").write_text(json.dumps({"runs": runs}))
    bench = demo.semi_benchmark_figures(tmp_path)
    assert bench == ["from the SSL backbone, `semi` -0.5 +- 0.7 AP against labeled-only continued (2 seeds)",
                     "from the SSL backbone, `semi:erase` +2.5 +- 0.7 AP against labeled-only continued (2 seeds)"]
    ssl = {"coco": {"AP": 0.16}}
    noisy = {"coco": {"AP": 0.14}, "global_step": 78, "semi": {"deployed": "teacher", "pseudo_labels": {
        "precision": 0.38, "recall": 0.36, "pseudo_boxes_per_image": 2.8, "labeled_boxes_per_image": 2.86}}}
    (tmp_path / "bccd.json").write_text(json.dumps({"runs": {
        "labeled/seed1": {"AP": 0.41}, "labeled/seed2": {"AP": 0.40}, "semi/seed1": {"AP": 0.45},
        "semi/seed2": {"AP": 0.42}}}))
    (tmp_path / "chess.json").write_text(json.dumps({"runs": {
        "labeled/seed1": {"AP": 0.55}, "labeled/seed2": {"AP": 0.54}, "semi:erase/seed1": {"AP": 0.53},
        "semi:erase/seed2": {"AP": 0.54}}}))
    (tmp_path / "chess_long.json").write_text(json.dumps({"runs": {
        "labeled/seed1": {"AP": 0.55}, "labeled/seed2": {"AP": 0.54}, "semi:erase/seed1": {"AP": 0.56},
        "semi:erase/seed2": {"AP": 0.57}}}))
    photos = demo.semi_benchmark_figures(tmp_path, demo.SEMI_PHOTO_LEDGERS)
    assert photos == [("on BCCD's blood-cell photographs (20 labeled), `semi` +3.0 +- 1.4 AP against labeled-only "
                       "continued (2 seeds)"),
                      ("on chess-board photographs (20 labeled), `semi:erase` -1.0 +- 1.4 AP against labeled-only "
                       "continued (2 seeds)"),  # a loss is quoted as plainly as a gain
                      ("on the same chess splits continued for 900 steps, `semi:erase` +2.0 +- 1.4 AP against "
                       "labeled-only continued (2 seeds)")]
    text = demo.semi_note(noisy, ssl, bench, photos)
    assert "The same protocol on real photographs (BENCHMARKS.md): on BCCD's" in text
    assert "did not improve it: AP 14.0 against 16.0 (-2.0 points" in text
    assert "Fewer than half of the pseudo-boxes are right" in text and "`semi:erase` +2.5 +- 0.7" in text
    clean = {**noisy, "coco": {"AP": 0.18}}
    clean["semi"] = {**noisy["semi"], "pseudo_labels": {**noisy["semi"]["pseudo_labels"], "precision": 0.8}}
    text = demo.semi_note(clean, ssl, [], [])
    assert "improved it: AP 18.0" in text and "Fewer than half" not in text and "semi benchmark" not in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_dies_with_the_process_that_started_it(tmp_path):
    """A benchmark killed mid-run must not leave its stage writing into the run directory that its
    re-run resumes into: the stage gets SIGTERM when its parent dies."""
    import signal
    import time

    (tmp_path / "sleeper.py").write_text("import os, sys, time\n"
                                         + "open(sys.argv[1].split('=', 1)[1].strip(\"'\") + '/pid', 'w')"
                                         + ".write(str(os.getpid()))\ntime.sleep(60)\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", ("import time\nfrom finetune.pipeline import start_stage\n"
                                                      f"start_stage('sleeper', {str(run_dir)!r})\ntime.sleep(60)\n")],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])})
    deadline = time.time() + 30
    while not (run_dir / "pid").is_file() or not (run_dir / "pid").read_text():
        assert time.time() < deadline and parent.poll() is None, "the stage never started"
        time.sleep(0.1)
    child = int((run_dir / "pid").read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{child}").exists() and "zombie" not in _state(child):
        assert time.time() < deadline, "the stage outlived the process that started it"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
