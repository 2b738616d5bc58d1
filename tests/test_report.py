"""The report collects fine-tuning runs into one table, mean ± std and plots."""

import csv
import json

import pytest

from finetune.report import load_rows, summarise, write_report


def _run(root, name, ap, method="swav", epochs=1, prototypes=10, checkpoint="x/backbone.safetensors"):
    d = root / name
    d.mkdir(parents=True)
    coco = {"AP": ap, "AP50": ap + 0.2, "AP75": ap, "APs": -1.0, "APm": ap, "APl": ap}
    bb = {"checkpoint": checkpoint, "arch": "resnet18", "method": method, "epochs": epochs,
          "num_prototypes": prototypes}
    (d / "metrics.json").write_text(json.dumps({"stage": "finetune", "detector": "fasterrcnn",
                                                "coco": coco, "backbone": bb}))


def test_rows_summary_and_files(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "0/finetune", 0.30, epochs=1, prototypes=10)
    _run(root, "1/finetune", 0.40, epochs=2, prototypes=10)
    _run(root, "2/finetune", 0.20, epochs=1, prototypes=20)
    _run(root, "3/finetune", 0.24, epochs=1, prototypes=20)  # same setting as 2: a second seed
    _run(root, "base", 0.10, checkpoint=None)
    (root / "0" / "metrics.json").write_text(json.dumps({"stage": "pretrain", "final_loss": 1.0}))

    rows = load_rows(root)
    assert len(rows) == 5  # the pretrain metrics.json is not a row
    base = next(r for r in rows if r["run"] == "base")
    assert base["method"] == "random init" and base["epochs"] is None
    assert all(r["APs"] is None for r in rows)  # COCO's -1 (no such objects) is not a score

    summary = summarise(rows)
    pair = next(s for s in summary if s["prototypes"] == 20)
    assert pair["n"] == 2
    assert pair["AP"] == pytest.approx(0.22)
    assert pair["AP_std"] == pytest.approx(0.0282843, rel=1e-4)

    files = write_report(root, tmp_path / "out")
    md = files["md"].read_text()
    assert md.count("| resnet18 |") == 5 + 4  # five runs, four settings in the mean ± std table
    assert "22.0 ± 2.8" in md
    with files["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == 5
    for kind in ("epochs", "prototypes"):
        assert files[kind].stat().st_size > 1000


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fine-tuning metrics.json"):
        write_report(tmp_path)


def test_compare_is_the_coco_table_with_a_difference_row():
    from finetune.coco_results import format_table
    from finetune.report import compare

    runs = {"ssl": {"coco": {"AP": 0.25, "AP50": 0.5}}, "random": {"coco": {"AP": 0.2, "AP50": -1.0}}}
    text = compare(runs, keys=("AP", "AP50"))
    rows = [line.split() for line in text.splitlines()]
    assert rows[1] == ["ssl", "25.0", "50.0"] and rows[2] == ["random", "20.0", "-"]
    assert rows[3] == ["difference", "+5.0", "-"]
    # One table writer: the single-run summary is the same function without names.
    assert format_table({"AP": 0.25, "AP50": 0.5}, keys=("AP", "AP50")).splitlines()[1].split() == ["25.0", "50.0"]


def test_semi_runs_carry_their_mode_threshold_fraction_and_pseudo_label_health(tmp_path):
    root = tmp_path / "bench"
    for seed, (ap_base, ap_semi) in enumerate([(0.10, 0.14), (0.12, 0.18)]):
        for frac in (0.1, 0.5):
            _run(root, f"f{frac}/s{seed}/base", ap_base + frac / 5)
            _run(root, f"f{frac}/s{seed}/semi", ap_semi + frac / 5)
            for arm in ("base", "semi"):
                path = root / f"f{frac}/s{seed}/{arm}/metrics.json"
                m = json.loads(path.read_text())
                m.update(labeled_fraction=frac, split_seed=seed)
                if arm == "semi":
                    m["semi"] = {"mode": "unbiased_teacher", "settings": {"threshold": "gmm", "unsup_weight": 4.0},
                                 "pseudo_labels": {"precision": 0.8, "recall": 0.25}}
                path.write_text(json.dumps(m))
    rows = load_rows(root)
    semi = [r for r in rows if r["semi"] == "unbiased_teacher"]
    assert len(semi) == 4 and all(r["threshold"] == "gmm" and r["unsup_weight"] == 4.0 for r in semi)
    assert all(r["semi"] == "none" and r["threshold"] is None and r["pseudo_P"] is None for r in rows if r not in semi)
    summary = summarise(rows)
    assert len(summary) == 4  # {base, semi} x {10%, 50%}; the two split seeds averaged
    s = next(s for s in summary if s["semi"] == "unbiased_teacher" and s["labeled"] == 0.1)
    assert s["n"] == 2 and s["AP"] == pytest.approx(0.18)
    files = write_report(root, tmp_path / "out")
    md = files["md"].read_text()
    assert "| unbiased_teacher | gmm | 4 | 10.0 |" in md and "| 80.0 | 25.0 |" in md
    assert files["labeled"].stat().st_size > 1000  # AP against the labeled fraction
