"""Fine-tuning and both teacher-student modes under Lightning DDP with 2 CPU processes (gloo).

Each run reports in metrics.json what every rank trained on and whether the ranks' weights agree
(finetune/ddp_report.py). 12 labeled images at batch 2 per rank on 2 ranks: 3 steps per epoch,
where one process takes 6 — the global batch is the sum over the ranks.

Slow: each test is two interpreters importing Lightning and torch, 30-60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ddp_run(data_root: Path, run: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "finetune", "experiment=smoke", f"data.root={data_root}", "data.synthetic=null",
           "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=2",
           "trainer.limit_train_batches=null", "eval.plots=false", f"hydra.run.dir={run}", *overrides]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads((run / "metrics.json").read_text())


def _check_shards(m: dict, semi: bool) -> None:
    d = m["distributed"]
    assert d["world_size"] == 2
    assert d["labeled_images_per_rank"] == [12, 12]  # 6 per epoch each, 2 epochs
    assert d["labeled_images_total"] == 24 and m["global_step"] == 6
    assert d["first_epoch_shards_overlap"] == []  # the two halves of the labeled set
    assert d["student_weights_agree"] is True
    if semi:
        assert all(n == 12 for n in d["unlabeled_images_per_rank"])  # unlabeled batch = labeled batch (1:1)
        assert d["teacher_weights_agree"] is True
    else:
        # Plain fine-tuning: one stream of batches and one detector (the report names what the module has).
        assert "unlabeled_images_per_rank" not in d and "teacher_weights_agree" not in d


@pytest.mark.slow
def test_finetune_on_two_cpu_processes(synthetic_data, tmp_path):
    _check_shards(_ddp_run(synthetic_data["root"], tmp_path / "ft"), semi=False)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("semi=unbiased_teacher", "semi.burn_in=2", "semi.threshold=0.0", "detector.detections_per_img=20"),
    # A 2-step RetinaNet scores near its 0.01 prior: a GMM fallback of 0 lets its first scores through.
    ("semi=mean_teacher", "detector=retinanet", "semi.burn_in=2", "semi.threshold=gmm", "semi.gmm_fallback=0.0",
     "detector.detections_per_img=20", "detector.score_thresh=0.001"),
], ids=["unbiased_teacher", "mean_teacher_gmm"])
def test_semi_on_two_cpu_processes(overrides, synthetic_data, tmp_path):
    m = _ddp_run(synthetic_data["root"], tmp_path / "semi", *overrides)
    _check_shards(m, semi=True)
    # The teacher started after burn-in on both ranks and produced pseudo-labels (merged over ranks).
    s = m["semi"]
    assert s["deployed"] == "teacher" and s["pseudo_labels"]["pseudo_boxes_per_image"] > 0, s
