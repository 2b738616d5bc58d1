"""The semi benchmark's protocol (converge, then continue): which run starts from which, with which LR,
data and semi settings; what a re-run skips; and that the table's paired differences and verdict are
the ledger's arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_semi as bs

# Final-validation AP per arm and seed that the fake runs report.
AP = {"converge": {1: 0.18, 2: 0.20}, "labeled": {1: 0.20, 2: 0.22}, "semi": {1: 0.25, 2: 0.28},
      "control": {1: 0.21, 2: 0.22}, "ceiling": {1: 0.40, 2: 0.42}, "semi:erase": {1: 0.23, 2: 0.27},
      "labeled_time": {1: 0.21, 2: 0.25}, "oracle": {1: 0.30, 2: 0.31}}


def arm_of(ov: list[str]) -> str:
    if any(o.startswith("semi.unsup_weight=0") for o in ov):
        return "control"
    if "semi.strong_view=soft_teacher" in ov:
        return "semi:erase"
    if any(o.startswith("semi.unlabeled=") for o in ov):
        return "semi"
    if any(o.startswith("init_from=") for o in ov):
        if any(o.startswith("data.train_json=") and "split_" not in o for o in ov):
            return "oracle"
        return "labeled_time" if "trainer.max_epochs=600" in ov else "labeled"
    return "ceiling" if any(o.startswith("data.train_json=") and "split_" not in o for o in ov) else "converge"


def write_coco(path: Path, n: int) -> Path:
    from PIL import Image

    for i in range(1, n + 1):
        if not (path.parent / f"{i}.jpg").is_file():
            Image.new("RGB", (64, 64), (i, 2 * i, 3 * i)).save(path.parent / f"{i}.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in range(1, n + 1)]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 9, 9], "area": 81, "iscrowd": 0}
            for i in range(1, n + 1)]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Stages replaced by a recorder that leaves what a real run leaves (metrics.json, best.ckpt)."""
    calls: list[tuple[str, list[str]]] = []

    def run_stage(stage: str, run_dir: Path, overrides: list[str]) -> Path:
        ov = [o.replace("'", "") for o in overrides]  # paths come shell-quoted for Hydra
        calls.append((arm_of(ov), ov))
        seed = int(next(o for o in ov if o.startswith("seed=")).split("=")[1])
        ap = AP[arm_of(ov)].get(seed, 0.2)  # converge:K runs train with seed K
        semi = arm_of(ov) in ("semi", "control", "semi:erase")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "best.ckpt").write_bytes(b"")
        hist = [{"step": 100, "val_AP": ap - 0.02, "val_AP50": 2 * ap}, {"step": 200, "val_AP": ap - 0.01},
                {"step": 300, "val_AP": ap, "val_AP50": 2 * ap, **({"val_student_AP": ap - 0.01} if semi else {})}]
        (run_dir / "metrics.json").write_text(json.dumps({
            "coco": {"AP": ap + 0.01, "AP50": 2 * ap}, "global_step": 300, "train_time_s": 600 if semi else 300,
            "semi": {"pseudo_labels": {"precision": 0.5, "recall": 0.25}} if semi else None, "history": hist,
            # class b gains 3x what class a does over labeled; "absent" has no validation box (-1)
            "per_class_ap": {"a": ap, "b": 3 * ap - 0.4, "absent": -1.0}}))
        return run_dir

    monkeypatch.setattr(bs, "run_stage", run_stage)
    train = write_coco(tmp_path / "train.json", 40)
    val = write_coco(tmp_path / "val.json", 5)
    argv = ["--train", str(train), "--val", str(val), "--name", "toy", "--seeds", "1", "2",
            "--out", str(tmp_path / "runs"), "--ledger", str(tmp_path / "ledger.json")]
    return {"calls": calls, "argv": argv, "tmp": tmp_path}


