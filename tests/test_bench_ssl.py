"""The SSL benchmark's bookkeeping: each arm's overrides, the kNN gate, what a re-run skips, and that
the table's means and paired differences are the ledger's arithmetic."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_ssl as bs


def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, knn: float, knn_random: float) -> list[tuple[str, list[str]]]:
    """The data and the stages replaced by recorders that leave what real runs leave."""
    calls: list[tuple[str, list[str]]] = []
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, 31)]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 9, 9], "area": 81, "iscrowd": 0}
            for i in range(1, 31)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    train.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    val.write_text(train.read_text())
    files = {"train": train, "val": val, "root": tmp_path}
    for name in ("synthetic", "bccd"):
        monkeypatch.setitem(bs.DATASETS, name, dataclasses.replace(bs.DATASETS[name], prepare=lambda out: files))

    def run_stage(stage: str, run_dir: Path, overrides: list[str]) -> Path:
        calls.append((stage, list(overrides)))
        run_dir.mkdir(parents=True, exist_ok=True)
        if stage == "pretrain":
            (run_dir / "backbone.safetensors").write_bytes(b"x")
            metrics = {"knn_top1": knn, "knn_top1_random": knn_random, "global_step": 100}
        else:
            seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
            ap = 0.1 + 0.01 * seed + (0.05 if any(o.startswith("backbone.checkpoint") for o in overrides) else 0)
            metrics = {"coco": {"AP": ap, "AP50": 2 * ap}, "global_step": 30,
                       "history": [{"step": 10, "val_AP": ap / 2}, {"step": 20, "val_AP": ap}]}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return run_dir

    monkeypatch.setattr(bs, "run_stage", run_stage)
    return calls


def test_arms_paired_table_and_resume(monkeypatch, tmp_path):
    calls = fake(monkeypatch, tmp_path, knn=0.5, knn_random=0.3)
    argv = ["--labels", "20", "--seeds", "0", "1", "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "l.json")]
    bs.main(argv)
    finetunes = [o for s, o in calls if s == "finetune"]
    assert [s for s, _ in calls].count("pretrain") == 1 and len(finetunes) == 2 * len(bs.ARMS)
    random = [o for o in finetunes if not any(x.startswith("backbone.checkpoint") for x in o)]
    frozen = [o for o in finetunes if "freeze_backbone=true" in o]
    lpft = [o for o in finetunes if any(x.startswith("linear_probe_steps=") for x in o)]
    assert len(random) == len(frozen) == len(lpft) == 2
    assert all("linear_probe_steps=67" in o for o in lpft)  # a third of the 201 steps at 20 labels
    # 20 of 30 labeled images: a seeded split per seed, the same one in every arm of that seed.
    trains = {x for o in finetunes for x in o if x.startswith("data.train_json=")}
    assert len(trains) == 2 and all("n20_seed" in t for t in trains)
    assert all("trainer.max_epochs=67" in o for o in finetunes)  # 3 steps per epoch: 201 steps
    ledger = json.loads((tmp_path / "l.json").read_text())
    assert ledger["pretrain"]["knn"] == 0.5
    assert ledger["runs"]["ssl/n20/seed1"]["curve"] == [[10, 0.08, None], [20, 0.16, None]]
    text = bs.table(ledger, bs.parse(argv), "cmd")
    # SSL: 15.0 and 16.0 AP against random's 10.0 and 11.0: +5.0 +- 0.0, more than the 0.7 spread.
    row = "| 20 | SSL, fine-tuned | 2 | 15.5 +- 0.7 | 31.0 +- 1.4 | 7.8 +- 0.4 / 15.5 +- 0.7 | +5.0 +- 0.0 (gain) |"
    assert row in text
    assert "| 20 | random init | 2 | 10.5 +- 0.7 |" in text and "0.500 against 0.300" in text
    calls.clear()
    bs.main(argv)  # everything done: nothing runs again
    assert calls == []


def test_the_knn_gate_keeps_a_backbone_no_better_than_random_features_out(monkeypatch, tmp_path):
    calls = fake(monkeypatch, tmp_path, knn=0.33, knn_random=0.30)
    bs.main(["--labels", "100", "--seeds", "0", "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "l.json")])
    finetunes = [o for s, o in calls if s == "finetune"]
    assert len(finetunes) == 1 and not any(x.startswith("backbone.checkpoint") for x in finetunes[0])
    assert f"data.train_json='{tmp_path / 'train.json'}'" in finetunes[0]  # 100 >= 30 labeled: all of them


def test_a_saturated_probe_does_not_gate_and_photos_give_pretraining_their_files(monkeypatch, tmp_path):
    """BCCD's cells are told apart by random features (kNN 0.99): no backbone can clear a 0.05 margin,
    so the gate is not applied and both arms are fine-tuned; the photographs' pretraining reads the
    prepared files, fine-tuning at the dataset's own step budget."""
    calls = fake(monkeypatch, tmp_path, knn=0.97, knn_random=0.99)
    bs.main(["--dataset", "bccd", "--arms", "random", "ssl", "--seeds", "1", "--out", str(tmp_path / "out"),
             "--ledger", str(tmp_path / "l.json")])
    pre = [o for st, o in calls if st == "pretrain"]
    assert len(pre) == 1 and f"data.root='{tmp_path / 'train.json'}'" in pre[0]
    assert f"data.knn_val_json='{tmp_path / 'val.json'}'" in pre[0]
    finetunes = [o for st, o in calls if st == "finetune"]
    assert len(finetunes) == 2 and sum(any(x.startswith("backbone.checkpoint") for x in o) for o in finetunes) == 1
    assert all("trainer.max_epochs=60" in o and "experiment=semi_bench" in o for o in finetunes)  # 300 steps at batch 4
    assert set(bs.load_ledger(tmp_path / "l.json")["runs"]) == {"random/n20/seed1", "ssl/n20/seed1"}
    # the table says what it measured on, and a backbone far below random init is called that
    a = bs.parse(["--dataset", "bccd", "--seeds", "1", "2", "--ledger", str(tmp_path / "l.json")])
    runs = {f"{arm}/n20/seed{s}": {"fingerprint": bs.fingerprint(bs.recipe(arm, 20, s, a)), "AP": ap, "AP50": ap,
                                   "curve": [(1, ap)], "machine": "m"}
            for arm, aps in (("random", (0.40, 0.35)), ("ssl", (0.14, 0.15))) for s, ap in zip((1, 2), aps)}
    text = bs.table({"runs": runs}, a, "cmd")
    assert text.startswith("### BCCD blood-smear photographs: SSL against random init (ledger `l`)")
    assert "on BCCD's 87 validation photographs" in text and "-23.0 +- 4.2 (below random init)" in text


