"""The SSL benchmark: does self-supervised pretraining beat random init, with few labels?

    python scripts/bench_ssl.py --seeds 0 1 2 3 4                   # every arm, both label counts
    python scripts/bench_ssl.py --arms random --labels 20 --seeds 0 1   # part of it (resumable)
    python scripts/bench_ssl.py --report-only --benchmarks BENCHMARKS.md

Protocol (issue 30). The synthetic scenes of ``conf/shared/synthetic/ssl_bench.yaml``: 10k unlabeled
128 px scenes to pretrain on, 300 validation scenes, 100 labeled ones. Label regimes: all 100 labeled
scenes, or a seeded subset of ``n`` (the splitter, one split per seed). Arms, each paired over the
same seeds (a seed is the split's and the fine-tuning's):

- ``random``: Faster R-CNN R18-FPN (``experiment=demo``'s CPU-sized detector and AdamW recipe) from
  random init, every layer trained (its best regime: it has nothing to keep);
- ``ssl``: the same from the pretrained backbone (``--pretrain``, run once, resumable);
- ``ssl_lpft``: LP-FT (Kumar et al., ICLR 2022): the first third of the steps train only FPN and heads
  on the pretrained features (``linear_probe_steps``), then every layer;
- ``ssl_frozen``: the pretrained backbone frozen, only FPN and heads trained (what the features carry).

The last two first re-estimate the backbone's BatchNorm statistics on the training scenes
(``backbone.recalibrate_bn``): pretraining saw 64 px grayscale views, fine-tuning sees 128 px colour.

A gate (the issue's): a pretrained backbone whose kNN top-1 on the validation boxes does not beat the
random-features kNN (step 0 of its own run) by ``--knn-gate`` is reported as such and not fine-tuned.
Every finished run goes into a ledger (``benchmarks/ssl/synthetic.json``, tracked in git) keyed by
arm, label count and seed with a fingerprint of its recipe: a run whose fingerprint is there is
skipped, a changed recipe re-runs; an interrupted run resumes from its last checkpoint. The table:
AP and AP50 as mean +- std, AP at the first and middle validation (pretraining mostly speeds up early
convergence), the paired difference to random init over the same seeds, and the kNN of random
features and of the backbone.

The real-photo row (``--dataset bccd``, ledger ``benchmarks/ssl/bccd.json``): BCCD's 205 training
photographs to pretrain on, 10% of them (20) labeled per seed, its 87 validation photographs; the
photo fine-tuning recipe of the semi benchmark. Its cells are told apart by random features (kNN
0.99), so there the gate is not applied (no backbone can clear the margin) and AP decides.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import shlex
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import (
    claimed,
    describe,
    finetune_config,
    fingerprint,
    load_ledger,
    machine_info,
    mean_std,
    put_section,
    steps_per_epoch,
    update_ledger,
)

from finetune.data.split import split_coco
from finetune.pipeline import backbone_of, quote, run_stage

REPO = Path(__file__).resolve().parents[1]
DATA = "conf/shared/synthetic/ssl_bench.yaml"
ARMS = ("random", "ssl", "ssl_lpft", "ssl_frozen")
LABELS = {"random": "random init", "ssl": "SSL, fine-tuned", "ssl_lpft": "SSL, LP-FT",
          "ssl_frozen": "SSL, backbone frozen"}
# SimCLR as make demo's recipe (grayscale 64 px views, temperature 0.2, SGD at batch 64), for 24 epochs
# of the 10k scenes: 3744 steps, 240k view pairs (the issue's >= 200k at 64 px).
PRETRAIN = ("method=simclr experiment=demo synthetic@data=ssl_bench trainer.max_epochs=24 "
            "checkpoint_every_n_steps=100 trainer.enable_progress_bar=false")
# make demo's fine-tuning (detector=fasterrcnn_cpu, AdamW 1e-3, cosine, BN trainable, every stage
# trained) on the benchmark's labeled scenes (data.train_json: all or a split; data.val_json: its 300
# validation scenes); the steps per label count are set in STEPS.
FINETUNE = "experiment=demo synthetic@data=ssl_bench eval.plots=false trainer.enable_progress_bar=false"
# Optimizer steps per label count at batch 8 (the demo's 390 at 100 labels; 201 at 20, as measured in issue 30).
STEPS = {100: 390, 20: 201}
DATASETS: dict[str, SslData] = {}  # filled below, after the classes
VALIDATIONS = 6  # validations per run (AP over steps)
RECALIBRATE_BATCHES = 8  # BN recalibration batches for the frozen and LP-FT arms (all of 20 labels' 3)


# The real-photo row: BCCD (../shared/data/bccd, Pascal VOC: 640x480 blood-smear photographs, 3 cell
# classes, ~13 boxes each; 205 train / 87 val images after conversion). Pretraining: the same SimCLR
# recipe on the 205 training photographs (labels unused), fitted into a 320 px working square and
# cropped at 30-100% of its area, for 900 epochs (3 full batches of 64 per epoch: 2700 steps, 173k
# view pairs); the kNN probe on the validation boxes every 100 epochs (and at step 0, the random-
# features reference). At min_scale 0.05 (views of a few cells) SimCLR collapsed: its loss sat at
# ln(2 x 64 - 1) = 4.844 from step ~400 to 2700 and its kNN, 0.862, is the majority class's share
# (0.851) against 0.989 for random features; fine-tuned, that backbone reached AP 12-15 where random
# init reached 34-42 (2026-12-06). The smears all look alike, so two small crops of one image share
# nothing that crops of another lack; at 30% and more the two views overlap. At min_scale 0.3 it
# collapsed again (loss at 4.844 from step ~450, kNN 0.88): the warmup, one epoch as in make demo,
# is 3 steps on 205 photographs, and a full LR at step 3 sent it to the collapsed point. With 50
# warmup epochs (150 steps) the loss fell to 4.0-4.5 by step 300 in two probes (2026-12-06); in
# grayscale their kNN fell to 0.89 and with SimCLR's own 20% grayscale to 0.96 (random 0.988): the
# cells' stain colour is what tells them apart, so the views keep it.
# Fine-tuning: the semi benchmark's photo recipe (experiment=semi_bench: SGD 0.01, cosine, 320 px).
BCCD_PRETRAIN = ("method=simclr experiment=demo data.working_size=320 method.transform.min_scale=0.3 "
                 "method.transform.random_gray_scale=0.2 scheduler.warmup_epochs=50 trainer.max_epochs=900 "
                 "trainer.check_val_every_n_epoch=100 checkpoint_every_n_steps=100 trainer.enable_progress_bar=false")
BCCD_FINETUNE = "experiment=semi_bench detector.max_size=428"


@dataclass(frozen=True)
class SslData:
    """A benchmark dataset: its files, default recipes, label counts and step budgets."""

    prepare: Callable[[Path], dict[str, Path]]  # out dir -> {"train", "val"} COCO JSONs
    pretrain: str
    finetune: str
    labels: tuple[int, ...]
    steps: Mapping[int, int]  # optimizer steps per label count (epochs from the recipe's batch size)
    pretrain_data: bool = False  # pretraining reads data.root / data.knn_val_json from the prepared files
    title: str = "Synthetic scenes"  # the table's heading and what its AP is measured on
    evaluated_on: str = "the 300 validation scenes"


def bccd_set(out: Path) -> dict[str, Path]:
    """BCCD converted once to COCO (train.json, val.json) with the project's VOC converter."""
    coco = out / "coco"
    if not (coco / "val.json").is_file():
        from finetune.data.convert import voc_to_coco, write_splits

        write_splits(voc_to_coco(REPO.parent / "shared" / "data" / "bccd" / "BCCD", coco), coco)
    return {"train": (coco / "train.json").resolve(), "val": (coco / "val.json").resolve()}


