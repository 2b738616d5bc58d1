"""Phase 3 of the GPU check: the accuracy benchmarks' two protocols at budgets a CPU cannot afford.

- SSL against random init: scripts/bench_ssl.py's protocol, recipes and ledger format (its functions
  run it), with GPU-scale pretraining: the same SimCLR recipe at batch 256 for as many epochs of the
  10k scenes as fit ``--pretrain-s`` seconds (a 2-epoch run times an epoch first), then the
  benchmark's own fine-tuning at 20 and 100 labels, 5 seeds, every arm (random, ssl, ssl_lpft,
  ssl_frozen). The CPU ledger (benchmarks/ssl/synthetic.json) pretrained 3744 steps of batch 64.
- labeled only against semi: scripts/bench_semi.py's converge-then-continue protocol (its
  conf/bench/semi.yaml, experiment=semi_bench and semi=bench unchanged) on the same synthetic set at
  the scenes' own 128 px: its 100 labeled scenes and its 10k unlabeled ones, 5 seeds, arms converge,
  semi, labeled and control (no ceiling: the 10k have no labels to train a 100% arm on).

Runs go in priority order, several at a time on the one GPU, until the check's deadline; every
finished run is in the ledgers at once (a cut-off run keeps them). Each job is a child process::

    python scripts/gpu_check_accuracy.py data --work W [--toy]
    python scripts/gpu_check_accuracy.py pretrain --work W --pretrain-s 90 [--toy]
    python scripts/gpu_check_accuracy.py ssl --work W --arm ssl --labels 20 --seed 0 [--toy]
    python scripts/gpu_check_accuracy.py semi --work W --arm semi --seed 1 [--toy]

``--toy`` is the CPU dry run: the same code on experiment=smoke's tiny set and schedules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bench_semi
import bench_ssl
import yaml
from gpu_check_jobs import REPO, RESULT, CheckFailed, Job, result_of
from pytorch_lightning.loggers import Logger

from finetune.pipeline import run_stage

ME = str(Path(__file__).resolve())
SEEDS = {"gpu": (0, 1, 2, 3, 4), "toy": (0, 1)}
SEMI_SEEDS = {"gpu": (1, 2, 3, 4, 5), "toy": (1,)}
SSL_ARMS = {"gpu": bench_ssl.ARMS, "toy": ("random", "ssl")}
SEMI_ARMS = ("converge", "semi", "labeled", "control")  # bench_semi's, less the ceiling
# GPU-scale pretraining: bench_ssl's SimCLR recipe at batch 256 (the LR follows base_lr * batch / 256),
# its epochs set by the measured budget, the kNN probe a few times per run rather than every epoch.
GPU_PRETRAIN_EXTRA = ("trainer.accelerator=gpu", "data.batch_size=256")
EPOCHS = {"gpu": (8, 400), "toy": (1, 2)}  # the calibrated epochs are clamped to this range
# The dry run: experiment=smoke's 32 unlabeled, 8 labeled and 4 validation scenes, schedules of steps.
TOY_PRETRAIN = ("method=simclr experiment=smoke trainer.max_epochs=24 checkpoint_every_n_steps=100 "
                "trainer.enable_progress_bar=false")
TOY_FINETUNE = "experiment=smoke detector=fasterrcnn_cpu eval.plots=false trainer.limit_train_batches=null"
# bench_semi on the SSL set's scenes at their own size (experiment=semi_bench is sized for photographs).
SEMI_ARGS = {"gpu": "detector.min_size=128 detector.max_size=128",
             "toy": "detector.min_size=96 detector.max_size=128 data.batch_size=2"}
COMMAND = "bash scripts/gpu_check.sh (phase 3)"  # what the tables name as their command
TOY_PROTOCOL = {"converge_epochs": 2, "continue_steps": 2, "validations": 1}  # conf/bench/semi.yaml, shortened


def smoke_set(out: Path | None = None) -> dict[str, Path]:
    """experiment=smoke's tiny set, in the form bench_ssl's datasets prepare theirs."""
    from pretrain.core.data.synthetic import ensure_synthetic

    conf = yaml.safe_load((REPO / "conf" / "shared" / "synthetic" / "smoke.yaml").read_text())
    root = (REPO / conf["synthetic_dir"]).resolve()
    made = ensure_synthetic(root, **conf["synthetic"])
    return {"train": Path(made["train_json"]).resolve(), "val": Path(made["val_json"]).resolve(), "root": root}


def toy() -> None:
    """bench_ssl's synthetic dataset replaced by experiment=smoke's set: 4 labels, 4 steps, its recipes."""
    bench_ssl.DATASETS["synthetic"] = bench_ssl.SslData(smoke_set, TOY_PRETRAIN, TOY_FINETUNE, (4,), {4: 4})


def ssl_data() -> bench_ssl.SslData:
    return bench_ssl.DATASETS["synthetic"]


def ledgers(work: Path) -> dict[str, Path]:
    """The two ledgers the phase writes (the check copies them into OUT after every run)."""
    return {"ssl": work / "ssl_ledger.json", "semi": work / "semi_ledger.json"}


def with_epochs(recipe: str, epochs: int, validations: int = 4) -> str:
    """``recipe`` with ``trainer.max_epochs`` set to ``epochs`` and the kNN probe ``validations`` times."""
    kept = [t for t in shlex.split(recipe)
            if not t.startswith(("trainer.max_epochs=", "trainer.check_val_every_n_epoch="))]
    return " ".join([*kept, f"trainer.max_epochs={epochs}",
                     f"trainer.check_val_every_n_epoch={max(1, epochs // validations)}"])


def ssl_argv(size: str, work: Path, pretrain: str, arms: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, seeds: Sequence[int] | None = None) -> list[str]:
    """bench_ssl's command line for these runs (the report rebuilds its table from the full one)."""
    finetune = ssl_data().finetune
    return ["--labels", *map(str, labels or ssl_data().labels), "--seeds", *map(str, seeds or SEEDS[size]),
            "--arms", *(arms or SSL_ARMS[size]), "--pretrain", pretrain, "--finetune", finetune,
            "--out", str(work / "ssl"), "--ledger", str(ledgers(work)["ssl"]),
            "--knn-gate", "-1" if size == "toy" else "0.05"]


