"""Chaining the stages: pretrain, finetune (passing the exported backbone file explicitly), semi.

Each stage runs as its own process (``python -m pretrain`` / ``python -m finetune``) in
its own run directory, exactly as a user would run it by hand: memory is returned
between stages, every stage keeps its own resolved config and logs, and re-running
the chain resumes or skips what is already done.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
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


def run_stage(stage: str, run_dir: str | Path, overrides: Sequence[str] = (), force: bool = False) -> Path:
    """Run ``python -m <stage>`` in ``run_dir`` with Hydra ``overrides``.

    A finished stage is skipped (``force`` re-runs it); an interrupted one resumes
    from its ``last.ckpt`` because the stage itself resumes in a run dir it finds one in.
    """
    run_dir = Path(run_dir).resolve()
    if stage_done(stage, run_dir) and not force:
        log.info("%s already done in %s: skipped (remove metrics.json to redo)", stage, run_dir)
        print(f"[pipeline] {stage}: already done in {run_dir}, skipped", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", stage, f"hydra.run.dir={quote(run_dir)}", *overrides]
    print(f"[pipeline] {stage}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise StageFailed(
            f"{stage} failed (exit {result.returncode}) in {run_dir}; see its log there. "
            "Fix the cause and re-run the same command: finished stages are skipped and "
            "the failed one resumes from its last checkpoint."
        )
    return run_dir


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
) -> dict[str, Path]:
    """pretrain -> finetune from its backbone (-> the same finetune from random init) (-> semi).

    Returns the run directory of each stage: ``pretrain``, ``finetune``; with ``baseline``,
    ``baseline`` (identical fine-tuning overrides, no checkpoint); with ``semi`` (Hydra overrides
    such as ``["semi=unbiased_teacher"]``), a teacher-student run that starts from each fine-tuned
    detector named in ``semi_from`` (``init_from=<its best.ckpt>``, so its burn-in is that
    fine-tuning): ``semi`` after ``finetune``, ``baseline_semi`` after ``baseline``.
    """
    out = Path(out_dir).resolve()
    dirs: dict[str, Path] = {}
    if not skip_pretrain:
        dirs["pretrain"] = run_stage("pretrain", out / "pretrain", pretrain)
        ckpt = [f"backbone.checkpoint={quote(backbone_of(dirs['pretrain']))}"]
        dirs["finetune"] = run_stage("finetune", out / "finetune", [*finetune, *ckpt])
    if baseline or skip_pretrain:
        dirs["baseline"] = run_stage("finetune", out / "baseline", [*finetune, "backbone.checkpoint=null"])
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