def synthetic_set(out: Path | None = None) -> dict[str, Path]:
    """The benchmark's synthetic set (generated on first use, like make demo's)."""
    import yaml

    from pretrain.core.data.synthetic import ensure_synthetic

    conf = yaml.safe_load((REPO / DATA).read_text())
    root = (REPO / conf["synthetic_dir"]).resolve()
    out = ensure_synthetic(root, **conf["synthetic"])
    return {"train": Path(out["train_json"]).resolve(), "val": Path(out["val_json"]).resolve(), "root": root}


def labeled_json(data: Mapping[str, Path], n: int, seed: int, out: Path) -> Path:
    """All labeled scenes, or a seeded split of ``n`` of them (the rest is not used here)."""
    num = len(json.loads(data["train"].read_text())["images"])
    if n >= num:
        return data["train"]
    split_dir = out / "splits" / f"n{n}_seed{seed}"
    if not (split_dir / "labeled.json").is_file():
        split_coco(data["train"], split_dir, num_labeled=n, seed=seed)
    return split_dir / "labeled.json"


@functools.cache
def batch_size(finetune: str) -> int:
    """The labeled batch size of the fine-tuning recipe ``finetune`` (its overrides composed)."""
    return int(finetune_config(shlex.split(finetune)).data.batch_size)