def semi_argv(size: str, work: Path, arm: str | None = None, seed: int | None = None) -> list[str]:
    """bench_semi's command line for one arm and seed, or for the whole table (``arm`` None)."""
    root = ssl_data().prepare(work / "ssl")["root"]
    argv = ["--train", str(root / "train.json"), "--unlabeled", str(root / "unlabeled.json"),
            "--val", str(root / "val.json"), "--name", f"{root.name}_gpu" if size == "gpu" else root.name,
            "--args", SEMI_ARGS[size], "--out", str(work / "semi"), "--ledger", str(ledgers(work)["semi"])]
    if size == "toy":
        argv += ["--protocol", str(work / "semi_protocol_toy.yaml")]
    if arm is None:
        return [*argv, "--arms", *SEMI_ARMS, "--seeds", *map(str, SEMI_SEEDS[size])]
    return [*argv, "--arms", arm, "--seeds", str(seed)]


def tables(size: str, work: Path, pretrain: str | None) -> dict[str, str]:
    """Both protocols' markdown tables of the runs so far, by the benchmarks' own table functions, on
    the machine that ran them (bench_semi fingerprints its data files by their content)."""
    out, led = {}, ledgers(work)
    if led["ssl"].is_file():  # before (or without) a pretraining, the random-init rows alone
        a = bench_ssl.parse(ssl_argv(size, work, pretrain or ssl_data().pretrain))
        out["ssl"] = bench_ssl.table(bench_ssl.load_ledger(led["ssl"]), a, COMMAND)
    if led["semi"].is_file():
        a = bench_semi.parse(semi_argv(size, work))
        out["semi"] = bench_semi.table(bench_semi.load_ledger(led["semi"]), a, COMMAND)
    return out


# --------------------------------------------------------------------------------------- children
def make_data(size: str, work: Path) -> dict[str, Any]:
    """The data (the 10k SSL scenes take minutes: the check starts this first, in the background), the
    SSL label splits and bench_semi's working copies, made once here so that parallel runs never
    write them at the same time."""
    data = ssl_data().prepare(work / "ssl")
    for n in ssl_data().labels:
        for s in SEEDS[size]:
            bench_ssl.labeled_json(data, n, s, work / "ssl")
    if size == "toy":
        protocol = {**bench_semi.load_protocol(), **TOY_PROTOCOL}
        (work / "semi_protocol_toy.yaml").write_text(yaml.safe_dump(protocol))
    a = bench_semi.parse(semi_argv(size, work))
    bench_semi.at_working_size(a)
    return {"ssl_root": str(data["root"]), "semi_train": str(a.train), "semi_unlabeled": str(a.unlabeled)}


