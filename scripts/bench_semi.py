"""Does teacher-student training beat training on the labeled images alone? Converge, then continue.

    python scripts/bench_semi.py --dataset chess --seeds 1 2 3                  # make bench-semi
    python scripts/bench_semi.py --train mine/train.json --val mine/val.json --name mine --seeds 1 2 3
    python scripts/bench_semi.py --train mine/labeled.json --unlabeled mine/photos/ --val mine/val.json --name mine
    python scripts/bench_semi.py --dataset chess --seeds 1 2 3 --report-only --benchmarks BENCHMARKS.md
    python scripts/bench_semi.py --dataset chess --reproduce semi/seed1   # run one ledger row again

The protocol (issue 32; every figure of it in ``conf/bench/semi.yaml``, the fine-tuning recipe in
``conf/finetune/experiment/semi_bench.yaml`` and the semi recipe in ``conf/finetune/semi/bench.yaml``).
Equal steps under one cosine schedule would give the semi phase the schedule's low-LR tail and compare
it with a labeled-only run that is still learning; the references run their semi phase for ~180k
steps at a constant LR. So, per seed (a seed is the split's and the training's):

1. ``converge``: labeled-only fine-tuning to its plateau (the table shows the AP it gained over its
   last validations: a large figure means "not converged, give it more epochs");
2. from that detector's best checkpoint, ``continue_steps`` more steps at one constant LR in three arms:
   ``labeled`` (labeled-only continued), ``semi`` (the unlabeled images too) and ``control`` (the semi
   recipe at ``semi.unsup_weight=0``: the EMA teacher, views and losses without the unlabeled loss,
   which separates EMA averaging from what the unlabeled images teach);
3. ``ceiling``: the 100%-label detector at the same total steps: the most any semi method could reach.

The data: a built-in dataset (``--dataset``), or any COCO set: ``--train`` and ``--val``, with
``--unlabeled`` (a folder or COCO JSON) when the labeled set is what you have, or without it, to let
the splitter draw ``fraction`` of ``--train`` as labeled and hide the rest's labels (their ground truth
then gives the pseudo-labels' precision and recall). Every finished run goes into a ledger
(``benchmarks/semi/<name>.json``, tracked in git) keyed by arm and seed with a fingerprint of its
recipe; a run whose fingerprint is there is skipped, an interrupted one resumes from its last
checkpoint, and several processes over the same seeds share the ledger and never the same run. A
process fingerprints every recipe as ``conf/`` composes at its start and stops before its next run
if ``conf/`` has changed since (start it again: the ledger resumes).
``--reproduce ARM/seedN`` runs one recorded run again in a directory of its own (the same recipe; a
continuation from the same converged checkpoint) and sets its AP beside the ledger's and the arm's
spread over seeds; the table keeps that line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import math
import re
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
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
from finetune.pipeline import best_checkpoint_of, quote, run_stage

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PROTOCOL = REPO / "conf" / "bench" / "semi.yaml"
ARMS = ("converge", "labeled", "semi", "control", "ceiling")
# Opt-in arms (--arms): labeled_time, labeled-only continued for `equal_time_factor` x the
# continuation's steps, the compute of a semi continuation (a semi step costs 1.4-2x a labeled one):
# does the extra compute alone buy what the semi arm gains? oracle, the continuation trained on every
# training image's true labels (the unlabeled images' hidden ones too), same start, LR and steps: what
# perfect pseudo-labels could add within the continuation's budget. When it is near labeled-only, the
# budget (LR, steps) is what limits any semi arm, not the pseudo-labels.
EXTRA_ARMS = ("labeled_time", "oracle")
# converge:K, the converged run again with training seed K on the same split (not an arm of the
# table's comparison: a detector for semi.extra_teachers). A variant names it as CONVERGE_K, e.g.
# --variant 'ens=semi.extra_teachers=[CONVERGE_101,CONVERGE_102]': each seed's converge:K runs first
# and the token becomes its run dir.
TEACHER_TOKEN = re.compile(r"\bCONVERGE_(\d+)\b")


def is_converge(arm: str) -> bool:
    """``converge`` and its other-seed runs ``converge:K``."""
    return arm == "converge" or re.fullmatch(r"converge:\d+", arm) is not None


def train_seed_of(arm: str) -> int | None:
    """K of a ``converge:K`` arm (its training seed); None for every other arm."""
    return int(arm[len("converge:"):]) if arm != "converge" and is_converge(arm) else None


def teacher_seeds(arm: str, a: argparse.Namespace) -> list[int]:
    """The training seeds of the ``converge:K`` runs a semi arm's overrides name (``CONVERGE_K``)."""
    return [int(k) for k in TEACHER_TOKEN.findall(semi_overrides(arm, a))] if is_semi(arm) else []


# Settings added to the configs after the ledger had runs, with the value that behaves as before they
# existed: at that value they stay out of a run's fingerprint, so adding an option does not re-run
# (or orphan) every recorded run. Any other value is part of the fingerprint as usual.
ADDED_SETTINGS = {"semi.strong_view": "unbiased_teacher", "semi.rpn_threshold": None, "semi.soft_classes": None,
                  "semi.strong_scale": None, "semi.teacher_flip": False, "semi.extra_teachers": None}

PER_DATASET = ("converge_epochs", "continue_steps", "working_size", "finetune")


def synthetic_root(preset: str) -> Path:
    """The built-in synthetic set of ``conf/shared/synthetic/<preset>.yaml``, generated if missing."""
    import yaml

    from pretrain.core.data.synthetic import ensure_synthetic

    conf = yaml.safe_load((REPO / "conf" / "shared" / "synthetic" / f"{preset}.yaml").read_text())
    root = (REPO / conf["synthetic_dir"]).resolve()
    ensure_synthetic(root, **conf["synthetic"])
    return root


