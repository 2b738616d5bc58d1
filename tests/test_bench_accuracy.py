"""The accuracy benchmark's bookkeeping: which arm gets which ingredient, what a re-run skips, and
that the table's means, paired differences and goal verdicts are the ledger's arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_accuracy as ba


def fake_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Replace the stages by a recorder that leaves the files a real run leaves (metrics.json, backbone)."""
    calls: list[tuple[str, list[str]]] = []
    train = tmp_path / "train.json"
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in range(1, 21)]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 9, 9], "area": 81, "iscrowd": 0}
            for i in range(1, 21)]
    train.write_text(json.dumps({"images": images, "annotations": anns,
                                 "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))

    def run_stage(stage: str, run_dir: Path, overrides: list[str]) -> Path:
        calls.append((stage, overrides))
        run_dir.mkdir(parents=True, exist_ok=True)
        if stage == "pretrain":
            (run_dir / "backbone.safetensors").write_bytes(b"")
        else:
            semi = any(o.startswith("semi.unlabeled=") for o in overrides)
            (run_dir / "metrics.json").write_text(json.dumps({
                "coco": {"AP": 0.1, "AP50": 0.2}, "global_step": 50, "precision": "32",
                "semi": {"pseudo_labels": {"precision": 0.5, "recall": 0.25}} if semi else None,
                "history": [{"val_student_AP": 0.3, "val_student_AP50": 0.6}, {"val_student_AP": None}]
                if semi else [{"val_AP": 0.1}]}))
        return run_dir

    monkeypatch.setattr(ba, "run_stage", run_stage)
    monkeypatch.setitem(ba.DATASETS, "chess", ba.Dataset(lambda out: (train, tmp_path / "val.json"),
                                                         "trainer.max_epochs=3", "trainer.max_epochs=2",
                                                         "semi=unbiased_teacher"))
    return calls


def test_each_arm_gets_its_ingredients_and_a_rerun_skips_what_is_done(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    calls = fake_stages(monkeypatch, tmp_path)
    argv = ["--dataset", "chess", "--seeds", "1", "2", "--out", str(tmp_path / "runs"),
            "--ledger", str(tmp_path / "ledger.json")]
    ba.run(ba.parse(argv))
    pretrains = [c for c in calls if c[0] == "pretrain"]
    assert len(pretrains) == 1  # one SwAV run per dataset, shared by the seeds
    by_arm: dict[str, list[list[str]]] = {}
    for _, quoted in (c for c in calls if c[0] == "finetune"):
        ov = [o.replace("'", "") for o in quoted]  # paths come shell-quoted for Hydra
        arm = "full" if any("train.json" in o for o in ov if o.startswith("data.train_json")) else None
        semi = any(o.startswith("semi.unlabeled=") for o in ov)
        ssl = any(o.startswith("backbone.checkpoint=") for o in ov)
        arm = arm or {(False, False): "random", (True, False): "ssl", (False, True): "random_semi",
                      (True, True): "ssl_semi"}[(ssl, semi)]
        by_arm.setdefault(arm, []).append(ov)
    assert {k: len(v) for k, v in by_arm.items()} == {a: 2 for a in ba.ARMS}
    for ov in by_arm["ssl_semi"]:
        assert "semi=unbiased_teacher" in ov and any(o.endswith("unlabeled.json") for o in ov)
        assert any(o.startswith("data.train_json=") and o.endswith("labeled.json") for o in ov)
    for ov in by_arm["full"]:
        assert f"data.train_json={tmp_path / 'train.json'}" in ov and any("backbone.checkpoint" in o for o in ov)
    # The two labeled-only arms of a seed read the same split, different seeds different ones.
    lab = {o for ov in by_arm["random"] for o in ov if o.startswith("data.train_json=")}
    assert len(lab) == 2 and lab == {o for ov in by_arm["ssl"] for o in ov if o.startswith("data.train_json=")}
    split = json.loads((tmp_path / "runs" / "split_f0.1_seed1" / "labeled.json").read_text())
    assert len(split["images"]) == 2  # 10% of 20

    # Semi runs keep their student's last validation beside the deployed teacher's AP.
    ledger = ba.load_ledger(tmp_path / "ledger.json")["runs"]
    assert ledger["ssl_semi/seed1"]["student_AP"] == 0.3 and ledger["ssl_semi/seed1"]["student_AP50"] == 0.6
    assert ledger["ssl/seed1"]["student_AP"] is None

    calls.clear()
    ba.run(ba.parse(argv))
    assert calls == []  # everything is in the ledger
    ba.run(ba.parse([*argv, "--semi", "semi=unbiased_teacher semi.threshold=0.6"]))
    assert len(calls) == 1 + 4 and calls[0][0] == "pretrain"  # only the semi arms' recipe changed
    assert all("semi.threshold=0.6" in ov for st, ov in calls if st == "finetune")
    # The table shows one recipe: runs of another (--args changed, nothing re-run yet) stay out of it.
    ledger = ba.load_ledger(tmp_path / "ledger.json")
    new_semi = ba.parse([*argv, "--semi", "semi=unbiased_teacher semi.threshold=0.6"])
    assert len(ba.current(ledger, new_semi)["runs"]) == 10
    assert ba.current(ledger, ba.parse([*argv, "--args", "trainer.max_epochs=4"]))["runs"] == {}


def entry(ap50: float, **kw: Any) -> dict[str, Any]:
    return {"fingerprint": "x", "AP": ap50 / 2, "AP50": ap50, "steps": 100, "machine": "m", **kw}


def test_table_means_paired_differences_and_goals() -> None:
    runs = {}
    for s, (r, s_, rs, ss, f) in {1: (0.10, 0.20, 0.12, 0.30, 0.32), 2: (0.12, 0.24, 0.12, 0.30, 0.34),
                                  3: (0.14, 0.22, 0.12, 0.30, 0.30)}.items():
        runs.update({f"random/seed{s}": entry(r), f"ssl/seed{s}": entry(s_),
                     f"random_semi/seed{s}": entry(rs, pseudo_precision=0.8, pseudo_recall=0.4,
                                                   student_AP=0.1 + s / 100, student_AP50=0.2),
                     f"ssl_semi/seed{s}": entry(ss, pseudo_precision=0.9, pseudo_recall=0.5),
                     f"full/seed{s}": entry(f)})
    text = ba.table({"runs": runs}, "chess", [1, 2, 3], 0.1, "CMD", {"fine-tuning": "A"})
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 3 | 6.0 +- 1.0 | 12.0 +- 2.0 |" in rows["random init"]
    assert "+10.0 +- 2.0 vs random init" in rows["SSL (SwAV)"]  # paired: 10, 12, 8
    assert "+8.0 +- 2.0 vs SSL (SwAV)" in rows["SSL + semi"]
    assert "90.0 +- 0.0 / 50.0 +- 0.0" in rows["SSL + semi"]
    assert "93.8% of the 100%-label AP50 (goal >= 90%): met" in text  # 30 / 32
    assert "- SSL (SwAV) beats it by more than the spread: AP50 +10.0" in text
    assert "ahead in 3 of 3 seeds" in text.split("- SSL (SwAV) beats")[1].splitlines()[0]
    # random + semi: +0 on average against a spread of 2: not a win; ahead in seed 1 only (12 > 10).
    assert "- random init + semi does not beat it by more than the spread: AP50 +0.0" in text
    assert "ahead in 1 of 3 seeds" in text.split("- random init + semi")[1].splitlines()[0]
    assert ("random init + semi deploys the EMA teacher (the row above); its student at the last validation: "
            "AP 12.0 +- 1.0 / AP50 20.0 +- 0.0 (3 seeds)") in text
    assert "SSL + semi deploys" not in text  # no student figures in those entries
    assert "CMD" in text and "`A`" in text


def test_missing_arms_show_as_not_measured() -> None:
    text = ba.table({"runs": {"ssl/seed1": entry(0.2), "ssl_semi/seed1": entry(0.25)}}, "chess", [1], 0.1, "C", {})
    assert "| 100% labels (SSL init) | 0 | - |" in text
    assert "not measured yet" in text and "needs 2+ seeds" in text
    assert "| SSL + semi | 1 | 12.5 (1 seed) | 25.0 (1 seed) |" in text


def test_merged_pool_has_unique_ids_and_keeps_each_box_on_its_image(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "a"}]
    a = {"images": [{"id": 1, "file_name": "train/0.png"}, {"id": 2, "file_name": "train/1.png"}],
         "annotations": [{"id": 1, "image_id": 2, "bbox": [0, 0, 1, 1]}], "categories": cats}
    b = {"images": [{"id": 1, "file_name": "unlabeled/0.png"}],
         "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 2, 2]},
                         {"id": 2, "image_id": 1, "bbox": [0, 0, 3, 3]}],
         "categories": cats}
    pool = ba.merge_coco([a, b], tmp_path)
    names = {im["id"]: im["file_name"] for im in pool["images"]}
    assert sorted(names) == [1, 2, 3] and [x["id"] for x in pool["annotations"]] == [1, 2, 3]
    on = {x["id"]: names[x["image_id"]] for x in pool["annotations"]}
    assert on == {1: str(tmp_path / "train/1.png"), 2: str(tmp_path / "unlabeled/0.png"),
                  3: str(tmp_path / "unlabeled/0.png")}


def test_report_only_shows_the_command_that_completes_the_table(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    ba.main(["--dataset", "chess", "--seeds", "1", "--report-only", "--ledger", str(tmp_path / "l.json"),
             "--benchmarks", str(md)])
    command = next(line.strip() for line in md.read_text().splitlines() if "scripts/bench_accuracy.py" in line
                   and line.startswith("    "))
    assert command.startswith("python scripts/bench_accuracy.py --dataset chess --seeds 1 ")
    assert "--report-only" not in command  # the table's command runs what is missing, not the report again