class StepClock(Logger):
    """A Lightning logger (``logger.extra``) that keeps only when each logged step happened, in
    ``<run>/step_clock.json`` as ``[step, epoch, seconds]`` rows: what the pretraining budget is
    measured with (the first epoch decodes the images, later ones read them from memory)."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self.path = Path(save_dir) / "step_clock.json"
        self.rows: list[tuple[int, int, float]] = []

    @property
    def name(self) -> str:
        return "step_clock"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), int(metrics.get("epoch", -1)), time.monotonic()))
        self.path.write_text(json.dumps(self.rows))


def epoch_seconds(clock: Path, steps_per_epoch: int) -> tuple[float, float]:
    """(first epoch, a later epoch) in seconds, from :class:`StepClock`'s rows of a 2-epoch run: the
    training steps' rows only (the first row of each step; rows without an epoch are the LR monitor's,
    a step's later rows its validation's)."""
    by_epoch: dict[int, list[tuple[int, float]]] = {}
    seen: set[int] = set()
    for step, epoch, t in json.loads(clock.read_text()):
        if epoch >= 0 and step not in seen:
            seen.add(step)
            by_epoch.setdefault(epoch, []).append((step, t))

    def per_step(rows: list[tuple[int, float]]) -> float:
        if len(rows) < 2 or rows[-1][0] == rows[0][0]:
            raise ValueError(f"{clock}: too few logged steps in an epoch to time it ({rows})")
        return (rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0])

    return per_step(by_epoch[min(by_epoch)]) * steps_per_epoch, per_step(by_epoch[max(by_epoch)]) * steps_per_epoch


def pretrain(size: str, work: Path, budget_s: float) -> dict[str, Any]:
    """Time two epochs, then pretrain for the epochs that fit ``budget_s`` (bench_ssl's pretraining)."""
    base = ssl_data().pretrain if size == "toy" else " ".join([ssl_data().pretrain, *GPU_PRETRAIN_EXTRA])
    probe = run_stage("pretrain", work / "ssl_probe", [*shlex.split(with_epochs(base, 2, 1)),
                                                       "logger.extra=[{_target_: gpu_check_accuracy.StepClock}]"])
    m = json.loads((probe / "metrics.json").read_text())
    first_s, epoch_s = epoch_seconds(probe / "step_clock.json", int(m["global_step"]) // int(m["epochs"]))
    lo, hi = EPOCHS[size]
    epochs = int(min(hi, max(lo, 1 + math.floor((budget_s - first_s) / epoch_s))))
    recipe = with_epochs(base, epochs)
    a = bench_ssl.parse(ssl_argv(size, work, recipe))
    figures = {k: (str(v) if isinstance(v, Path) else v) for k, v in bench_ssl.pretraining(a).items()}
    bench_ssl.update_ledger(a.ledger, lambda led: led.__setitem__("pretrain", figures))
    m = json.loads((Path(figures["run_dir"]) / "metrics.json").read_text())
    out = {"pretrain": recipe, "epochs": epochs, "probe_epoch_s": [round(first_s, 2), round(epoch_s, 2)],
           "budget_s": budget_s, "view_pairs": m.get("images_seen"), "pretrain_s": m.get("wall_time_s"),
           "steps": m.get("global_step"), "precision": m.get("precision"), "knn": figures.get("knn"),
           "knn_random": figures.get("knn_random")}
    (work / "ssl_pretrain.json").write_text(json.dumps(out))
    return out


def ssl_run(size: str, work: Path, arm: str, n: int, seed: int) -> dict[str, Any]:
    """One bench_ssl run (arm, label count, seed) into the shared ledger (bench_ssl locks it)."""
    # random init's recipe has no pretraining in it (its fingerprint leaves it out): the base recipe stands in.
    recipe = (json.loads((work / "ssl_pretrain.json").read_text())["pretrain"] if arm != "random"
              else ssl_data().pretrain)
    a = bench_ssl.parse(ssl_argv(size, work, recipe, [arm], [n], [seed]))
    bench_ssl.run(a)
    entry = bench_ssl.load_ledger(a.ledger)["runs"].get(bench_ssl.key(arm, n, seed)) or {}
    if entry.get("fingerprint") != bench_ssl.fingerprint(bench_ssl.recipe(arm, n, seed, a)):
        raise SystemExit(f"no ledger entry for {bench_ssl.key(arm, n, seed)} (the kNN gate may have held it back)")
    return {k: entry.get(k) for k in ("AP", "AP50", "steps", "train_time_s", "precision")}


def semi_run(size: str, work: Path, arm: str, seed: int) -> dict[str, Any]:
    """One bench_semi run (arm, seed) into the shared ledger (bench_semi locks it)."""
    a = bench_semi.parse(semi_argv(size, work, arm, seed))
    bench_semi.run(a)
    ledger = bench_semi.load_ledger(a.ledger)
    if not bench_semi.done(ledger, arm, seed, a):
        raise SystemExit(f"no ledger entry for {bench_semi.key(arm, seed)}")
    entry = ledger["runs"][bench_semi.key(arm, seed)]
    return {k: entry.get(k) for k in ("AP", "AP50", "best_AP", "steps", "pseudo_precision", "pseudo_recall",
                                      "precision")}


# ----------------------------------------------------------------------------------------- driver
def check_entry(log: str) -> Mapping[str, Any]:
    """A run's RESULT must carry an AP."""
    r = result_of(log)
    if r.get("AP") is None:
        raise CheckFailed(f"no AP in {r}")
    return r


def jobs(size: str, work: Path, pretrain_s: float, threads: int) -> list[Job]:
    """Phase 3's runs in priority order: pretraining (the critical path), random init at the smallest
    label count and the semi protocol's converged detectors first, then the SSL arm there and the semi
    continuations, the larger label count, the semi control, LP-FT and frozen."""
    flag = ["--toy"] if size == "toy" else []
    common = [sys.executable, ME]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = 10 if size == "toy" else 45  # a run needs this much time left to be worth starting
    out = [Job("ssl_pretrain", [*common, "pretrain", "--work", str(work), "--pretrain-s", str(pretrain_s), *flag],
               10 * pretrain_s + 600, check=result_of, env=env)]

    def ssl(arm: str, n: int, s: int) -> Job:
        return Job(f"ssl_{arm}_n{n}_seed{s}", [*common, "ssl", "--work", str(work), "--arm", arm, "--labels", str(n),
                                               "--seed", str(s), *flag],
                   1800, needs=() if arm == "random" else ("ssl_pretrain",), check=check_entry, env=env,
                   min_start_s=start)

    def semi(arm: str, s: int) -> Job:
        return Job(f"semi_{arm}_seed{s}", [*common, "semi", "--work", str(work), "--arm", arm, "--seed", str(s),
                                           *flag],
                   1800, needs=() if arm == "converge" else (f"semi_converge_seed{s}",), check=check_entry, env=env,
                   min_start_s=start)

    labels, seeds, arms, semi_seeds = ssl_data().labels, SEEDS[size], SSL_ARMS[size], SEMI_SEEDS[size]
    out += [ssl("random", labels[0], s) for s in seeds]
    out += [semi("converge", s) for s in semi_seeds]
    out += [ssl("ssl", labels[0], s) for s in seeds]
    out += [semi(arm, s) for s in semi_seeds for arm in ("semi", "labeled")]
    for n in labels[1:]:
        out += [ssl(arm, n, s) for s in seeds for arm in ("random", "ssl")]
    out += [semi("control", s) for s in semi_seeds]
    for n in labels:
        out += [ssl(arm, n, s) for s in seeds for arm in arms if arm not in ("random", "ssl")]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("data", "pretrain", "ssl", "semi"))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--pretrain-s", type=float, default=90.0)
    p.add_argument("--arm")
    p.add_argument("--labels", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--toy", action="store_true")
    a = p.parse_args(argv)
    os.chdir(REPO)  # the synthetic sets' folders are relative to the repository
    # The stages it starts import this module's StepClock (logger.extra) and the benchmarks' modules.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "scripts"), str(REPO),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])
    size = "toy" if a.toy else "gpu"
    if a.toy:
        toy()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.what == "data":
        result = make_data(size, a.work)
    elif a.what == "pretrain":
        result = pretrain(size, a.work, a.pretrain_s)
    elif a.what == "ssl":
        result = ssl_run(size, a.work, a.arm, a.labels, a.seed)
    else:
        result = semi_run(size, a.work, a.arm, a.seed)
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