def test_continuations_start_from_the_converged_detector_at_a_constant_lr(fake: dict[str, Any]) -> None:
    a = bs.parse(fake["argv"])
    bs.run(a)
    calls, tmp = fake["calls"], fake["tmp"]
    by_arm: dict[str, list[list[str]]] = {}
    for arm, ov in calls:
        by_arm.setdefault(arm, []).append(ov)
    assert {k: len(v) for k, v in by_arm.items()} == {arm: 2 for arm in bs.ARMS}
    # The order within a seed: converge before the continuations that start from it.
    assert [arm for arm, _ in calls[:5]] == ["converge", "labeled", "semi", "control", "ceiling"]
    p = a.protocol
    per_epoch = -(-4 // 4)  # 10% of 40 images at the recipe's batch 4
    for arm in ("labeled", "semi", "control"):
        for ov in by_arm[arm]:
            seed = next(o for o in ov if o.startswith("seed="))
            conv = next(d for d in (tmp / "runs" / f"seed{seed[5:]}").iterdir() if d.name.startswith("converge_"))
            assert f"init_from={conv / 'checkpoints' / 'best.ckpt'}" in ov
            assert "scheduler=constant" in ov and "scheduler.warmup_steps=0" in ov
            assert f"optimizer.lr={0.01 * p['continue_lr_factor']:g}" in ov  # semi_bench's SGD LR x the factor
            epochs = int(next(o for o in ov if o.startswith("trainer.max_epochs=")).split("=")[1])
            every = int(next(o for o in ov if o.startswith("trainer.check_val_every_n_epoch=")).split("=")[1])
            assert epochs * per_epoch == p["continue_steps"] and epochs % every == 0  # the last validation at the end
            assert any(o.startswith("data.train_json=") and o.endswith("labeled.json") for o in ov)
    for ov in by_arm["semi"] + by_arm["control"]:
        assert p["semi"] in ov and any(o.startswith("semi.unlabeled=") and o.endswith("unlabeled.json") for o in ov)
    assert all("semi.unsup_weight=0" not in ov for ov in by_arm["semi"])
    assert all(not any(o.startswith("semi") for o in ov) for ov in by_arm["labeled"])
    for ov in by_arm["ceiling"]:  # every training image, as many steps as converge + continue
        full = tmp / "runs" / "data" / f"train_{p['working_size']}" / "train.json"  # the working-size copy
        assert f"data.train_json={full}" in ov
        assert f"trainer.max_epochs={round((per_epoch * p['converge_epochs'] + p['continue_steps']) / 10)}" in ov
    # A seed's arms share one split, the seeds differ.
    lab = {o for ov in by_arm["labeled"] + by_arm["converge"] for o in ov if o.startswith("data.train_json=")}
    assert len(lab) == 2

    ledger = bs.load_ledger(tmp / "ledger.json")["runs"]
    assert ledger["semi/seed1"]["AP"] == 0.25 and ledger["semi/seed1"]["student_AP"] == pytest.approx(0.24)
    assert ledger["semi/seed1"]["best_AP"] == pytest.approx(0.26) and ledger["semi/seed1"]["s_per_step"] == 2.0
    calls.clear()
    bs.run(bs.parse(fake["argv"]))
    assert calls == []  # everything is in the ledger
    bs.run(bs.parse([*fake["argv"], "--args", "detector.min_size=256"]))
    assert len(calls) == 10 and all("detector.min_size=256" in ov for _, ov in calls)  # a new recipe re-runs all


def test_table_pairs_every_arm_with_labeled_only_continued(fake: dict[str, Any]) -> None:
    a = bs.parse(fake["argv"])
    text = bs.table(bs.run(a), a, "python scripts/bench_semi.py X")
    # semi - labeled: +5 and +6 AP -> +5.5 +- 0.7; spreads: semi 2.1, labeled 1.4
    assert "| semi | 2 | 26.5 +- 2.1 | 53.0 +- 4.2 | 25.5 +- 2.1 | 5.5 +- 0.7 | 50.0 / 25.0 | 2.00 |" in text
    assert "| labeled | 2 | 21.0 +- 1.4 |" in text and "| ceiling | 2 | 41.0 +- 1.4 |" in text
    assert ("Teacher-student training beats labeled-only continued: +5.5 +- 0.7 AP (paired, 2 seeds, ahead in 2; "
            "spread 2.1).") in text
    # control - labeled: +1 and 0 -> +0.5 +- 0.7, inside both its paired std and the spread (1.4)
    assert ("The control (EMA teacher, no unlabeled loss) is within the spread of labeled-only continued: "
            "+0.5 +- 0.7 AP") in text
    # semi - control on each seed: +4 and +6
    assert "What the unlabeled images add beyond the control: +5.0 +- 1.4 AP (paired, 2 seeds)." in text
    # labeled ends at 20/22, the converged runs' best validations were 19/21 (their AP + 0.01)
    assert "Labeled-only continued ends +1.0 AP from the checkpoint it started at" in text
    assert "python scripts/bench_semi.py X" in text and "no semi method can show a gain" not in text
    # per class: the best semi arm (semi, +5.5) beside the control (the oracle is opt-in), paired with
    # labeled (a: 20/22 -> mean 21.0; b: 3 x AP - 40 -> 20/26 -> 23.0); semi a: +5/+6, b: +15/+18
    assert "| class | labeled | control | semi |" in text
    assert "| a | 21.0 | +0.5 | +5.5 |" in text and "| b | 23.0 | +1.5 | +16.5 |" in text
    assert "| absent |" not in text
    md = fake["tmp"] / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Speed\n\nspeed figures\n")
    for body in (text, text.replace("X", "Y")):  # a re-run replaces its own section
        bs.put_section(md, body, "semi_continue", a.name, "## Teacher-student", bs.SEMI_HEAD)
    out = md.read_text()
    assert "speed figures" in out and out.count("### toy") == 1 and "bench_semi.py Y" in out


def test_unlabeled_folder_drops_the_ceiling_and_bad_paths_fail_clearly(fake: dict[str, Any]) -> None:
    tmp = fake["tmp"]
    (tmp / "photos").mkdir()
    a = bs.parse([*fake["argv"], "--unlabeled", str(tmp / "photos")])
    assert "ceiling" not in a.arms and bs.split_of(1, a) == {"labeled": a.train, "unlabeled": tmp / "photos"}
    with pytest.raises(SystemExit):
        bs.parse(["--train", str(tmp / "nope.json"), "--val", str(tmp / "val.json")])
    with pytest.raises(SystemExit):
        bs.parse(["--seeds", "1"])  # neither --dataset nor --train/--val


def test_resized_copy_keeps_boxes_on_their_objects(tmp_path: Path) -> None:
    """A 400x200 photograph with a white square at (100..160, 40..100): at long side 100 the copy is
    100x50 and the box, scaled by the same factor, still frames the square."""
    from PIL import Image

    from finetune.data.resize import resize_coco

    img = Image.new("RGB", (400, 200))
    img.paste((255, 255, 255), (100, 40, 160, 100))
    (tmp_path / "src").mkdir()
    img.save(tmp_path / "src" / "a.jpg", quality=98)
    coco = {"images": [{"id": 7, "file_name": "a.jpg", "width": 400, "height": 200}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [100, 40, 60, 60], "area": 3600,
                             "iscrowd": 0, "segmentation": [[100, 40, 160, 40, 160, 100]]}],
            "categories": [{"id": 1, "name": "square"}]}
    (tmp_path / "src" / "train.json").write_text(json.dumps(coco))
    out = resize_coco(tmp_path / "src" / "train.json", tmp_path / "small", 100)
    small = json.loads(out.read_text())
    im = small["images"][0]
    assert (im["width"], im["height"]) == (100, 50)
    ann = small["annotations"][0]
    assert ann["bbox"] == pytest.approx([25, 10, 15, 15]) and ann["area"] == pytest.approx(225)
    assert ann["segmentation"] == [pytest.approx([25, 10, 40, 10, 40, 25])]
    with Image.open(out.parent / im["file_name"]) as copy:
        assert copy.size == (100, 50)
        px = copy.convert("L").load()
        assert px[32, 17] > 200 and px[10, 40] < 50  # inside the scaled box white, outside black
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        resize_coco(tmp_path / "src" / "train.json", tmp_path / "other", 100, image_root=tmp_path / "nowhere")