def test_schedule_gives_each_label_count_its_steps():
    assert bs.schedule(100) == ["trainer.max_epochs=30", "trainer.check_val_every_n_epoch=5"]  # 13 steps/epoch
    assert bs.schedule(20)[0] == "trainer.max_epochs=67"
    # The epochs follow the recipe's own batch size: BCCD's photo recipe (batch 4), or a user's override.
    assert bs.schedule(20, bs.parse(["--dataset", "bccd"]))[0] == "trainer.max_epochs=60"  # 300 steps, 5 per epoch
    assert bs.schedule(100, bs.parse(["--finetune", bs.FINETUNE + " data.batch_size=4"]))[0] == "trainer.max_epochs=16"


def test_random_features_knn_probes_the_runs_own_crops(tmp_path):
    """The recomputed random-features reference must use the run's data overrides: BCCD's was once
    measured on the default synthetic crops (0.29 where BCCD's own cells give 0.99)."""
    from PIL import Image

    images, anns = [], []
    for i in range(1, 13):  # one class only: any features give kNN top-1 = 1.0 on these crops
        Image.new("RGB", (48, 48), (10 * i, 200 - 10 * i, 90)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 48, "height": 48})
        anns.append({"id": i, "image_id": i, "category_id": 7, "bbox": [4, 4, 30, 30], "area": 900, "iscrowd": 0})
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cell"}]}))
    data = [f"data.root={tmp_path}", f"data.knn_val_json={val}"]
    assert bs.random_features_knn("method=simclr experiment=smoke", data) == pytest.approx(1.0)