def has_boxes(coco: Path) -> bool:
    """A COCO JSON with annotations (an unlabeled set's hidden ground truth); False for a folder."""
    return coco.is_file() and bool(json.loads(coco.read_text()).get("annotations"))


def full_set(a: argparse.Namespace) -> Path:
    """The ceiling's training set: the whole pool, or, with --unlabeled whose ground truth is hidden
    in it, the labeled and the unlabeled images with their labels (one merged JSON, made once)."""
    if a.unlabeled is None:
        return a.train
    out = a.out / "data" / "full.json"
    if not out.is_file():
        from finetune.data.cocofile import merge_coco, write_coco

        parts = [json.loads(p.read_text()) for p in (a.train, a.unlabeled)]
        write_coco(merge_coco(parts, [a.train.parent, a.unlabeled.parent]), out)
    return out


def load_protocol(path: Path = PROTOCOL) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def every_dividing(epochs: int, validations: int = 6) -> int:
    """A validation interval that divides ``epochs`` (the last validation at the last epoch, so a run's
    final AP is its end's), about ``validations`` of them."""
    return max(d for d in range(1, max(1, epochs // validations) + 1) if epochs % d == 0)


def num_images(coco_json: Path) -> int:
    return len(json.loads(Path(coco_json).read_text())["images"])


def recipe(arm: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """What decides a run's result (no paths): its fingerprint in the ledger. The continuations carry
    the converged run's recipe, so a changed convergence re-runs them."""
    p = a.protocol
    base = {"data": a.name, "data_hash": data_hash(a), "fraction": None if a.unlabeled else p["fraction"], "seed": seed,
            "working_size": p.get("working_size"), "finetune": p["finetune"], "args": a.args}
    config = config_hash(tuple(arm_settings(arm, a)))
    if is_converge(arm):
        k = train_seed_of(arm)
        return {**base, "arm": arm, "epochs": p["converge_epochs"], "config": config,
                **({"train_seed": k} if k is not None else {})}
    if arm == "ceiling":
        return {**base, "arm": arm, "fraction": 1.0, "unlabeled_labels": a.unlabeled is not None,
                "epochs": p["converge_epochs"], "continue_steps": p["continue_steps"], "config": config}
    r = {**base, "arm": arm, "start": recipe("converge", seed, a), "steps": continuation_steps(arm, a),
         "lr_factor": p["continue_lr_factor"], "validations": p["validations"]}
    if arm == "oracle":
        r.update(fraction=1.0, unlabeled_labels=a.unlabeled is not None)
    if is_semi(arm):
        r["semi"] = semi_overrides(arm, a)
        teachers = teacher_seeds(arm, a)
        if teachers:  # a changed extra teacher re-runs the arm
            r["extra_teachers"] = [recipe(f"converge:{k}", seed, a) for k in teachers]
    return {**r, "config": config}


def continuation_steps(arm: str, a: argparse.Namespace) -> int:
    """A continuation's optimizer steps: the protocol's, or x ``equal_time_factor`` for labeled_time."""
    steps = int(a.protocol["continue_steps"])
    return round(steps * float(a.protocol.get("equal_time_factor", 2.0))) if arm == "labeled_time" else steps


def is_semi(arm: str) -> bool:
    """The arms that run the semi recipe: semi, its ``--variant`` arms (``semi:NAME``) and control."""
    return arm in ("semi", "control") or arm.startswith("semi:")


def semi_overrides(arm: str, a: argparse.Namespace) -> str:
    """The protocol's semi overrides, followed by a ``semi:NAME`` arm's variant overrides."""
    base = a.protocol["semi"]
    return f"{base} {a.variants[arm[5:]]}" if arm.startswith("semi:") else base


def data_hash(a: argparse.Namespace) -> str:
    """What the data is, by content (two sets under one --name, or a changed file, never share runs)."""
    if getattr(a, "_data_hash", None) is None:
        parts = {w: hashlib.sha1(getattr(a, w).read_bytes()).hexdigest() for w in ("train", "val", "unlabeled")
                 if getattr(a, w) is not None and getattr(a, w).is_file()}
        if a.unlabeled is not None and a.unlabeled.is_dir():
            parts["unlabeled"] = str(sorted(f.name for f in a.unlabeled.rglob("*") if f.is_file()))
        a._data_hash = fingerprint(parts)
    return a._data_hash


def arm_settings(arm: str, a: argparse.Namespace) -> list[str]:
    """An arm's overrides that are not data, paths or step counts (those come from the data)."""
    p = a.protocol
    out = [*shlex.split(p["finetune"]), *shlex.split(a.args)]
    if arm in ("labeled", "labeled_time", "oracle") or is_semi(arm):
        out += ["scheduler=constant", "scheduler.warmup_steps=0"]
    if is_semi(arm):
        out += shlex.split(semi_overrides(arm, a))
    if arm == "control":
        out.append("semi.unsup_weight=0")
    return out


@functools.cache
def config_hash(settings: tuple[str, ...]) -> str:
    """The fingerprint of the whole composed config of ``settings``: an edit of a preset file
    (experiment=semi_bench, semi=bench, a default they inherit) re-runs what it changes."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(finetune_config(settings), resolve=False)
    for dotted, neutral in ADDED_SETTINGS.items():  # an option added later, at the value that reproduces older runs
        *parents, leaf = dotted.split(".")
        node = config
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf, neutral) == neutral:
            node.pop(leaf, None)
    return fingerprint(config)  # type: ignore[arg-type]


def pin_recipes(a: argparse.Namespace) -> None:
    """Compose every config this process will fingerprint now, at its start (``config_hash`` keeps
    them): a run's directory and ledger row are named by the recipe the process started with, not by
    whatever ``conf/`` holds when the arm's turn comes."""
    for seed in a.seeds:
        for arm in dict.fromkeys([*a.arms, *table_arms(a)]):  # the table at the end fingerprints its rows too
            recipe(arm, seed, a)  # a continuation's includes its converged run's and extra teachers'


def conf_unchanged(arm: str, a: argparse.Namespace) -> None:
    """Refuse to start ``arm`` when ``conf/`` composes differently from when this process pinned its
    recipes: the run (which composes its own config as it starts) would be filed under a fingerprint
    that does not describe it."""
    settings = tuple(arm_settings(arm, a))
    if config_hash.__wrapped__(settings) != config_hash(settings):
        raise SystemExit(f"{arm}: conf/ changed since this benchmark process started, so its recorded fingerprint "
                         "would not describe the run; start the benchmark again (the ledger resumes). A setting "
                         "added at the value that behaves as before belongs in bench_semi.ADDED_SETTINGS, so that "
                         "it does not re-run every recorded run.")


def key(arm: str, seed: int) -> str:
    return f"{arm}/seed{seed}"


def split_of(seed: int, a: argparse.Namespace) -> dict[str, Path]:
    """The labeled / unlabeled JSONs of a seed (the splitter's, once per seed and fraction)."""
    if a.unlabeled is not None:
        return {"labeled": a.train, "unlabeled": a.unlabeled}
    d = a.out / f"split_f{a.protocol['fraction']:g}_seed{seed}"
    source = d / "source.txt"  # the pool it was drawn from: a split of the full-size photographs made
    # before the working-size copies existed is drawn again from the copies (same seed, same images)
    if not (d / "unlabeled.json").is_file() or not source.is_file() or source.read_text() != str(a.train):
        split_coco(a.train, d, fraction=a.protocol["fraction"], seed=seed)
        source.write_text(str(a.train))
    return {"labeled": d / "labeled.json", "unlabeled": d / "unlabeled.json"}


def overrides(arm: str, seed: int, a: argparse.Namespace, split: Mapping[str, Path],
              start: Path | None = None) -> list[str]:
    """The Hydra overrides of one arm's run."""
    p = a.protocol
    train = full_set(a) if arm in ("ceiling", "oracle") else split["labeled"]
    k = train_seed_of(arm)
    train_seed = seed if k is None else k
    common = [*shlex.split(p["finetune"]), *shlex.split(a.args), f"data.train_json={quote(train)}",
              f"data.val_json={quote(a.val)}", f"seed={train_seed}"]
    cfg = finetune_config(common)
    per_epoch = steps_per_epoch(num_images(train), int(cfg.data.batch_size))
    if is_converge(arm):
        epochs = int(p["converge_epochs"])
        return [*common, f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={every_dividing(epochs)}"]
    if arm == "ceiling":  # the converged run's and the continuation's steps, in epochs of the full set
        batch = int(cfg.data.batch_size)
        labeled_steps = steps_per_epoch(num_images(split["labeled"]), batch) * int(p["converge_epochs"])
        epochs = max(1, round((labeled_steps + int(p["continue_steps"])) / per_epoch))
        return [*common, f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={every_dividing(epochs)}"]
    assert start is not None
    epochs = max(1, math.ceil(continuation_steps(arm, a) / per_epoch))
    every = max(1, epochs // int(p["validations"]))
    epochs = every * max(1, round(epochs / every))  # the last validation at the last step
    extra = arm_settings(arm, a)[len(shlex.split(p["finetune"])) + len(shlex.split(a.args)):]
    out = [*common, f"init_from={quote(start)}", *extra[:2],
           f"optimizer.lr={float(cfg.optimizer.lr) * float(p['continue_lr_factor']):g}",
           f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={every}", *extra[2:]]
    if is_semi(arm):
        out.append(f"semi.unlabeled={quote(split['unlabeled'])}")
        runs = {f"CONVERGE_{k}": str(run_dir_of(f"converge:{k}", seed, a)) for k in teacher_seeds(arm, a)}
        out = [TEACHER_TOKEN.sub(lambda m: runs[m.group(0)], o) for o in out]
    return out


def entry(metrics: Mapping[str, Any], rec: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run's figures: the last validation's AP (the deployed model's: the EMA teacher for
    the semi arms) and its student's, the best validation's, the curve, the compute, and the best
    checkpoint's AP per class (the classes the validation set has) and confusion matrix
    (:mod:`finetune.confusion`; runs from before it was written have none)."""
    per_class = {c: v for c, v in (metrics.get("per_class_ap") or {}).items() if v is not None and v >= 0}
    hist = [h for h in metrics.get("history") or [] if h.get("val_AP") is not None]
    last = hist[-1] if hist else {}
    health = (metrics.get("semi") or {}).get("pseudo_labels") or {}
    steps = metrics.get("global_step") or 0
    return {"fingerprint": fingerprint(rec), "AP": last.get("val_AP"), "AP50": last.get("val_AP50"),
            "student_AP": last.get("val_student_AP"), "student_AP50": last.get("val_student_AP50"),
            "teacher_AP": last.get("val_teacher_AP"),
            "best_AP": metrics["coco"]["AP"], "best_AP50": metrics["coco"]["AP50"],
            "curve": [(h["step"], h["val_AP"], h.get("val_student_AP")) for h in hist],
            "steps": steps, "train_time_s": metrics.get("train_time_s"),
            "s_per_step": (metrics.get("train_time_s") or 0) / steps if steps else None,
            "pseudo_precision": health.get("precision"), "pseudo_recall": health.get("recall"),
            "pseudo_per_image": health.get("pseudo_boxes_per_image"),
            "deployed": (metrics.get("semi") or {}).get("deployed"), "per_class_AP": per_class or None,
            "confusion": confusion_of(metrics),
            "precision": metrics.get("precision"), "machine": describe(machine_info(), metrics.get("hardware")),
            "date": dt.date.today().isoformat()}


def done(ledger: Mapping[str, Any], arm: str, seed: int, a: argparse.Namespace) -> bool:
    return (ledger["runs"].get(key(arm, seed)) or {}).get("fingerprint") == fingerprint(recipe(arm, seed, a))


def at_working_size(a: argparse.Namespace) -> None:
    """Point ``a``'s COCO files at copies downscaled to the protocol's ``working_size`` (long side),
    made once under ``<out>/data``: decoding and augmenting 2048 px photographs for a 480 px detector
    costs a CPU most of each step. A folder of unlabeled images is used as it is."""
    size = a.protocol.get("working_size")
    if not size:
        return
    detector = finetune_config(arm_settings("converge", a)).detector
    if int(size) < int(detector.max_size):
        raise SystemExit(f"working_size={size} is below the detector's max_size={detector.max_size}: every image "
                         "would be upsampled back (lower resolution than asked); raise working_size or set it null")
    from finetune.data.resize import resize_coco

    for what in ("train", "val", "unlabeled"):
        path = getattr(a, what)
        if path is not None and path.is_file():
            dst = a.out / "data" / f"{what}_{size}"
            done_json = dst / path.name
            setattr(a, what, done_json if done_json.is_file() else resize_coco(path, dst, int(size)))


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Every (seed, arm) of ``a`` not in the ledger: the converged run first, then its continuations."""
    pin_recipes(a)
    if any(not done(load_ledger(a.ledger), arm, s, a) for s in a.seeds for arm in a.arms):
        at_working_size(a)
    if a.variants:  # the table of a later run (or --report-only) without --variant keeps these rows
        update_ledger(a.ledger, lambda led: led.setdefault("variants", {}).update(a.variants))
    for seed in a.seeds:
        split = None
        for arm in a.arms:
            if done(load_ledger(a.ledger), arm, seed, a):
                continue
            split = split or split_of(seed, a)
            start = None
            if not is_converge(arm) and arm != "ceiling":  # needs the converged detector (run here if not yet)
                conv = run_arm("converge", seed, a, split)
                # and the other-seed detectors its semi.extra_teachers name
                extra = [run_arm(f"converge:{k}", seed, a, split) for k in teacher_seeds(arm, a)]
                if conv is None or None in extra:
                    print(f"== seed {seed}: another process is converging one of {arm}'s detectors; it runs later",
                          flush=True)
                    continue
                start = best_checkpoint_of(conv)
            run_arm(arm, seed, a, split, start)
    return load_ledger(a.ledger)


def run_dir_of(arm: str, seed: int, a: argparse.Namespace, under: str = "") -> Path:
    """Where a run of ``arm`` trains: its seed's folder (``under`` it, e.g. ``reproduce``), named by
    arm and recipe fingerprint."""
    return a.out / f"seed{seed}" / under / f"{arm.replace(':', '-')}_{fingerprint(recipe(arm, seed, a))}"


def run_arm(arm: str, seed: int, a: argparse.Namespace, split: Mapping[str, Path],
            start: Path | None = None) -> Path | None:
    """Run (or resume, or find done) one arm; its run dir, or None when another process holds it."""
    rec = recipe(arm, seed, a)
    run_dir = run_dir_of(arm, seed, a)
    if done(load_ledger(a.ledger), arm, seed, a) and (run_dir / "metrics.json").is_file():
        return run_dir
    with claimed(run_dir) as mine:
        if not mine:
            print(f"== {key(arm, seed)}: another benchmark process is running it, skipped", flush=True)
            return None
        conf_unchanged(arm, a)
        print(f"== {a.name} {key(arm, seed)} -> {run_dir}", flush=True)
        run_stage("finetune", run_dir, overrides(arm, seed, a, split, start))
    e = entry(json.loads((run_dir / "metrics.json").read_text()), rec)
    update_ledger(a.ledger, lambda led: led["runs"].__setitem__(key(arm, seed), e))
    return run_dir


def reproduce(which: str, a: argparse.Namespace) -> dict[str, Any]:
    """Run the ledger's run ``which`` (``ARM/seedN``) again into ``<out>/seedN/reproduce/``: the same
    recipe (fingerprint) and, for a continuation, the same converged checkpoint. Its figures go into
    the ledger's ``reproduced`` section (a finished reproduction is read, not run again; a killed one
    resumes). The ledger, updated."""
    arm, sep, seed_text = which.partition("/seed")
    if not sep or not seed_text.isdigit():
        raise SystemExit(f"--reproduce {which!r}: give ARM/seedN, e.g. labeled/seed1")
    seed = int(seed_text)
    if arm not in table_arms(a):
        raise SystemExit(f"--reproduce {which}: {arm} is not one of {', '.join(table_arms(a))}")
    pin_recipes(a)
    if not done(load_ledger(a.ledger), arm, seed, a):
        raise SystemExit(f"--reproduce {which}: the ledger {a.ledger} has no run of it at today's recipe; run it first "
                         f"(--seeds {seed} --arms {arm})")
    at_working_size(a)  # after the fingerprint's data hash, which is of the files as given (as in run)
    split = split_of(seed, a)
    start = None
    if arm not in ("converge", "ceiling"):
        conv = run_dir_of("converge", seed, a)
        if not (conv / "metrics.json").is_file():
            raise SystemExit(f"--reproduce {which}: its converged start {conv} is gone; run --arms converge again")
        start = best_checkpoint_of(conv)
    rec = recipe(arm, seed, a)
    run_dir = run_dir_of(arm, seed, a, "reproduce")
    if not (run_dir / "metrics.json").is_file():
        with claimed(run_dir) as mine:
            if not mine:
                raise SystemExit(f"--reproduce {which}: another process is running {run_dir}")
            conf_unchanged(arm, a)
            print(f"== {a.name} reproduce {key(arm, seed)} -> {run_dir}", flush=True)
            run_stage("finetune", run_dir, overrides(arm, seed, a, split, start))
    recorded = (load_ledger(a.ledger).get("reproduced") or {}).get(key(arm, seed))
    if recorded and recorded["fingerprint"] == fingerprint(rec):
        return load_ledger(a.ledger)  # read, not stamped again with today's date and machine
    e = entry(json.loads((run_dir / "metrics.json").read_text()), rec)
    return update_ledger(a.ledger, lambda led: led.setdefault("reproduced", {}).__setitem__(key(arm, seed), e))


def reproductions(ledger: Mapping[str, Any], runs: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    """One sentence per reproduced run at today's recipe: its AP run again against the ledger's, and
    whether the difference stays within the arm's std over its seeds. ``runs``: the table's runs at
    today's recipe, by arm and seed."""
    out = []
    for k, again in sorted((ledger.get("reproduced") or {}).items()):
        arm, _, seed = k.partition("/seed")
        first = runs.get(arm, {}).get(int(seed))
        if not first or again.get("AP") is None or first.get("AP") is None:
            continue
        if again["fingerprint"] != first["fingerprint"]:
            continue
        aps = [e["AP"] for e in runs[arm].values() if e["AP"] is not None]
        d = again["AP"] - first["AP"]
        # the same seed is the same split, init and data order: only the arithmetic's order can differ
        same = [tuple(x) for x in again.get("curve") or []] == [tuple(x) for x in first.get("curve") or []]
        curve = "its validation curve identical" if same else "its validation curve differs"
        if len(aps) > 1:
            sd = statistics.stdev(aps)
            word = "within" if abs(d) <= sd else "outside"
            tail = f"{word} the arm's std over {len(aps)} seeds ({sd * 100:.1f})"
        else:
            tail = "no std to weigh it against before 2 seeds"
        how = "trained again from scratch" if arm in ("converge", "ceiling") else \
            "continued again from the same converged checkpoint"
        out.append(f"Reproduced: `{k}` {how} ends at AP {again['AP'] * 100:.1f} against the ledger's "
                   f"{first['AP'] * 100:.1f} ({d * 100:+.1f}, {curve}), {tail}; {again['machine']}, {again['date']}.")
    return out


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "-" if x is None else f"{x * scale:.1f}"


def table(ledger: Mapping[str, Any], a: argparse.Namespace, command: str) -> str:
    """The markdown table: each arm's final AP (deployed and student) as mean +- std over the seeds,
    the paired difference to labeled-only continued, pseudo-label health, seconds per step, a verdict."""
    arms = table_arms(a)
    runs = {arm: {s: ledger["runs"][key(arm, s)] for s in a.seeds if done(ledger, arm, s, a)} for arm in arms}
    base, conv = runs["labeled"], runs["converge"]
    lines = [f"### {a.name}\n",
             "| arm | seeds | AP | AP50 | student AP | AP - labeled (paired) | pseudo P / R | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    spread: dict[str, float] = {}
    diffs: dict[str, list[float]] = {}
    for arm in arms:
        r = runs[arm]
        if not r:
            continue
        ap = {s: e["AP"] for s, e in r.items() if e["AP"] is not None}
        common = [s for s in ap if s in base and base[s]["AP"] is not None]
        d = [ap[s] - base[s]["AP"] for s in common]
        if arm != "labeled" and d:
            diffs[arm] = d
            spread[arm] = max(statistics.stdev([ap[s] for s in common]) if len(common) > 1 else 0.0,
                              statistics.stdev([base[s]["AP"] for s in common]) if len(common) > 1 else 0.0)
        stud = [e["student_AP"] for e in r.values() if e.get("student_AP") is not None]
        prec = [e["pseudo_precision"] for e in r.values() if e.get("pseudo_precision") is not None]
        rec_ = [e["pseudo_recall"] for e in r.values() if e.get("pseudo_recall") is not None]
        sps = [e["s_per_step"] for e in r.values() if e.get("s_per_step")]
        health = f"{_fmt(statistics.mean(prec))} / {_fmt(statistics.mean(rec_))}" if prec and rec_ else "-"
        lines.append(f"| {arm} | {len(r)} | {mean_std(list(ap.values()))} "
                     f"| {mean_std([e['AP50'] for e in r.values() if e['AP50'] is not None])} "
                     f"| {mean_std(stud) if stud else '-'} "
                     f"| {mean_std(d) if arm != 'labeled' and d else '-'} | {health} "
                     f"| {f'{statistics.mean(sps):.2f}' if sps else '-'} |")
    if conv:
        gains = [e["curve"][-1][1] - e["curve"][-3][1] for e in conv.values() if len(e["curve"]) >= 3]
        if gains:
            lines.append(f"\nConvergence: the labeled-only run gained {mean_std(gains)} AP over its last third "
                         "(two validations); near 0 is a plateau, the start of every continuation.")
    start = [base[s]["AP"] - conv[s]["best_AP"] for s in base if s in conv and base[s]["AP"] is not None]
    if start:
        m = statistics.mean(start)
        # converge's best is a maximum over its validations (biased up): only a fall beyond the spread counts
        noise = statistics.stdev([base[s]["AP"] for s in base]) if len(base) > 1 else 0.0
        lines.append(f"\nLabeled-only continued ends {m * 100:+.1f} AP from the checkpoint it started at (the "
                     f"converged run's best validation; {len(start)} seed{'s' if len(start) > 1 else ''}): "
                     + ("the continuation's LR keeps what convergence reached." if m >= -noise else
                        "it fell, so the continuation's LR is too high for this set (lower continue_lr_factor)."))
    def paired(of: Sequence[str], against: str) -> dict[str, list[float]]:
        """AP differences of each arm in ``of`` to ``against`` over the seeds both have."""
        out = {}
        for arm in of:
            d = [runs[arm][s]["AP"] - runs[against][s]["AP"] for s in runs[arm]
                 if s in runs[against] and runs[arm][s]["AP"] is not None and runs[against][s]["AP"] is not None]
            if d:
                out[arm] = d
        return out

    # each semi arm against labeled-only at equal wall time; a variant against the protocol's semi arm
    vs_time = paired([x for x in arms if x.startswith("semi")], "labeled_time")
    vs_semi = paired([x for x in arms if x.startswith("semi:")], "semi")
    vs_control = paired([x for x in arms if x.startswith("semi")], "control")
    lines.append("")
    time_steps = (round(statistics.mean(e["steps"] for e in runs["labeled_time"].values()))
                  if runs["labeled_time"] else continuation_steps("labeled_time", a))  # as run (whole epochs)
    lines.append(verdict(diffs, spread, vs_semi, vs_time, time_steps, vs_control))
    lines += per_class_table(runs, diffs)
    again = reproductions(ledger, runs)
    if again:
        lines.append("\n" + " ".join(again))
    p = a.protocol
    lines.append(f"\nCommand: `{command}`. Protocol `conf/bench/semi.yaml`: converge {p['converge_epochs']} epochs "
                 f"of the labeled set, then {p['continue_steps']} steps at {p['continue_lr_factor']} x the LR, "
                 f"`{p['finetune']} {a.args}`".rstrip() + f"; semi arm `{p['semi']}`"
                 + "".join(f"; `semi:{n}` adds `{o}`" for n, o in a.variants.items() if runs.get(f"semi:{n}"))
                 + ".")  # the variants with a row in this table
    machines = sorted({e["machine"] for r in runs.values() for e in r.values()})
    dates = sorted({e["date"] for r in runs.values() for e in r.values()})
    if machines:
        lines.append(f"Machine: {'; '.join(machines)}. Dates: {dates[0]} to {dates[-1]}.")
    return "\n".join(lines) + "\n"


def confusion_of(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The classes, counts, IoU and score floor of a run's confusion matrix (what the ledger keeps of
    it), or None."""
    c = metrics.get("confusion")
    return {k: c[k] for k in ("classes", "matrix", "iou", "score")} if c else None


def named_right(confusion: Mapping[str, Any]) -> float | None:
    """Of the objects a model boxes at all (matched by a detection of any class), the share boxed under
    their own class; None when it boxes none."""
    m, k = confusion["matrix"], len(confusion["classes"])
    found = sum(sum(m[t][:k]) for t in range(k))
    return sum(m[t][t] for t in range(k)) / found if found else None


def per_class_table(runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
                    diffs: Mapping[str, list[float]]) -> list[str]:
    """Where the best semi arm (the highest mean paired AP difference) gains and where it does not: per
    class, labeled-only continued's AP and the paired difference of the control, that arm and the
    oracle, averaged over the seeds where both runs recorded per-class AP (ledger entries from before
    the figure was recorded have none). An arm paired on one seed is a candidate only when no arm has
    two. Empty when the best arm has no such seed. A last row, where the runs kept their confusion
    matrix: the share of the objects boxed that are boxed under their own class (:func:`named_right`),
    labeled-only's and each arm's paired difference."""
    semis = [arm for arm in diffs if arm.startswith("semi")]
    semis = [arm for arm in semis if len(diffs[arm]) > 1] or semis
    if not semis:
        return []
    best = max(semis, key=lambda arm: statistics.mean(diffs[arm]))
    base = {s: e["per_class_AP"] for s, e in runs["labeled"].items() if e.get("per_class_AP")}

    def seeds_of(arm: str) -> list[int]:
        return sorted(s for s, e in runs.get(arm, {}).items() if e.get("per_class_AP") and s in base)

    def gains(arm: str) -> dict[str, float]:
        seeds = seeds_of(arm)
        return {c: statistics.mean(runs[arm][s]["per_class_AP"][c] - base[s][c] for s in seeds)
                for c in base[seeds[0]] if all(c in runs[arm][s]["per_class_AP"] for s in seeds)} if seeds else {}

    own = seeds_of(best)
    if not own:
        return []
    cols = [arm for arm in ("control", best, "oracle") if seeds_of(arm)]
    shown = {arm: gains(arm) for arm in cols}
    lines = [f"\nPer class: labeled-only continued's AP over `{best}`'s seeds ({', '.join(map(str, own))}; the "
             "semi arm with the largest mean gain), and each arm's paired AP difference to it over the seeds "
             "where both recorded per-class AP (" + ", ".join(f"`{arm}` {', '.join(map(str, seeds_of(arm)))}"
                                                       for arm in cols) + ").\n",
             "| class | labeled | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for c in sorted(shown[best]):
        lab = statistics.mean(base[s][c] for s in own)
        cells = [f"{shown[arm][c] * 100:+.1f}" if c in shown[arm] else "-" for arm in cols]
        lines.append(f"| {c} | {lab * 100:.1f} | " + " | ".join(cells) + " |")
    right: dict[str, dict[int, float]] = {}
    for arm in ("labeled", *cols):
        shares = {s: named_right(e["confusion"]) for s, e in runs.get(arm, {}).items() if e.get("confusion")}
        right[arm] = {s: v for s, v in shares.items() if v is not None}
    own_right = [s for s in own if s in right["labeled"]]
    if own_right:
        def shift(arm: str) -> str:
            seeds = [s for s in right[arm] if s in right["labeled"]]
            return (f"{statistics.mean(right[arm][s] - right['labeled'][s] for s in seeds) * 100:+.1f} "
                    f"({len(seeds)})" if seeds else "-")
        lab = statistics.mean(right["labeled"][s] for s in own_right) * 100
        lines.append(f"| *named right* | {lab:.1f} ({len(own_right)}) | " + " | ".join(shift(arm) for arm in cols)
                     + " |")
        used = {(e["confusion"].get("score"), e["confusion"].get("iou"))
                for arm in ("labeled", *cols) for e in runs.get(arm, {}).values() if e.get("confusion")}
        score, iou = next(iter(used)) if len(used) == 1 else (None, None)
        at = (f"at score >= {score:g} (IoU {iou:g}, any class)" if score is not None and iou is not None
              else "at each run's recorded score and IoU")
        lines.append(f"\n*named right*: of the validation objects a run's best checkpoint boxes {at}, the share "
                     "boxed under their own class (its confusion matrix, `finetune.confusion`), in % and, for the "
                     "arms, the paired difference; in brackets the seeds that recorded it.")
    return lines


def table_arms(a: argparse.Namespace) -> list[str]:
    """The table's rows: the protocol's arms with each ``--variant`` after ``semi``, and after ``converge``
    the other-seed detectors (``converge:K``) that the variants name."""
    out = []
    for arm in ARMS:
        out.append(arm)
        if arm == "converge":
            out += [f"converge:{k}" for k in sorted({k for n in a.variants for k in teacher_seeds(f"semi:{n}", a)})]
        if arm == "labeled":
            out += list(EXTRA_ARMS)
        if arm == "semi":
            out += [f"semi:{n}" for n in a.variants]
    return out


def verdict(diffs: Mapping[str, list[float]], spread: Mapping[str, float],
            vs_semi: Mapping[str, list[float]] | None = None, vs_time: Mapping[str, list[float]] | None = None,
            time_steps: int | None = None, vs_control: Mapping[str, list[float]] | None = None) -> str:
    """What the table says, from its own numbers: a gain counts when the mean paired difference
    exceeds the larger of the two arms' std over the seeds (the splits' spread) and every seed agrees
    (all but one from 5 seeds on); one inside that spread but beyond the std of the paired differences
    themselves, with the seeds agreeing, is said to be so with both figures (the splits differ more
    than the arms do on each); a mean beyond the spread that not enough seeds agree with is said to be
    only that.
    ``vs_semi``: each variant's paired AP differences to the protocol's semi arm; ``vs_time``: each semi
    arm's to labeled-only continued for ``time_steps`` steps (equal wall time); ``vs_control``: each
    semi arm's to the control on the seeds both have (what the unlabeled images add)."""
    def paired_ap(d: list[float]) -> str:
        sd = f" +- {statistics.stdev(d) * 100:.1f}" if len(d) > 1 else ""
        return f"{statistics.mean(d) * 100:+.1f}{sd} AP (paired, {len(d)} seed{'s' if len(d) > 1 else ''})."

    out = []
    variants = [(arm, f"Teacher-student training with `{arm}`") for arm in diffs if arm.startswith("semi:")]
    for arm, what in (("semi", "Teacher-student training"), *variants,
                      ("control", "The control (EMA teacher, no unlabeled loss)"),
                      ("oracle", "The oracle (the continuation on every image's true labels)"),
                      ("ceiling", "The 100%-label ceiling")):
        if arm not in diffs:
            continue
        m, s = statistics.mean(diffs[arm]), spread[arm]
        if len(diffs[arm]) < 2:  # one pair has no spread to weigh a difference against
            out.append(f"{what}: {m * 100:+.1f} AP against labeled-only continued on 1 seed (no verdict before 2).")
            continue
        n, sd = len(diffs[arm]), statistics.stdev(diffs[arm])
        side = "ahead" if m >= 0 else "behind"
        count = sum(x > 0 for x in diffs[arm]) if m >= 0 else sum(x < 0 for x in diffs[arm])
        # the same sign on every seed (all but one from 5 seeds on), and a mean the table can print
        consistent = count >= n - (n >= 5) and abs(m) >= 0.0005
        word, tail = "is within the spread of", f"spread {s * 100:.1f}"
        if abs(m) > s and consistent:
            word = "beats" if m > 0 else "falls below"
        elif abs(m) > s:  # a mean beyond the spread that one seed carries
            word = "is above" if m > 0 else "is below"
            tail = f"{'not every seed agrees' if n < 5 else 'two seeds or more disagree'}; spread {s * 100:.1f}"
        elif consistent and abs(m) > sd:
            word = "is ahead of" if m > 0 else "is behind"
            tail = f"beyond its paired std, within the splits' spread {s * 100:.1f}"
        out.append(f"{what} {word} labeled-only continued: {m * 100:+.1f} +- {sd * 100:.1f} AP (paired, "
                   f"{n} seeds, {side} in {count}; {tail}).")
    for arm, d in (vs_control or {}).items():
        name = "" if arm == "semi" else f" (`{arm}`)"
        out.append(f"What the unlabeled images add beyond the control{name}: {paired_ap(d)}")
    for arm, d in (vs_time or {}).items():
        out.append(f"`{arm}` against labeled-only continued for {time_steps} steps (equal wall time): {paired_ap(d)}")
    for arm, d in (vs_semi or {}).items():
        out.append(f"`{arm}` against `semi` on the same seeds: {paired_ap(d)}")
    if "oracle" in diffs and statistics.mean(diffs["oracle"]) <= spread["oracle"]:
        out.append("The oracle is not clearly above labeled-only: within this continuation's LR and steps even "
                   "perfect pseudo-labels add little, so the budget, not the pseudo-labels, limits every semi arm.")
    if "ceiling" in diffs and statistics.mean(diffs["ceiling"]) <= spread["ceiling"]:
        out.append("The ceiling is not clearly above labeled-only at this budget: no semi method can show a gain here.")
    return " ".join(out) or "No paired runs yet."


SEMI_HEAD = ("## Teacher-student: converge, then continue\n\nWritten by `scripts/bench_semi.py --benchmarks "
             "BENCHMARKS.md` from the ledger in `benchmarks/semi/`; the protocol is the script's docstring and "
             "`conf/bench/semi.yaml`. AP is the last validation's (the deployed model's: the EMA teacher for "
             "semi and control), mean +- std over the seeds; the paired difference is to labeled-only "
             "continued on the same seeds. s/step is each run's training time per step as it ran: the "
             "benchmark's runs share the machine (one torch thread each, several at a time), so it is a "
             "rough cost, not a speed figure (`make bench` measures speed).\n")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    proto = load_protocol()
    p.add_argument("--dataset", choices=tuple(proto["datasets"]), default=None, help="a built-in dataset")
    p.add_argument("--train", type=Path, help="COCO JSON: the labeled pool (split by the protocol's fraction) "
                   "or, with --unlabeled, the labeled set")
    p.add_argument("--val", type=Path, help="COCO JSON: the validation set")
    p.add_argument("--unlabeled", type=Path, default=None, help="a folder of images or a COCO JSON")
    p.add_argument("--name", default=None,
                   help="the ledger's and table's name (default: the dataset's or --train's folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=None,  # converge:K as well (see TEACHER_TOKEN)
                   help=f"of {', '.join(ARMS)}, semi:NAME for each --variant (default: these) and the opt-in "
                        f"{', '.join(EXTRA_ARMS)} (labeled-only at the semi arm's wall time; the continuation on "
                        "every image's true labels)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an extra semi arm `semi:NAME`: the protocol's semi recipe plus these Hydra overrides, e.g. "
                        "--variant erase=semi.strong_view=soft_teacher (repeatable; its own ledger rows)")
    p.add_argument("--args", default=None, help="Hydra overrides added to every run (default: the dataset's)")
    p.add_argument("--protocol", type=Path, default=PROTOCOL, help="the protocol's YAML (default conf/bench/semi.yaml)")
    p.add_argument("--out", type=Path, default=None, help="run directories (default outputs/bench_semi/<name>)")
    p.add_argument("--ledger", type=Path, default=None, help="default benchmarks/semi/<name>.json")
    p.add_argument("--benchmarks", type=Path, default=None, help="write the table into this markdown file")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table from the ledger")
    p.add_argument("--reproduce", metavar="ARM/seedN", default=None,
                   help="run this ledger run again in its own directory (a continuation from the same converged "
                        "checkpoint) and compare its AP with the ledger's (e.g. semi/seed1); nothing else runs")
    a = p.parse_args(argv)
    a.protocol = load_protocol(a.protocol)
    a.variants = {}
    for v in a.variant:
        name, sep, extra = v.partition("=")
        if not sep or not name or not extra.strip() or not name.replace("_", "").replace("-", "").isalnum():
            p.error(f"--variant {v!r}: give NAME=OVERRIDES (NAME letters, digits, - or _)")
        if name in a.variants:
            p.error(f"--variant {name} is given twice")
        a.variants[name] = extra.strip()
    if a.reproduce and a.report_only:
        p.error("--reproduce trains a run; --report-only runs nothing: give one of them")
    a.pending_arms = a.arms  # checked once the ledger (and its recorded variants) is known
    if a.dataset and (a.train or a.val):
        p.error("give --dataset or --train/--val, not both")
    if a.dataset:
        ds = a.protocol["datasets"][a.dataset]
        base = synthetic_root(ds["synthetic"]) if ds.get("synthetic") else SHARED
        a.train, a.val = base / ds["train"], base / ds["val"]
        if ds.get("unlabeled") and a.unlabeled is None:
            a.unlabeled = base / ds["unlabeled"]
        a.args = ds.get("args", "") if a.args is None else a.args
        a.name = a.name or a.dataset
        # A dataset's own budget or working size (e.g. small synthetic scenes) replaces the protocol's.
        a.protocol.update({k: v for k, v in ds.items() if k in PER_DATASET})
    elif a.train is None or a.val is None:
        p.error("give --dataset, or --train and --val (COCO JSON)")
    a.args = a.args or ""
    for what in ("train", "val", "unlabeled"):
        path = getattr(a, what)
        if path is not None and not path.exists():
            p.error(f"--{what} {path} does not exist")
    a.name = a.name or a.train.resolve().parent.name
    a.train, a.val = a.train.resolve(), a.val.resolve()
    a.unlabeled = a.unlabeled.resolve() if a.unlabeled is not None else None
    a.out = (a.out or REPO / "outputs" / "bench_semi" / a.name).resolve()
    a.ledger = a.ledger or REPO / "benchmarks" / "semi" / f"{a.name}.json"
    recorded = load_ledger(a.ledger).get("variants", {})
    a.variants = {**{k: v for k, v in recorded.items() if k not in a.variants}, **a.variants}
    known = [*ARMS, *EXTRA_ARMS, *(f"semi:{n}" for n in a.variants)]
    a.arms = a.pending_arms or [arm for arm in known if arm not in EXTRA_ARMS]
    for arm in a.arms:
        if is_converge(arm):
            continue
        if arm not in known:
            p.error(f"--arms {arm}: not one of {', '.join(known)}")
    if a.unlabeled is not None and {"ceiling", "oracle"} & set(a.arms) and not has_boxes(a.unlabeled):
        a.arms = [x for x in a.arms if x not in ("ceiling", "oracle")]  # no labels beyond --train: nothing to reach
        print("no ceiling or oracle arm: the --unlabeled images have no (hidden) labels to train a 100% arm on")
    return a


def main(argv: Sequence[str] | None = None) -> None:
    a = parse(argv)
    if a.reproduce:
        ledger = reproduce(a.reproduce, a)
    else:
        ledger = load_ledger(a.ledger) if a.report_only else run(a)
    args = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--report-only"]
    if a.reproduce:  # the table's command is the one that makes the ledger, not the reproduction's
        kept: list[str] = []
        it = iter(args)
        for x in it:
            if x == "--reproduce":
                next(it, None)
            elif not x.startswith("--reproduce="):
                kept.append(x)
        args = kept
    text = table(ledger, a, " ".join(shlex.quote(x) for x in ["python", "scripts/bench_semi.py", *args]))
    print("\n" + text)
    if a.benchmarks is not None:
        put_section(a.benchmarks, text, "semi_continue", a.name, "## Teacher-student", SEMI_HEAD)
        print(f"updated {a.benchmarks}")


if __name__ == "__main__":
    main()