def schedule(n: int, a: argparse.Namespace | None = None) -> list[str]:
    """Epochs for the label count's step budget, and validations spread over the run."""
    ds = DATASETS[a.dataset if a is not None else "synthetic"]
    per_epoch = steps_per_epoch(n, batch_size(ds.finetune if a is None else a.finetune))
    steps = ds.steps.get(n, 390)
    epochs = max(1, round(steps / per_epoch))
    every = max(1, epochs // VALIDATIONS)
    return [f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={every}"]


def arm_extras(arm: str, n: int, a: argparse.Namespace | None = None) -> list[str]:
    """What an arm adds to the shared fine-tuning recipe (besides the backbone)."""
    out = []
    if arm == "ssl_frozen":
        out.append("freeze_backbone=true")
    if arm == "ssl_lpft":
        out.append(f"linear_probe_steps={DATASETS[a.dataset if a else 'synthetic'].steps.get(n, 390) // 3}")
    if arm in ("ssl_frozen", "ssl_lpft"):
        # The backbone's BN statistics come from 64 px grayscale views; re-estimated on the 128 px colour
        # training scenes before the (frozen or probed) backbone is used as it is.
        out.append(f"backbone.recalibrate_bn={RECALIBRATE_BATCHES}")
    return out


def recipe(arm: str, n: int, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """What decides a run's result (no paths): its fingerprint in the ledger."""
    r: dict[str, Any] = {"arm": arm, "labels": n, "seed": seed, "finetune": a.finetune, "schedule": schedule(n, a)}
    if a.dataset != "synthetic":
        r["dataset"] = a.dataset
    if arm != "random":
        r["pretrain"] = a.pretrain
        r["extras"] = arm_extras(arm, n, a)
    return r


def overrides(arm: str, n: int, seed: int, train: Path, val: Path, backbone: Path | None,
              a: argparse.Namespace) -> list[str]:
    out = [f"data.train_json={quote(train)}", f"data.val_json={quote(val)}", f"seed={seed}",
           *shlex.split(a.finetune), *schedule(n, a)]
    if arm != "random":
        assert backbone is not None
        out.append(f"backbone.checkpoint={quote(backbone)}")
    return out + arm_extras(arm, n, a)


def key(arm: str, n: int, seed: int) -> str:
    return f"{arm}/n{n}/seed{seed}"


def entry(metrics: Mapping[str, Any], rec: Mapping[str, Any]) -> dict[str, Any]:
    curve = [(h["step"], h.get("val_AP"), h.get("val_AP50")) for h in metrics.get("history") or []
             if h.get("val_AP") is not None]
    return {"fingerprint": fingerprint(rec), "AP": metrics["coco"]["AP"], "AP50": metrics["coco"]["AP50"],
            "curve": curve, "steps": metrics.get("global_step"), "train_time_s": metrics.get("train_time_s"),
            "precision": metrics.get("precision"), "machine": describe(machine_info(), metrics.get("hardware")),
            "date": dt.date.today().isoformat()}


def random_features_knn(pretrain: str, data: Sequence[str] = ()) -> float:
    """The kNN top-1 of the pretraining's step-0 backbone, its seeded random init, on its probe's crops
    (fp32): for a run made before pretraining measured it itself (``knn_top1_random``). The module is
    built as ``pretrain.train`` builds it, after the same seed, so it starts from the same weights.
    ``data``: the run's data overrides (``data.root``, ``data.knn_val_json``): without them the probe
    would be the default set's crops, not the run's."""
    import hydra.utils
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir

    from pretrain.core.run.configs import config_dir
    from pretrain.data import knn_loader
    from pretrain.knn import knn_top1
    from pretrain.methods.base import plain_config

    with initialize_config_dir(config_dir("pretrain"), version_base="1.3"):
        config = plain_config(compose("pretrain", overrides=[*data, *shlex.split(pretrain)]))
    pl.seed_everything(int(config.get("seed", 0)))
    model = hydra.utils.get_class(config["method"]["module"])(config).eval()
    loader = knn_loader(config)
    if loader is None:
        raise ValueError("the pretraining has no kNN probe (data.knn_val_json)")
    feats, labels = [], []
    with torch.no_grad():
        for images, y, _ in loader:
            feats.append(model(images).float())
            labels.append(y)
    k = config.get("knn", {})
    return knn_top1(torch.cat(feats), torch.cat(labels), k=int(k.get("k", 20)), vote=str(k.get("vote", "weighted")),
                    temperature=float(k.get("temperature", 0.07)))


def pretraining(a: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume, or find done) the pretraining; its backbone, kNN and random-features kNN."""
    run_dir = a.out / f"pretrain_{fingerprint({'pretrain': a.pretrain})}"
    data = []
    if DATASETS[a.dataset].pretrain_data:  # the photographs' files (paths stay out of the fingerprint)
        files = DATASETS[a.dataset].prepare(a.out)
        data = [f"data.root={quote(files['train'])}", f"data.knn_val_json={quote(files['val'])}"]
    run_stage("pretrain", run_dir, [*data, *shlex.split(a.pretrain)])
    m = json.loads((run_dir / "metrics.json").read_text())
    knn_random, source = m.get("knn_top1_random"), "step 0 of the run"
    if knn_random is None:
        knn_random, source = random_features_knn(a.pretrain, data), "its seeded init, recomputed (fp32)"
    return {"backbone": backbone_of(run_dir), "knn": m.get("knn_top1"), "knn_random": knn_random,
            "knn_random_source": source, "steps": m.get("global_step"), "run_dir": str(run_dir)}


def run(a: argparse.Namespace) -> dict[str, Any]:
    ledger = load_ledger(a.ledger)
    todo = [(arm, n, s) for n in a.labels for s in a.seeds for arm in a.arms
            if (ledger["runs"].get(key(arm, n, s)) or {}).get("fingerprint") != fingerprint(recipe(arm, n, s, a))]
    if a.report_only or not todo:
        return ledger
    data = DATASETS[a.dataset].prepare(a.out)
    pre = None
    if any(arm != "random" for arm, *_ in todo):
        pre = pretraining(a)
        figures = {k: (str(v) if isinstance(v, Path) else v) for k, v in pre.items()}
        ledger = update_ledger(a.ledger, lambda led: led.__setitem__("pretrain", figures))
        gap = None if pre["knn"] is None or pre["knn_random"] is None else pre["knn"] - pre["knn_random"]
        if gap is not None and pre["knn_random"] + a.knn_gate > 1.0 and gap > -a.knn_gate:
            # Random features already tell the classes apart (BCCD's cells: 0.99): no backbone can
            # clear the margin, so the probe says nothing here and the fine-tuning arms decide
            # (a backbone that fell below random features by the margin is still kept out).
            print(f"gate not applied: random features' kNN {pre['knn_random']:.3f} leaves no room for a margin "
                  f"of {a.knn_gate} (the backbone's: {pre['knn']:.3f})", flush=True)
        elif gap is not None and gap < a.knn_gate:
            print(f"gate: the backbone's kNN {pre['knn']:.3f} is not above random features' {pre['knn_random']:.3f} "
                  f"by {a.knn_gate}; its arms are not fine-tuned", flush=True)
            todo = [t for t in todo if t[0] == "random"]
    for arm, n, s in todo:
        rec = recipe(arm, n, s, a)
        if (load_ledger(a.ledger)["runs"].get(key(arm, n, s)) or {}).get("fingerprint") == fingerprint(rec):
            continue  # another benchmark process finished it meanwhile
        train = labeled_json(data, n, s, a.out)
        run_dir = a.out / arm / f"n{n}_seed{s}_{fingerprint(rec)}"
        with claimed(run_dir) as mine:
            if not mine:
                print(f"== {key(arm, n, s)}: another benchmark process is running it, skipped", flush=True)
                continue
            print(f"== {key(arm, n, s)} -> {run_dir}", flush=True)
            run_stage("finetune", run_dir, overrides(arm, n, s, train, data["val"],
                                                     pre["backbone"] if pre else None, a))
        run_key, done_run = key(arm, n, s), entry(json.loads((run_dir / "metrics.json").read_text()), rec)
        ledger = update_ledger(a.ledger, lambda led, k=run_key, e=done_run: led["runs"].__setitem__(k, e))
    return load_ledger(a.ledger)


def _at(curve: Sequence[Sequence[Any]], i: int) -> float | None:
    return curve[i][1] if len(curve) > i else None


def table(ledger: Mapping[str, Any], a: argparse.Namespace, command: str) -> str:
    runs = ledger["runs"]

    def vals(arm: str, n: int, pick: Any = lambda e: e["AP"]) -> dict[int, float]:
        out = {}
        for s in a.seeds:
            e = runs.get(key(arm, n, s))
            if e and e["fingerprint"] == fingerprint(recipe(arm, n, s, a)) and pick(e) is not None:
                out[s] = pick(e)
        return out

    pre = ledger.get("pretrain") or {}
    knn, knn_r = pre.get("knn"), pre.get("knn_random")
    ds = DATASETS[a.dataset]
    name = "" if a.ledger.stem == a.dataset else f" (ledger `{a.ledger.stem}`)"
    lines = [f"### {ds.title}: SSL against random init{name}", "",
             (f"AP and AP50 (COCO, %) on {ds.evaluated_on}, mean +- std over the seeds; `vs random`: the "
              "paired AP difference to random init over the same seeds; `first / middle val`: AP at the first and "
              "middle validation of the run. A gain counts when its mean exceeds the larger std of the two arms."),
             "", f"    {command}", "",
             (f"Backbone kNN top-1 on the validation boxes: {knn:.3f} against {knn_r:.3f} for its random init "
              f"({pre.get('knn_random_source', 'step 0')}), after {pre.get('steps')} steps."
              if knn is not None and knn_r is not None else
              "Backbone kNN: not measured yet."), "",
             "| labels | arm | seeds | AP | AP50 | first / middle val AP | vs random (AP) |",
             "|---|---|---|---|---|---|---|"]
    for n in a.labels:
        base = vals("random", n)
        for arm in ARMS:
            ap = vals(arm, n)
            if not ap:
                lines.append(f"| {n} | {LABELS[arm]} | 0 | - | - | - | - |")
                continue
            ap50 = vals(arm, n, lambda e: e["AP50"])
            first = vals(arm, n, lambda e: _at(e["curve"], 0))
            mid = vals(arm, n, lambda e: _at(e["curve"], len(e["curve"]) // 2))
            delta = "-"
            common = [s for s in ap if s in base]
            if arm != "random" and common:
                d = [ap[s] - base[s] for s in common]
                spread = max(statistics.stdev([ap[s] for s in common]) if len(common) > 1 else 0.0,
                             statistics.stdev([base[s] for s in common]) if len(common) > 1 else 0.0)
                verdict = ("" if len(common) < 2 else  # mean_std says "(1 seed)" itself
                           " (gain)" if statistics.mean(d) > spread else
                           " (below random init)" if statistics.mean(d) < -spread else " (within the spread)")
                delta = f"{'+' if statistics.mean(d) >= 0 else ''}{mean_std(d)}{verdict}"
            lines.append(f"| {n} | {LABELS[arm]} | {len(ap)} | {mean_std(list(ap.values()))} | "
                         f"{mean_std(list(ap50.values()))} | {mean_std(list(first.values()))} / "
                         f"{mean_std(list(mid.values()))} | {delta} |")
    machines = sorted({e["machine"] for e in runs.values()})
    lines += ["", f"Recipes: pretraining `{a.pretrain}`; fine-tuning `{a.finetune}` with "
              + ", ".join(f"{n} labels: `{' '.join(schedule(n, a))}`" for n in a.labels) + ".",
              "", f"Measured on: {'; '.join(machines) or '-'}."]
    return "\n".join(lines) + "\n"


SSL_HEAD = ("## SSL: pretraining against random init\n\nWritten by `scripts/bench_ssl.py --benchmarks BENCHMARKS.md` "
            "from the ledger in `benchmarks/ssl/`; see the script's docstring for the protocol.\n")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", "bccd"), default="synthetic",
                   help="synthetic scenes (10k unlabeled) or the BCCD photographs (real-photo row)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label counts (default: the dataset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--pretrain", default=None, help="pretraining overrides (default: the dataset's)")
    p.add_argument("--finetune", default=None, help="fine-tuning overrides of every arm (default: the dataset's)")
    p.add_argument("--knn-gate", type=float, default=0.05, help="kNN margin over random features to fine-tune")
    p.add_argument("--out", type=Path, default=None, help="run directories (default outputs/bench_ssl[_<dataset>])")
    p.add_argument("--ledger", type=Path, default=None, help="default benchmarks/ssl/<dataset>.json")
    p.add_argument("--benchmarks", type=Path, default=None, help="write the table into this markdown file")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    ds = DATASETS[a.dataset]
    a.labels = a.labels or list(ds.labels)
    a.pretrain = ds.pretrain if a.pretrain is None else a.pretrain
    a.finetune = ds.finetune if a.finetune is None else a.finetune
    suffix = "" if a.dataset == "synthetic" else f"_{a.dataset}"
    a.out = (a.out or REPO / "outputs" / f"bench_ssl{suffix}").resolve()
    a.ledger = a.ledger or REPO / "benchmarks" / "ssl" / f"{a.dataset}.json"
    return a


DATASETS.update({
    "synthetic": SslData(synthetic_set, PRETRAIN, FINETUNE, (20, 100), STEPS),
    # 10% of BCCD's 205 training photographs: 20 labeled, 300 steps (60 epochs at batch 4).
    "bccd": SslData(bccd_set, BCCD_PRETRAIN, BCCD_FINETUNE, (20,), {20: 300}, pretrain_data=True,
                    title="BCCD blood-smear photographs", evaluated_on="BCCD's 87 validation photographs"),
})


def main(argv: Sequence[str] | None = None) -> None:
    a = parse(argv)
    ledger = run(a)
    command = " ".join(shlex.quote(x) for x in ["python", "scripts/bench_ssl.py",
                                                 *[x for x in (argv if argv is not None else sys.argv[1:])
                                                   if x != "--report-only"]])
    text = table(ledger, a, command)
    print(text)
    if a.benchmarks is not None:
        put_section(a.benchmarks, text, "ssl", a.ledger.stem, "## SSL", SSL_HEAD)


if __name__ == "__main__":
    main()
