"""The accuracy benchmark: what pretraining and teacher-student training each buy with 10% labels.

    python scripts/bench_accuracy.py --dataset chess --seeds 1 2 3              # make bench-accuracy DATASET=chess
    python scripts/bench_accuracy.py --dataset bccd --arms ssl ssl_semi --seeds 1
    python scripts/bench_accuracy.py --dataset chess --report-only             # the table from what is done

Protocol (the semi-supervised detection literature's): the splitter draws ``--fraction`` of the
training images as labeled (covering every class), per split seed; the rest are the unlabeled
images (their ground truth hidden, used only for the pseudo-label health). Every arm is evaluated
on the dataset's validation set. Five arms, one fine-tuning recipe (``--args``) and one budget:

- ``random``: Faster R-CNN R18-FPN from random init on the labeled images;
- ``ssl``: the same from the SwAV backbone, pretrained once per dataset on all training images
  with their labels unused (``--pretrain``);
- ``random_semi`` / ``ssl_semi``: the same plus the unlabeled images (``--semi``, Unbiased Teacher
  by default); the burn-in counts inside the same ``trainer.max_epochs`` of the labeled set, so each
  takes the optimizer steps of its matched labeled-only arm;
- ``full``: the 100%-label supervised reference (SSL init, the same epochs, so 1/fraction times the
  steps): what the 10%-label arms are measured against.

Resumable across sittings and machines: every finished run's figures go into a ledger,
``benchmarks/accuracy/<dataset>.json`` (tracked in git), keyed by arm and seed with a fingerprint
of the recipe; a run whose fingerprint is there is skipped, a changed recipe re-runs. Run
directories live in ``outputs/bench_accuracy/<dataset>/`` (an interrupted run resumes from its
last checkpoint). ``--benchmarks BENCHMARKS.md`` writes the dataset's table into the accuracy
section: AP and AP50 as mean +- std over the seeds, each arm beside its matched baseline (paired
difference over the same seeds), pseudo-label precision/recall, and the goal: SSL + semi with 10%
labels at >= 90% of the 100%-label AP50, and each of SSL and semi ahead of its baseline by more than
the spread.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_accuracy_table import ARMS, BASELINE, LABELS, goals, table  # noqa: F401 (table: the tests read it here)
from bench_common import describe, fingerprint, load_ledger, machine_info, put_section

from finetune.data.cocofile import merge_coco
from finetune.data.split import split_coco
from finetune.pipeline import backbone_of, quote, run_stage

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# Fine-tuning at a reduced image size and a fixed budget (epochs of the labeled set): a CPU runs it,
# with the CPU-sized Faster R-CNN (conf/finetune/detector/fasterrcnn_cpu.yaml). Every arm uses it, so
# the comparisons stay matched.
FAST_RCNN = "detector=fasterrcnn_cpu"
FINETUNE_BASE = ("backbone.arch=resnet18 backbone.norm=bn backbone.trainable_layers=5 optimizer.lr=0.01 "
                 "scheduler=cosine scheduler.warmup_steps=20 trainer.gradient_clip_val=10 eval.plots=false "
                 "trainer.enable_progress_bar=false")
# SwAV as in make demo --method swav (experiment=demo_swav: grayscale 96 px views, SGD; see
# conf/pretrain/experiment/demo_swav.yaml). Large photographs are decoded once into a 480 px working
# image and cropped at 5-25% of its area, so that objects appear at about the scale the detector sees them.
# Measured on chess (2026-12-02, 202 images): this recipe does not leave SwAV's uniform phase in 300
# steps (loss ln 32, embeddings at cosine 0.77), nor do 40-100% crops of a 320 px working image or
# SimCLR (SGD, 96 px, temperature 0.2) in 75 steps: the kNN probe on the valid set's piece crops
# stays at 0.68-0.74, where random init gives 0.68. On 202 near-identical board photographs the
# SSL arms need a longer budget (a GPU) before they can be read as "SSL".
PRETRAIN_PHOTOS = ("experiment=demo_swav data.knn_val_json=null data.augment=tensor data.cache_decoded=true "
                   "data.num_workers=0 data.working_size=480 method.transform.crop_min_scales=[0.05] "
                   "method.transform.crop_max_scales=[0.25] trainer.enable_progress_bar=false")
# The semi recipe: conf/finetune/semi/unbiased_teacher_soft.yaml (Unbiased Teacher with Soft Teacher's
# background weighting, unsupervised weight 1, EMA 0.98; the measurements behind it are in that file).
SEMI = "semi=unbiased_teacher_soft"

@dataclass(frozen=True)
class Dataset:
    """Where a benchmark dataset's full training set and validation set are, and its default recipe."""

    prepare: Callable[[Path], tuple[Path, Path]]  # out dir -> (train json, val json)
    finetune: str
    pretrain: str
    semi: str


def _chess(out: Path) -> tuple[Path, Path]:
    return (SHARED / "chess" / "train" / "_annotations.coco.json",
            SHARED / "chess" / "valid" / "_annotations.coco.json")