def test_a_variant_is_one_more_semi_arm_and_reuses_the_recorded_runs(fake: dict[str, Any],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bs.run(bs.parse(fake["argv"]))
    calls = fake["calls"]
    calls.clear()
    a = bs.parse([*fake["argv"], "--variant", "erase=semi.strong_view=soft_teacher"])
    assert a.arms == [*bs.ARMS, "semi:erase"]
    bs.run(a)
    # only the new arm runs: the converged detector, the other arms and their fingerprints are reused
    assert [arm for arm, _ in calls] == ["semi:erase", "semi:erase"]
    for _, ov in calls:
        assert a.protocol["semi"] in ov and ov.index("semi.strong_view=soft_teacher") > ov.index(a.protocol["semi"])
        assert any(o.startswith("init_from=") and "converge_" in o for o in ov)
        assert "scheduler=constant" in ov and any(o.startswith("semi.unlabeled=") for o in ov)
    assert all(d.name.startswith("semi-erase_") for d in (fake["tmp"] / "runs" / "seed1").iterdir()
               if "erase" in d.name)
    text = bs.table(bs.load_ledger(fake["tmp"] / "ledger.json"), a, "cmd")
    # semi:erase - labeled: +3 and +5 -> +4.0 +- 1.4, right after the semi row
    assert "| semi | 2 |" in text and "| semi:erase | 2 | 25.0 +- 2.8 |" in text
    arms_table = text.split("\n\n")[1]  # the per-class table further down has rows of its own
    rows = [line.split(" | ")[0] for line in arms_table.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert rows == ["| converge", "| labeled", "| semi", "| semi:erase", "| control", "| ceiling"]
    assert "Teacher-student training with `semi:erase` beats labeled-only continued: +4.0 +- 1.4 AP" in text
    assert "What the unlabeled images add beyond the control (`semi:erase`): +3.5 +- 2.1 AP (paired, 2 seeds)." in text
    assert "`semi:erase` adds `semi.strong_view=soft_teacher`" in text
    assert "`semi:erase` against `semi` on the same seeds: -1.5 +- 0.7 AP (paired, 2 seeds)." in text
    # the ledger keeps the variant: a report without --variant still has its row
    assert bs.load_ledger(fake["tmp"] / "ledger.json")["variants"] == {"erase": "semi.strong_view=soft_teacher"}
    assert bs.parse([*fake["argv"], "--arms", "semi:erase"]).arms == ["semi:erase"]  # known from the ledger
    capsys.readouterr()
    bs.main([*fake["argv"], "--report-only"])
    assert "| semi:erase | 2 | 25.0 +- 2.8 |" in capsys.readouterr().out
    # a variant named but never run has no row, and the protocol line does not list it
    bs.main([*fake["argv"], "--report-only", "--variant", "later=semi.threshold=0.8"])
    out = capsys.readouterr().out
    assert "`semi:erase` adds" in out and "semi:later" not in out
    with pytest.raises(SystemExit):
        bs.parse([*fake["argv"], "--variant", "erase=semi.x=1", "--variant", "erase=semi.x=2"])
    for bad in ("erase", "=semi.x=1", "er ase=semi.x=1", "erase= "):
        with pytest.raises(SystemExit):
            bs.parse([*fake["argv"], "--variant", bad])
    with pytest.raises(SystemExit):
        bs.parse([*fake["argv"], "--arms", "semi:nope"])


def test_extra_teachers_variant_runs_the_other_seed_detectors_on_the_same_split(fake: dict[str, Any]) -> None:
    """CONVERGE_K in a variant: each split seed's converged run with training seed K runs first, on that
    split's labeled images, and the token becomes its run dir; the ledger and the table keep them."""
    a = bs.parse([*fake["argv"], "--seeds", "1", "--arms", "converge", "semi:ens",
                  "--variant", "ens=semi.extra_teachers=[CONVERGE_101,CONVERGE_102]"])
    bs.run(a)
    calls, runs = fake["calls"], fake["tmp"] / "runs" / "seed1"
    seeds = [next(o for o in ov if o.startswith("seed=")) for _, ov in calls]
    assert seeds == ["seed=1", "seed=101", "seed=102", "seed=1"]  # the teachers before the arm naming them
    labeled = {o for _, ov in calls for o in ov if o.startswith("data.train_json=")}
    assert len(labeled) == 1 and next(iter(labeled)).endswith("split_f0.1_seed1/labeled.json")
    assert not any(o.startswith("init_from=") for _, ov in calls[1:3] for o in ov)
    dirs = [next(d for d in runs.iterdir() if d.name.startswith(f"converge-{k}_")) for k in (101, 102)]
    assert f"semi.extra_teachers=[{dirs[0]},{dirs[1]}]" in calls[3][1]
    ledger = bs.load_ledger(fake["tmp"] / "ledger.json")["runs"]
    assert {"converge:101/seed1", "converge:102/seed1", "semi:ens/seed1"} <= set(ledger)
    assert ledger["semi:ens/seed1"]["fingerprint"] != bs.fingerprint(bs.recipe("semi", 1, a))
    rows = [line.split(" | ")[0] for line in bs.table(bs.load_ledger(fake["tmp"] / "ledger.json"), a, "cmd")
            .split("\n\n")[1].splitlines() if line.startswith("| ") and "seeds" not in line]
    assert rows[:3] == ["| converge", "| converge:101", "| converge:102"]
    calls.clear()
    bs.run(a)
    assert calls == []  # all in the ledger
    # Another teacher seed is another recipe for the arm: it re-runs, after its new detector.
    b = bs.parse([*fake["argv"], "--seeds", "1", "--arms", "semi:ens", "--variant",
                  "ens=semi.extra_teachers=[CONVERGE_101,CONVERGE_103]"])
    bs.run(b)
    assert [next(o for o in ov if o.startswith("seed=")) for _, ov in calls] == ["seed=103", "seed=1"]


def test_an_option_added_at_its_neutral_value_keeps_old_fingerprints() -> None:
    from omegaconf import OmegaConf

    settings = ("experiment=semi_bench", "semi=bench")
    config = OmegaConf.to_container(bs.finetune_config(settings), resolve=False)
    assert set(bs.ADDED_SETTINGS) == {"semi.strong_view", "semi.rpn_threshold", "semi.soft_classes",
                                      "semi.strong_scale", "semi.teacher_flip", "semi.extra_teachers"}
    for dotted, neutral in bs.ADDED_SETTINGS.items():
        group, leaf = dotted.split(".")
        assert config[group][leaf] == neutral
        del config[group][leaf]  # the config as it was before the option existed
    assert bs.config_hash(settings) == bs.fingerprint(config)
    assert bs.config_hash((*settings, "semi.strong_view=soft_teacher")) != bs.config_hash(settings)
    assert bs.config_hash((*settings, "semi.rpn_threshold=0.3")) != bs.config_hash(settings)
    assert bs.config_hash((*settings, "semi.soft_classes=all")) != bs.config_hash(settings)
    assert bs.config_hash((*settings, "semi.strong_scale=[0.5,1.5]")) != bs.config_hash(settings)
    assert bs.config_hash((*settings, "semi.teacher_flip=true")) != bs.config_hash(settings)
    assert bs.config_hash((*settings, "semi.extra_teachers=[a]")) != bs.config_hash(settings)


def test_a_conf_change_under_a_running_benchmark_stops_it_before_the_next_run(
        fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    from omegaconf import OmegaConf

    request.addfinalizer(bs.config_hash.cache_clear)  # the other tests compose the real conf/

    compose, record = bs.finetune_config, fake["calls"]
    changed: dict[str, Any] = {}

    def finetune_config(settings: Any) -> Any:  # conf/ as it reads once the first run has started
        cfg = compose(settings)
        if changed:
            OmegaConf.set_struct(cfg, False)
            cfg.semi.update(changed)
        return cfg

    def edit_conf_during_first_run(stage: str, run_dir: Path, overrides: list[str]) -> Path:
        changed.update(late_option=value)  # a user edits conf/ while the benchmark trains
        return run_stage(stage, run_dir, overrides)

    monkeypatch.setattr(bs, "finetune_config", finetune_config)
    run_stage = bs.run_stage
    monkeypatch.setattr(bs, "run_stage", edit_conf_during_first_run)
    a = bs.parse([*fake["argv"], "--seeds", "1"])
    value = 3  # a new option at a value that changes what the runs do: the next run must not start
    with pytest.raises(SystemExit, match="labeled: conf/ changed since this benchmark process started"):
        bs.run(a)
    assert [arm for arm, _ in record] == ["converge"]  # the converged run finished and is in the ledger
    assert list(bs.load_ledger(a.ledger)["runs"]) == ["converge/seed1"]
    # Declared neutral (the value that behaves as before), the option changes no fingerprint: a new
    # process over the edited conf/ goes on where the first stopped.
    monkeypatch.setitem(bs.ADDED_SETTINGS, "semi.late_option", 3)
    bs.config_hash.cache_clear()
    bs.run(bs.parse([*fake["argv"], "--seeds", "1"]))
    assert [arm for arm, _ in record] == ["converge", "labeled", "semi", "control", "ceiling"]


def test_labeled_time_is_opt_in_and_runs_the_semi_arms_compute(fake: dict[str, Any]) -> None:
    bs.run(bs.parse(fake["argv"]))
    assert "labeled_time" not in {arm for arm, _ in fake["calls"]}  # not a default arm
    fake["calls"].clear()
    a = bs.parse([*fake["argv"], "--arms", "labeled_time"])
    bs.run(a)
    assert [arm for arm, _ in fake["calls"]] == ["labeled_time", "labeled_time"]
    for _, ov in fake["calls"]:  # 1 step per epoch on 4 labeled images at batch 4: 2 x 300 steps
        assert "trainer.max_epochs=600" in ov and any(o.startswith("init_from=") for o in ov)
        assert "scheduler=constant" in ov and not any(o.startswith("semi") for o in ov)
    text = bs.table(bs.load_ledger(fake["tmp"] / "ledger.json"), a, "cmd")
    arms_table = text.split("\n\n")[1]  # the per-class table further down has rows of its own
    rows = [line.split(" | ")[0] for line in arms_table.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert rows == ["| converge", "| labeled", "| labeled_time", "| semi", "| control", "| ceiling"]
    # semi - labeled_time: +4 and +3
    # the steps as run (the fake runs report 300), not as asked
    assert "`semi` against labeled-only continued for 300 steps (equal wall time): +3.5 +- 0.7 AP" in text


def test_oracle_continues_on_every_true_label_and_tells_budget_from_pseudo_labels(fake: dict[str, Any]) -> None:
    bs.run(bs.parse(fake["argv"]))
    assert "oracle" not in {arm for arm, _ in fake["calls"]}  # opt-in
    tmp = fake["tmp"]
    fake["calls"].clear()
    a = bs.parse([*fake["argv"], "--arms", "oracle"])
    bs.run(a)
    assert [arm for arm, _ in fake["calls"]] == ["oracle", "oracle"]
    full = tmp / "runs" / "data" / f"train_{a.protocol['working_size']}" / "train.json"
    for _, ov in fake["calls"]:
        seed = next(o for o in ov if o.startswith("seed="))[5:]
        conv = next(d for d in (tmp / "runs" / f"seed{seed}").iterdir() if d.name.startswith("converge_"))
        assert f"init_from={conv / 'checkpoints' / 'best.ckpt'}" in ov  # the continuation's start
        assert f"data.train_json={full}" in ov  # every training image, its true labels
        assert "scheduler=constant" in ov and f"optimizer.lr={0.01 * a.protocol['continue_lr_factor']:g}" in ov
        assert "trainer.max_epochs=30" in ov  # 40 images at batch 4: 10 steps an epoch, the continuation's 300
        assert not any(o.startswith("semi") for o in ov)
    ledger = bs.load_ledger(tmp / "ledger.json")
    text = bs.table(ledger, a, "cmd")
    assert "| oracle | 2 | 30.5 +- 0.7 |" in text
    assert ("The oracle (the continuation on every image's true labels) beats labeled-only continued: "
            "+9.5 +- 0.7 AP") in text
    assert "the budget, not the pseudo-labels" not in text
    for s, ap in ((1, 0.205), (2, 0.22)):  # perfect labels adding nothing: the continuation's budget is the limit
        ledger["runs"][f"oracle/seed{s}"]["AP"] = ap
    assert "the budget, not the pseudo-labels, limits every semi arm" in bs.table(ledger, a, "cmd")


def test_a_split_is_drawn_again_when_its_pool_changed(tmp_path: Path) -> None:
    """A split cached from the full-size photographs is drawn again from the working-size copies (the
    same seed, so the same images): training must read the images the protocol says it does."""
    import argparse

    full, copies = tmp_path / "full", tmp_path / "copies"
    full.mkdir()
    copies.mkdir()
    a = argparse.Namespace(unlabeled=None, out=tmp_path / "out", protocol={"fraction": 0.5},
                           train=write_coco(full / "train.json", 6))
    first = bs.split_of(1, a)
    names = sorted(im["file_name"] for im in json.loads(first["labeled"].read_text())["images"])
    assert all("full" in Path(n).parts or n.startswith("../") for n in names)
    a.train = write_coco(copies / "train.json", 6)
    again = bs.split_of(1, a)
    redrawn = json.loads(again["labeled"].read_text())["images"]
    assert again == first and all("copies" in str(Path(again["labeled"]).parent / im["file_name"]) for im in redrawn)
    assert sorted(Path(im["file_name"]).name for im in redrawn) == sorted(Path(n).name for n in names)
    assert (again["labeled"].parent / "source.txt").read_text() == str(a.train)


def test_two_benchmarks_resizing_one_set_at_once_both_get_it(tmp_path: Path) -> None:
    """Two benchmark processes started together make the same working-size copies: each writes its own
    temporary files (a shared name let one process's rename take the other's file away: chess, seeds
    1 and 2 started at once) and the JSON appears whole."""
    import subprocess
    import textwrap

    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(1, 41):
        Image.new("RGB", (640, 480), (i, 2 * i, 3 * i)).save(src / f"{i}.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, 41)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 100, 80], "area": 8000, "iscrowd": 0}
            for i in range(1, 41)]
    (src / "train.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": [{"id": 1, "name": "a"}]}))
    code = textwrap.dedent(f"""
        from finetune.data.resize import resize_coco
        resize_coco({str(src / 'train.json')!r}, {str(tmp_path / 'out')!r}, 320)
    """)
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=repo, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    out = json.loads((tmp_path / "out" / "train.json").read_text())
    assert len(out["images"]) == 40 and not list((tmp_path / "out").rglob("*.tmp"))


def test_reproduce_trains_one_ledger_run_again_and_weighs_it_against_the_spread(fake: dict[str, Any]) -> None:
    tmp, calls = fake["tmp"], fake["calls"]
    with pytest.raises(SystemExit, match="has no run of it"):  # nothing recorded yet
        bs.reproduce("semi/seed1", bs.parse(fake["argv"]))
    bs.run(bs.parse(fake["argv"]))
    original = next(ov for arm, ov in calls if arm == "semi" and "seed=1" in ov)
    calls.clear()
    AP["semi"][1] = 0.26  # the run again ends 1 AP above the recorded 0.25; semi's std over seeds 2.1
    try:
        bs.main([*fake["argv"], "--reproduce", "semi/seed1"])
    finally:
        AP["semi"][1] = 0.25
    assert [arm for arm, _ in calls] == ["semi"]  # that run alone, with the recorded run's overrides
    assert calls[0][1] == original
    again = [d.name for d in (tmp / "runs" / "seed1" / "reproduce").iterdir() if (d / "metrics.json").is_file()]
    assert again == [f"semi_{bs.fingerprint(bs.recipe('semi', 1, bs.parse(fake['argv'])))}"]  # its own directory
    ledger = bs.load_ledger(tmp / "ledger.json")
    assert ledger["runs"]["semi/seed1"]["AP"] == 0.25  # the recorded run stays as it was
    assert ledger["reproduced"]["semi/seed1"]["AP"] == 0.26
    a = bs.parse(fake["argv"])
    text = bs.table(ledger, a, "x")
    assert ("Reproduced: `semi/seed1` continued again from the same converged checkpoint ends at AP 26.0 against the "
            "ledger's 25.0 (+1.0, its validation curve differs), within the arm's std over 2 seeds (2.1)") in text
    assert "--reproduce" not in text.split("Command: ")[1]  # the table names the command that made the ledger
    calls.clear()
    (tmp / "ledger.json").write_text(json.dumps({**ledger, "reproduced": {"semi/seed1": {
        **ledger["reproduced"]["semi/seed1"], "date": "2000-01-01"}}}))
    bs.main([*fake["argv"], "--reproduce=semi/seed1"])
    assert calls == []  # a finished reproduction is read, not run again, nor stamped with today's date
    assert bs.load_ledger(tmp / "ledger.json")["reproduced"]["semi/seed1"]["date"] == "2000-01-01"
    ledger["reproduced"]["semi/seed1"]["AP"] = 0.30  # 5 AP off: outside the std
    assert "(+5.0, its validation curve differs), outside the arm's std" in bs.table(ledger, a, "x")
    ledger["reproduced"]["semi/seed1"] = ledger["runs"]["semi/seed1"]  # bit for bit the same run
    assert "(+0.0, its validation curve identical), within" in bs.table(ledger, a, "x")
    # a changed recipe orphans the reproduction: no sentence, and no reproduction before a new run
    b = bs.parse([*fake["argv"], "--args", "detector.min_size=256"])
    assert "Reproduced" not in bs.table(ledger, b, "x")
    with pytest.raises(SystemExit, match="has no run of it"):
        bs.reproduce("semi/seed1", b)
    with pytest.raises(SystemExit):
        bs.parse([*fake["argv"], "--reproduce", "semi/seed1", "--report-only"])
    with pytest.raises(SystemExit, match="ARM/seedN"):
        bs.reproduce("semi", a)
    with pytest.raises(SystemExit, match="not one of"):
        bs.reproduce("nonsense/seed1", a)


def test_per_class_table_picks_the_best_arm_paired_on_two_seeds() -> None:
    """A one-seed arm's lucky pair does not take the per-class table from an arm measured twice."""
    def run(a: float, b: float) -> dict[str, Any]:
        return {"AP": (a + b) / 2, "per_class_AP": {"a": a, "b": b}}

    runs = {"labeled": {1: run(0.2, 0.4), 2: run(0.3, 0.5)},
            "semi": {1: run(0.25, 0.4), 2: run(0.35, 0.5)},        # +5 AP on class a, twice
            "semi:lucky": {1: run(0.2, 0.6)}}                     # +20 on class b, once
    diffs = {"semi": [0.025, 0.025], "semi:lucky": [0.1]}
    lines = bs.per_class_table(runs, diffs)
    assert "| class | labeled | semi |" in lines
    assert "| a | 25.0 | +5.0 |" in lines and "| b | 45.0 | +0.0 |" in lines
    assert bs.per_class_table(runs, {"semi:lucky": [0.1]})[-1] == "| b | 40.0 | +20.0 |"
    assert bs.per_class_table({**runs, "labeled": {1: {"AP": 0.3}}}, diffs) == []  # no per-class figures
    assert not any("named right" in line for line in lines)  # no confusion matrices recorded


def test_named_right_row_from_the_runs_confusion_matrices() -> None:
    """The table's last row: the share of boxed objects named right, paired over the seeds that have it."""
    def run(a: float, right: int, wrong: int, missed: int) -> dict[str, Any]:
        # two classes; class x: `right` boxed as x, `wrong` boxed as y, `missed`; class y: 10 boxed as y
        matrix = [[right, wrong, missed], [0, 10, 0], [3, 1, 0]]
        return {"AP": a, "per_class_AP": {"x": a, "y": a}, "confusion": {"classes": ["x", "y"], "matrix": matrix}}

    assert bs.named_right(run(0.3, 6, 4, 5)["confusion"]) == pytest.approx(16 / 20)  # misses and background aside
    assert bs.named_right({"classes": ["x"], "matrix": [[0, 3], [2, 0]]}) is None
    runs = {"labeled": {1: run(0.3, 6, 4, 5), 2: run(0.3, 10, 10, 0)},          # 16/20, 20/30
            "semi": {1: run(0.35, 9, 1, 5), 2: run(0.35, 16, 4, 0)},           # 19/20, 26/30
            "control": {1: run(0.3, 6, 4, 5), 2: {"AP": 0.3, "per_class_AP": {"x": 0.3, "y": 0.3}}}}
    lines = bs.per_class_table(runs, {"semi": [0.05, 0.05]})
    row = next(line for line in lines if line.startswith("| *named right*"))
    assert row == f"| *named right* | {100 * (16 / 20 + 20 / 30) / 2:.1f} (2) | +0.0 (1) | +17.5 (2) |"


def test_verdict_tells_a_paired_gain_inside_the_splits_spread_from_noise() -> None:
    # chess_long's shape: every seed ahead (+0.9, +2.5, +3.0: +2.1 +- 1.1) while the splits differ by 4.5 AP
    diffs = {"semi:x": [0.009, 0.025, 0.030], "control": [0.000, 0.010, -0.012]}
    spread = {"semi:x": 0.045, "control": 0.045}
    text = bs.verdict(diffs, spread, vs_control={"semi:x": [0.009, 0.015, 0.042]})
    assert ("Teacher-student training with `semi:x` is ahead of labeled-only continued: +2.1 +- 1.1 AP (paired, "
            "3 seeds, ahead in 3; beyond its paired std, within the splits' spread 4.5).") in text
    # the control's mean (-0.1) is inside its paired std (1.1): no claim either way
    assert "The control (EMA teacher, no unlabeled loss) is within the spread of labeled-only continued: -0.1" in text
    assert "What the unlabeled images add beyond the control (`semi:x`): +2.2 +- 1.8 AP (paired, 3 seeds)." in text
    # one of three seeds behind is not "ahead" below 5 seeds, however large the mean
    text = bs.verdict({"semi": [0.03, 0.03, -0.001]}, {"semi": 0.05})
    assert "is within the spread of labeled-only continued: +2.0 +- 1.8 AP (paired, 3 seeds, ahead in 2" in text
    # from 5 seeds on, one seed the other way is allowed
    text = bs.verdict({"semi": [0.03, 0.03, 0.02, 0.025, -0.001]}, {"semi": 0.05})
    assert "is ahead of labeled-only continued: +2.1 +- 1.3 AP (paired, 5 seeds, ahead in 4; beyond its" in text
    # a mean the table prints as 0.0 is level, however small its std
    assert "is within the spread of" in bs.verdict({"semi": [0.0004, 0.0003, 0.0005]}, {"semi": 0.01})
    # beyond the splits' spread it beats when every seed agrees; a mean carried by one seed does not
    assert "beats labeled-only continued" in bs.verdict({"semi": [0.05, 0.06]}, {"semi": 0.02})
    text = bs.verdict({"semi": [0.30, -0.01, -0.01]}, {"semi": 0.05})
    assert ("is above labeled-only continued: +9.3 +- 17.9 AP (paired, 3 seeds, ahead in 1; not every seed agrees; "
            "spread 5.0)") in text
    assert "falls below labeled-only continued: -3.0 +- 0.0 AP (paired, 2 seeds, behind in 2" in bs.verdict(
        {"semi": [-0.03, -0.03]}, {"semi": 0.01})
