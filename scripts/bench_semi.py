"""Labeled-only against semi-supervised at the same number of steps, over splitter seeds.

    python scripts/bench_semi.py --dataset chess --fraction 0.1 --seeds 1 2 3 \\
        --args "detector.min_size=320 detector.max_size=480 trainer.max_epochs=24" --semi "semi=unbiased_teacher"
    python scripts/bench_semi.py --dataset synthetic --seeds 0 1 2 --args "experiment=demo"

For each seed: the splitter draws the labeled fraction of the training set (``labeled.json``;
the rest is ``unlabeled.json`` with hidden ground truth), then two fine-tuning runs read the same
``labeled.json`` and validation set with the same overrides and ``trainer.max_epochs``: the
labeled-only baseline and the semi run (its burn-in counts within those epochs, so both take the
same optimizer steps). The synthetic set is already split (train / unlabeled) and varies the
training seed instead. Every run is resumable and skipped when done, so the benchmark can be
finished over several sittings. Writes ``<out>/bench_semi.json`` and prints a markdown table of
AP and AP50 as mean +- std over the seeds, with the pseudo-label precision/recall.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench_common import describe, machine_info, mean_std, put_section

from finetune.data.split import split_coco
from finetune.pipeline import quote, run_stage

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "chess": (SHARED / "chess" / "train" / "_annotations.coco.json",
              SHARED / "chess" / "valid" / "_annotations.coco.json"),
}


def arms(dataset: str, seed: int, fraction: float, out: Path) -> tuple[list[str], list[str]]:
    """(data overrides, semi-only extra overrides) for one seed."""
    if dataset == "synthetic":
        return [f"seed={seed}"], []
    train_json, val_json = DATASETS[dataset]
    split_dir = out / f"split_seed{seed}"
    if not (split_dir / "unlabeled.json").is_file():
        split_coco(train_json, split_dir, fraction=fraction, seed=seed)
    data = ["data=coco", f"data.train_json={quote(split_dir / 'labeled.json')}",
            f"data.val_json={quote(val_json)}", f"seed={seed}"]
    return data, [f"semi.unlabeled={quote(split_dir / 'unlabeled.json')}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", *DATASETS), default="synthetic")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--args", default="", help="Hydra overrides for both arms (one string)")
    p.add_argument("--semi", default="semi=unbiased_teacher semi.burn_in_epochs=2",
                   help="Hydra overrides of the semi arm only")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--benchmarks", type=Path, default=None,
                   help="write the table into this markdown file's semi section (BENCHMARKS.md)")
    a = p.parse_args()
    out = (a.out or REPO / "outputs" / f"bench_semi_{a.dataset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in a.seeds:
        data, semi_data = arms(a.dataset, seed, a.fraction, out)
        common = [*data, *shlex.split(a.args)]
        base = run_stage("finetune", out / f"seed{seed}" / "labeled_only", common)
        semi = run_stage("finetune", out / f"seed{seed}" / "semi", [*common, *shlex.split(a.semi), *semi_data])
        mb = json.loads((base / "metrics.json").read_text())
        ms = json.loads((semi / "metrics.json").read_text())
        health = (ms.get("semi") or {}).get("pseudo_labels") or {}
        rows.append({"seed": seed, "labeled_only": mb["coco"], "semi": ms["coco"],
                     "steps": [mb["global_step"], ms["global_step"]],
                     "pseudo_precision": health.get("precision"), "pseudo_recall": health.get("recall")})
    summary = {
        "dataset": a.dataset, "fraction": a.fraction, "seeds": a.seeds, "args": a.args, "semi": a.semi,
        "runs": rows,
    }
    (out / "bench_semi.json").write_text(json.dumps(summary, indent=2))
    text = report(summary, " ".join(shlex.quote(x) for x in ["python", "scripts/bench_semi.py", *sys.argv[1:]]))
    print("\n" + text)
    if a.benchmarks is not None:
        update_benchmarks(a.benchmarks, text, a.dataset)
        print(f"updated {a.benchmarks}")
    print(f"wrote {out / 'bench_semi.json'}")


def report(summary: Mapping[str, Any], command: str) -> str:
    """The markdown section of one dataset: machine, date, command, AP/AP50 mean +- std, pseudo-label health."""
    rows = summary["runs"]
    info = machine_info()
    labels = "" if summary["dataset"] == "synthetic" else f", {100 * summary['fraction']:g}% labels"
    seeds = ", ".join(str(r["seed"]) for r in rows)
    lines = [f"### {summary['dataset']}{labels}",
             "",
             f"{len(rows)} seeds ({seeds}), {dt.date.today().isoformat()}, {describe(info)}.",
             "",
             f"    {command}",
             "",
             "| arm | AP | AP50 | steps |", "|---|---|---|---|"]
    for arm, key, i in (("labeled only", "labeled_only", 0), ("semi", "semi", 1)):
        lines.append(f"| {arm} | {mean_std([r[key]['AP'] for r in rows])} | "
                     f"{mean_std([r[key]['AP50'] for r in rows])} | {rows[0]['steps'][i]} |")
    prec = [r["pseudo_precision"] for r in rows if r["pseudo_precision"] is not None]
    rec = [r["pseudo_recall"] for r in rows if r["pseudo_recall"] is not None]
    if prec:
        lines += ["", (f"Semi arm's pseudo-labels at its last validation, in %: precision {mean_std(prec)} (over the "
                       f"seeds with any pseudo-box), recall {mean_std(rec)}, at IoU 0.5 against the unlabeled images' "
                       "hidden ground truth.")]
    return "\n".join(lines) + "\n"


SEMI_HEAD = ("## Semi-supervised: labeled only against semi\n\nWritten by `scripts/bench_semi.py --benchmarks "
             "BENCHMARKS.md`: the same labeled images, overrides and optimizer steps in both arms; AP and AP50 "
             "(COCO, %) as mean +- std over the seeds.\n")


def update_benchmarks(md: Path, text: str, dataset: str) -> None:
    """Replace this dataset's section of ``md`` (or add it, and the heading, at the end); other sections stay."""
    put_section(md, text, "semi", dataset, "## Semi-supervised", SEMI_HEAD)

if __name__ == "__main__":
    main()