def _bccd(out: Path) -> tuple[Path, Path]:
    """BCCD is Pascal VOC: converted once (train -> train.json, val -> val.json) with our converter."""
    coco = out / "coco"
    if not (coco / "val.json").is_file():
        from finetune.data.convert import voc_to_coco, write_splits

        write_splits(voc_to_coco(SHARED / "bccd" / "BCCD", coco), coco)
    return coco / "train.json", coco / "val.json"


def _synthetic(out: Path) -> tuple[Path, Path]:
    """The built-in set's 300 labeled and 1000 unlabeled scenes as one pool (the splitter draws from it)."""
    import yaml

    from pretrain.core.data.synthetic import ensure_synthetic

    conf = yaml.safe_load((REPO / "conf" / "shared" / "synthetic" / "default.yaml").read_text())
    root = (REPO / conf["synthetic_dir"]).resolve()  # the set make demo generates, with the same settings
    ensure_synthetic(root, **conf["synthetic"])
    pool = out / "pool.json"
    if not pool.is_file():
        parts = [json.loads((root / f"{n}.json").read_text()) for n in ("train", "unlabeled")]
        pool.parent.mkdir(parents=True, exist_ok=True)
        pool.write_text(json.dumps(merge_coco(parts, root)))
    return pool, root / "val.json"


DATASETS = {
    # 2048x1371 photographs, 14 classes, 202 train / 58 valid: 320 px short side, 30 epochs of the labeled set.
    # 60 epochs (300 steps): at 30 the labeled-only detector was still learning fast (AP 2 / 17 / 27 at
    # epochs 10 / 20 / 30, split seed 1), so a teacher taken at its half-way point could only teach
    # background; now the burn-in is the labeled-only run's first 30 epochs.
    "chess": Dataset(_chess, f"{FINETUNE_BASE} {FAST_RCNN} detector.min_size=320 detector.max_size=480 "
                             "trainer.max_epochs=60 trainer.check_val_every_n_epoch=10",
                     f"{PRETRAIN_PHOTOS} data.batch_size=64 trainer.max_epochs=100",
                     f"{SEMI} semi.burn_in_epochs=30"),
    # 640x480 microscope images, 3 classes (RBC, WBC, platelets), 205 train / 87 val.
    "bccd": Dataset(_bccd, f"{FINETUNE_BASE} {FAST_RCNN} detector.min_size=320 detector.max_size=428 "
                           "trainer.max_epochs=30 trainer.check_val_every_n_epoch=10",
                    f"{PRETRAIN_PHOTOS} data.batch_size=64 trainer.max_epochs=100", f"{SEMI} semi.burn_in_epochs=15"),
    # make demo's scenes (128 px, medium and large objects) and fine-tuning recipe; pretraining is
    # SwAV's demo recipe, which stays at ln K on these scenes (README's demo section).
    "synthetic": Dataset(_synthetic, "experiment=demo eval.plots=false trainer.enable_progress_bar=false "
                                     "trainer.max_epochs=30 trainer.check_val_every_n_epoch=10",
                         "experiment=demo_swav trainer.enable_progress_bar=false",
                         f"{SEMI} semi.burn_in_epochs=15"),
}


