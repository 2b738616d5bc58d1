"""Chaining the stages: pretrain, finetune (passing the exported backbone file explicitly), semi.

Each stage runs as its own process (``python -m pretrain`` / ``python -m finetune``) in
its own run directory, exactly as a user would run it by hand: memory is returned
between stages, every stage keeps its own resolved config and logs, and re-running
the chain resumes or skips what is already done.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
BACKBONE_FILE = "backbone.safetensors"


class StageFailed(RuntimeError):
    pass


def quote(value: str | Path) -> str:
    """Quote a value for a Hydra override so paths with odd characters survive."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def stage_done(stage: str, run_dir: Path) -> bool:
    """A stage is done when it left its final outputs (metrics, and the backbone for pretrain)."""
    if not (run_dir / "metrics.json").exists():
        return False
    return stage != "pretrain" or (run_dir / BACKBONE_FILE).exists()


def stage_command(stage: str, run_dir: Path, overrides: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", stage, f"hydra.run.dir={quote(run_dir)}", *overrides]


def thread_env(threads: int | None) -> dict[str, str] | None:
    """The environment of a stage limited to ``threads`` CPU threads (None: inherit everything).

    torch sizes its intra-op pool from OMP_NUM_THREADS at start-up; MKL and OpenBLAS follow theirs.
    """
    if threads is None:
        return None
    n = str(max(1, int(threads)))
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def _death_signal() -> Callable[[], None] | None:
    """Linux: a function for ``preexec_fn`` that makes the child get SIGTERM when the process that
    started it dies, so that a killed benchmark or pipeline leaves no orphan stage still writing into
    the run directory its re-run resumes into (two writers corrupt its checkpoints and logs).
    libc's ``prctl`` is looked up here, in the parent: the child, between fork and exec, only calls
    it (no import, no allocation), which is what makes ``preexec_fn`` safe beside threads."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sig = int(signal.SIGTERM)
    return lambda: prctl(1, sig)  # 1: PR_SET_PDEATHSIG


_DEATH_SIGNAL = _death_signal()


def start_stage(stage: str, run_dir: str | Path, overrides: Sequence[str] = (), force: bool = False,
                threads: int | None = None, log_file: str | Path | None = None) -> subprocess.Popen | None:
    """Start ``python -m <stage>`` in ``run_dir`` without waiting; None when it is already done.

    ``threads`` limits its CPU threads (two stages side by side on a small CPU); ``log_file``
    takes its stdout and stderr (so that two progress bars do not share one terminal).
    """
    run_dir = Path(run_dir).resolve()
    if stage_done(stage, run_dir) and not force:
        log.info("%s already done in %s: skipped (remove metrics.json to redo)", stage, run_dir)
        print(f"[pipeline] {stage}: already done in {run_dir}, skipped", flush=True)
        return None
    cmd = stage_command(stage, run_dir, overrides)
    limit = f" [{threads} thread{'s' if threads != 1 else ''}]" if threads is not None else ""
    where = f" (output in {log_file})" if log_file is not None else ""
    print(f"[pipeline] {stage}{limit}: {' '.join(cmd[1:])}{where}", flush=True)
    if log_file is None:
        return subprocess.Popen(cmd, env=thread_env(threads), preexec_fn=_DEATH_SIGNAL)  # noqa: PLW1509 (see _death_signal)
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:  # the child keeps its own copy of the handle
        return subprocess.Popen(cmd, env=thread_env(threads), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_DEATH_SIGNAL)  # noqa: PLW1509 (see _death_signal)


def wait_stage(proc: subprocess.Popen | None, stage: str, run_dir: str | Path) -> Path:
    """Wait for a stage started by :func:`start_stage`; StageFailed when it exits non-zero."""
    run_dir = Path(run_dir).resolve()
    if proc is None:
        return run_dir
    code = proc.wait()
    if code != 0:
        raise StageFailed(
            f"{stage} failed (exit {code}) in {run_dir}; see its log there. "
            "Fix the cause and re-run the same command: finished stages are skipped and "
            "the failed one resumes from its last checkpoint."
        )
    return run_dir


def run_stage(stage: str, run_dir: str | Path, overrides: Sequence[str] = (), force: bool = False) -> Path:
    """Run ``python -m <stage>`` in ``run_dir`` with Hydra ``overrides``.

    A finished stage is skipped (``force`` re-runs it); an interrupted one resumes
    from its ``last.ckpt`` because the stage itself resumes in a run dir it finds one in.
    """
    return wait_stage(start_stage(stage, run_dir, overrides, force=force), stage, run_dir)


def backbone_of(pretrain_dir: str | Path) -> Path:
    path = Path(pretrain_dir) / BACKBONE_FILE
    if not path.exists():
        raise StageFailed(f"pretraining in {pretrain_dir} left no {BACKBONE_FILE}")
    return path


def best_checkpoint_of(finetune_dir: str | Path) -> Path:
    """The fine-tuning run's best checkpoint (what its metrics.json evaluated)."""
    d = Path(finetune_dir)
    metrics = d / "metrics.json"
    if metrics.exists():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    for name in ("best.ckpt", "last.ckpt"):
        if (d / "checkpoints" / name).is_file():
            return d / "checkpoints" / name
    raise StageFailed(f"fine-tuning in {d} left no checkpoint")


def run_pipeline(
    out_dir: str | Path,
    pretrain: Sequence[str] = (),
    finetune: Sequence[str] = (),
    baseline: bool = False,
    skip_pretrain: bool = False,
    semi: Sequence[str] | None = None,
    semi_from: Sequence[str] = ("finetune",),
    parallel_threads: int | None = None,
) -> dict[str, Path]:
    """pretrain -> finetune from its backbone (-> the same finetune from random init) (-> semi).

    Returns the run directory of each stage: ``pretrain``, ``finetune``; with ``baseline``,
    ``baseline`` (identical fine-tuning overrides, no checkpoint); with ``semi`` (Hydra overrides
    such as ``["semi=unbiased_teacher"]``), a teacher-student run that starts from each fine-tuned
    detector named in ``semi_from`` (``init_from=<its best.ckpt>``, so its burn-in is that
    fine-tuning): ``semi`` after ``finetune``, ``baseline_semi`` after ``baseline``.

    ``parallel_threads`` (the threads the pipeline may use, 2 or more) runs the random-init baseline, which
    needs no backbone, side by side with pretraining, each on half the threads, its output in
    ``baseline/stage.log``; the later stages get all of them. On a small CPU two half-size
    processes get more done than one after the other: a Faster R-CNN step at 128 px takes 1.0 s
    on one thread of a 2-core EPYC against 0.73 s on two (scripts/demo.py's recipe).
    """
    out = Path(out_dir).resolve()
    dirs: dict[str, Path] = {}
    random_init = [*finetune, "backbone.checkpoint=null"]
    threads = parallel_threads or 1
    if not skip_pretrain:
        if threads >= 2 and baseline:
            half = threads // 2
            side = start_stage("finetune", out / "baseline", random_init, threads=half,
                               log_file=out / "baseline" / "stage.log")
            try:
                main = start_stage("pretrain", out / "pretrain", pretrain, threads=threads - half)
                dirs["pretrain"] = wait_stage(main, "pretrain", out / "pretrain")
            finally:  # a failed pretraining still lets the baseline finish (no work lost)
                dirs["baseline"] = wait_stage(side, "finetune", out / "baseline")
        else:
            dirs["pretrain"] = run_stage("pretrain", out / "pretrain", pretrain)
        ckpt = [f"backbone.checkpoint={quote(backbone_of(dirs['pretrain']))}"]
        dirs["finetune"] = run_stage("finetune", out / "finetune", [*finetune, *ckpt])
    if (baseline or skip_pretrain) and "baseline" not in dirs:
        dirs["baseline"] = run_stage("finetune", out / "baseline", random_init)
    if semi is not None:
        for src in semi_from:
            if src not in dirs:
                continue
            name = "semi" if src == "finetune" else f"{src}_semi"
            init = f"init_from={quote(best_checkpoint_of(dirs[src]))}"
            dirs[name] = run_stage("finetune", out / name, [*finetune, *semi, init])
    return dirs


class FinetuneAfterPretrain(Callback):
    """Hydra callback: after each pretraining job, fine-tune from its backbone.

    Makes a pretraining multirun a sweep of whole pipelines::

        python -m finetune.sweep -m method.num_prototypes=1000,2000 trainer.max_epochs=100,200

    Each job's fine-tune lands in ``<job dir>/finetune``. The pretraining job's
    ``experiment`` (smoke, demo, ...) is passed on to the fine-tune unless
    ``overrides`` names one: both stages define the same presets.
    """

    def __init__(self, overrides: Sequence[str] = (), baseline: bool = False) -> None:
        self.overrides = list(overrides)
        self.baseline = baseline

    def finetune_overrides(self, config: DictConfig) -> list[str]:
        experiment = config.hydra.runtime.choices.get("experiment")
        inherited = []
        if experiment not in (None, "null") and not any(o.startswith("experiment=") for o in self.overrides):
            inherited = [f"experiment={experiment}"]
        return [*inherited, *self.overrides]

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.COMPLETED:
            log.warning("pretraining in %s did not complete: no fine-tune", job_dir)
            return
        overrides = self.finetune_overrides(config)
        ckpt = [f"backbone.checkpoint={quote(backbone_of(job_dir))}"]
        run_stage("finetune", job_dir / "finetune", [*overrides, *ckpt])
        if self.baseline:
            run_stage("finetune", job_dir / "baseline", [*overrides, "backbone.checkpoint=null"])