def arm_recipe(arm: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    recipe: dict[str, Any] = {"arm": arm, "seed": seed, "args": a.args, "fraction": a.fraction}
    if arm in ("ssl", "ssl_semi", "full"):
        recipe["pretrain"] = a.pretrain
    if arm.endswith("_semi"):
        recipe["semi"] = a.semi
    if arm == "full":
        recipe.pop("fraction")
    return recipe


def arm_overrides(arm: str, seed: int, split: Mapping[str, Path], val_json: Path, backbone: Path | None,
                  a: argparse.Namespace) -> list[str]:
    """The Hydra overrides of one arm's fine-tuning run (``split``: labeled / unlabeled / full JSONs)."""
    train = split["full"] if arm == "full" else split["labeled"]
    out = ["data=coco", f"data.train_json={quote(train)}", f"data.val_json={quote(val_json)}", f"seed={seed}",
           *shlex.split(a.args)]
    if arm in ("ssl", "ssl_semi", "full"):
        assert backbone is not None
        out.append(f"backbone.checkpoint={quote(backbone)}")
    if arm.endswith("_semi"):
        out += [*shlex.split(a.semi), f"semi.unlabeled={quote(split['unlabeled'])}"]
    return out


def entry_from_metrics(metrics: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    health = (metrics.get("semi") or {}).get("pseudo_labels") or {}
    # Semi runs deploy the EMA teacher (AP / AP50); the student's last validation is kept beside it.
    last = next((h for h in reversed(metrics.get("history") or []) if h.get("val_student_AP") is not None), {})
    return {"fingerprint": fingerprint(recipe), "AP": metrics["coco"]["AP"], "AP50": metrics["coco"]["AP50"],
            "student_AP": last.get("val_student_AP"), "student_AP50": last.get("val_student_AP50"),
            "steps": metrics.get("global_step"), "precision": metrics.get("precision"),
            "pseudo_precision": health.get("precision"), "pseudo_recall": health.get("recall"),
            "pseudo_per_image": health.get("pseudo_boxes_per_image"),
            "machine": describe(machine_info(), metrics.get("hardware")), "date": dt.date.today().isoformat()}


def done(ledger: Mapping[str, Any], arm: str, seed: int, recipe: Mapping[str, Any]) -> bool:
    e = ledger["runs"].get(f"{arm}/seed{seed}")
    return bool(e) and e["fingerprint"] == fingerprint(recipe)


def current(ledger: Mapping[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """The ledger with only the runs of ``a``'s recipe (older recipes' runs stay in the file, out of the table)."""
    return {"runs": {f"{arm}/seed{s}": ledger["runs"][f"{arm}/seed{s}"] for arm in ARMS for s in a.seeds
                     if done(ledger, arm, s, arm_recipe(arm, s, a))}}


ACC_HEAD = ("## Accuracy: 10% labels, five arms\n\nWritten by `scripts/bench_accuracy.py --benchmarks BENCHMARKS.md` "
            "(`make bench-accuracy DATASET=...`) from the ledger in `benchmarks/accuracy/`; see the script's "
            "docstring for the protocol.\n")


def update_benchmarks(md: Path, text: str, dataset: str) -> None:
    put_section(md, text, "accuracy", dataset, "## Accuracy", ACC_HEAD)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=tuple(DATASETS), default="chess")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--args", default=None, help="fine-tuning overrides of every arm (default: the dataset's recipe)")
    p.add_argument("--pretrain", default=None, help="SwAV overrides (default: the dataset's recipe)")
    p.add_argument("--semi", default=None, help="overrides of the semi arms (default: the dataset's recipe)")
    p.add_argument("--out", type=Path, default=None, help="run directories (default outputs/bench_accuracy/<dataset>)")
    p.add_argument("--ledger", type=Path, default=None, help="default benchmarks/accuracy/<dataset>.json")
    p.add_argument("--benchmarks", type=Path, default=None, help="write the table into this markdown file")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table from the ledger")
    a = p.parse_args(argv)
    ds = DATASETS[a.dataset]
    a.args = ds.finetune if a.args is None else a.args
    a.pretrain = ds.pretrain if a.pretrain is None else a.pretrain
    a.semi = ds.semi if a.semi is None else a.semi
    a.out = (a.out or REPO / "outputs" / "bench_accuracy" / a.dataset).resolve()
    a.ledger = a.ledger or REPO / "benchmarks" / "accuracy" / f"{a.dataset}.json"
    return a


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Run every (seed, arm) not in the ledger with this recipe; returns the ledger."""
    ledger = load_ledger(a.ledger)
    todo = [(s, arm) for s in a.seeds for arm in a.arms if not done(ledger, arm, s, arm_recipe(arm, s, a))]
    if not todo or a.report_only:
        return ledger
    train_json, val_json = DATASETS[a.dataset].prepare(a.out)
    backbone = None
    if any(arm in ("ssl", "ssl_semi", "full") for _, arm in todo):
        pre = run_stage("pretrain", a.out / f"pretrain_{fingerprint({'pretrain': a.pretrain})}",
                        [f"data.root={quote(train_json)}", *shlex.split(a.pretrain)])
        backbone = backbone_of(pre)
    for i, (seed, arm) in enumerate(todo):
        print(f"[bench_accuracy] {a.dataset} {arm} seed {seed} ({i + 1}/{len(todo)})", flush=True)
        split_dir = a.out / f"split_f{a.fraction:g}_seed{seed}"  # a split per fraction and seed
        if arm != "full" and not (split_dir / "unlabeled.json").is_file():
            split_coco(train_json, split_dir, fraction=a.fraction, seed=seed)
        split = {"labeled": split_dir / "labeled.json", "unlabeled": split_dir / "unlabeled.json", "full": train_json}
        recipe = arm_recipe(arm, seed, a)
        d = run_stage("finetune", a.out / f"seed{seed}" / f"{arm}_{fingerprint(recipe)}",
                      arm_overrides(arm, seed, split, val_json, backbone, a))
        ledger["runs"][f"{arm}/seed{seed}"] = entry_from_metrics(json.loads((d / "metrics.json").read_text()), recipe)
        a.ledger.parent.mkdir(parents=True, exist_ok=True)
        a.ledger.write_text(json.dumps(ledger, indent=1, sort_keys=True) + "\n")  # after every run: resumable
    return ledger


def main(argv: Sequence[str] | None = None) -> None:
    a = parse(argv)
    ledger = run(a)
    # The command that runs (or completes) this table: a --report-only invocation shows it without the flag.
    args = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--report-only"]
    command = " ".join(shlex.quote(x) for x in ["python", "scripts/bench_accuracy.py", *args])
    recipes = {"fine-tuning (every arm)": a.args, "SwAV pretraining": a.pretrain, "semi arms": a.semi}
    text = table(current(ledger, a), a.dataset, a.seeds, a.fraction, command, recipes)
    print("\n" + text)
    if a.benchmarks is not None:
        update_benchmarks(a.benchmarks, text, a.dataset)
        print(f"updated {a.benchmarks}")


if __name__ == "__main__":
    main()
