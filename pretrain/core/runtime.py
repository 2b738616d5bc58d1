"""Run-directory, resume and trainer plumbing shared by every entry point."""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pretrain.core import precision
from pretrain.core.safe_load import CorruptCheckpointError, load_torch_file

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


def hydra_run_dir() -> Path:
    """The current Hydra run (or multirun job) directory, or cwd outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/x.ckpt`` -> ``<run>``; a
    checkpoint elsewhere -> its own folder."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == CKPT_DIR else path.parent


LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a re-run in ``run_dir`` resumes from, or None for a fresh run.

    ``last.ckpt``, or ``last.prev.ckpt`` (the one before it, kept by :class:`AtomicCheckpointIO`)
    when ``last.ckpt`` is missing or unreadable. Writes are atomic, so a torn file should not
    happen; one found anyway (a full disk, a copy cut short) is reported, renamed to
    ``*.corrupt`` for inspection, and the previous checkpoint is used.

    Raises:
        UnsafeCheckpointError: a checkpoint here holds pickled code (never skipped silently).
    """
    folder = Path(run_dir) / CKPT_DIR
    for name in (LAST, PREVIOUS):
        p = folder / name
        if not p.exists():
            continue
        try:
            load_torch_file(p, "resume checkpoint", mmap=True)
        except CorruptCheckpointError as e:
            bad = p.with_name(p.name + ".corrupt")
            os.replace(p, bad)
            log.warning("%s; moved it to %s and looking for the checkpoint before it", e, bad)
            continue
        if name == PREVIOUS:
            log.warning("resuming from the previous checkpoint %s: %s was missing or unreadable", p, LAST)
        return p
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are never torn, read weights-only.

    A save writes ``<name>.tmp`` beside the target, fsyncs it and renames it over the target, so
    a kill at any moment leaves the old file or the new one, never half of one. (Lightning's own
    save goes through an fsspec transaction whose temporary file lives in the system temp folder;
    on another filesystem its final move is a copy, which a kill can cut.) Before ``last.ckpt`` is
    replaced, the old one becomes ``last.prev.ckpt``: the fallback :func:`last_checkpoint` uses
    when the newest file is unreadable anyway. Loads go through :func:`load_torch_file`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if target.name == LAST and target.exists():
            os.replace(target, target.with_name(PREVIOUS))
        os.replace(tmp, target)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return load_torch_file(path, "checkpoint", map_location=map_location or "cpu")


class SaveOnSigterm(Callback):
    """SIGTERM (what SLURM, Kubernetes and ``timeout`` send) ends the run after the current step
    with ``last.ckpt`` saved; :func:`fit` then exits with status 143 and a message, no traceback.

    Lightning notices SIGTERM in its own handler but, in a single process, acts on it only at the
    end of the epoch, and then without a checkpoint. Under DDP it stops every rank at the start
    of the next step; either way the exception reaches :meth:`on_exception`, which saves.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / CKPT_DIR / LAST

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if getattr(trainer, "received_sigterm", False) and trainer.world_size == 1:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception) -> None:  # type: ignore[override]
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                log.warning("SIGTERM at global step %d: saved %s", trainer.global_step, self.path)


class Terminated(SystemExit):
    """Raised by :func:`fit` after SIGTERM: exit status 143 (128 + SIGTERM), the checkpoint saved."""


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit`` that turns a SIGTERM stop into a clean exit (status 143, no traceback)."""
    try:
        with warnings.catch_warnings():
            # pretrain.core.resume.DeterministicResume resumes the samplers mid-epoch itself.
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            trainer.fit(*args, **kwargs)
    except SIGTERMException:
        folder = Path(trainer.default_root_dir) / CKPT_DIR
        print(f"stopped by SIGTERM at global step {trainer.global_step}; the checkpoint is in {folder}. "
              "Re-run the same command to resume.", flush=True)
        raise Terminated(143) from None


def last_checkpoint_callbacks(run_dir: str | Path, every_n_train_steps: int | None = None) -> list[ModelCheckpoint]:
    """Callbacks that keep ``checkpoints/last.ckpt`` current: at every epoch end (after the
    epoch's validation when there is one) and, with ``every_n_train_steps``, every N steps too.

    A killed run resumes from it. Lightning's own ``save_last=True`` does not do this with
    ``save_top_k=0``: in pytorch-lightning 2.6 it refreshes ``last.ckpt`` only when a top-k
    checkpoint was written at the same step, so such a callback writes ``last.ckpt`` once, when
    training ends. Here the single kept "top-1" checkpoint *is* the last one. Lightning does not
    let one callback trigger on both epochs and steps, hence a second one for the steps.
    """

    def last(every_n_epochs: int | None = None, every_n_train_steps: int | None = None) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=Path(run_dir) / CKPT_DIR,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
            auto_insert_metric_name=False,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
        )

    steps = int(every_n_train_steps or 0)
    return [last(every_n_epochs=1), *([last(every_n_train_steps=steps)] if steps > 0 else [])]


def use_sync_batchnorm(trainer_cfg: Mapping[str, Any], norm: str, norms: tuple[str, ...] = ("bn", "syncbn")) -> bool:
    """Whether Lightning should convert BatchNorm to SyncBatchNorm: the one rule of both stages.

    An explicit ``trainer.sync_batchnorm`` wins, except on CPUs; otherwise SyncBN exactly when several
    GPU processes train (DDP) a backbone whose ``norm`` is one of ``norms`` (pretraining: bn and
    syncbn, since per-GPU batches are small and BN statistics over them alone are noisy;
    fine-tuning: syncbn, the norm that asks for it). torch's SyncBatchNorm runs on GPUs only, so
    CPU DDP (gloo) keeps per-process BN.
    """
    ddp = str(trainer_cfg.get("strategy", "auto")).startswith("ddp")
    gpu = precision.training_device(trainer_cfg.get("accelerator", "auto")) == "cuda"
    explicit = trainer_cfg.get("sync_batchnorm")
    if explicit is not None:
        if explicit and not gpu:
            log.warning("trainer.sync_batchnorm=true ignored: torch's SyncBatchNorm runs on GPUs only")
        return bool(explicit) and gpu
    return ddp and gpu and norm in norms


def write_json(path: str | Path, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_jsonable))
    return p


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (DictConfig,)):
        return OmegaConf.to_container(o, resolve=True)
    return str(o)


def save_config(cfg: DictConfig, run_dir: str | Path) -> None:
    """Write the resolved config as ``config.yaml`` (Hydra also keeps .hydra/)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_dir) / "config.yaml", resolve=True)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(Callback):
    """Stop with a clear message on a NaN/inf training loss, or skip that step (``mode="skip"``).

    stop (the default): the checkpoint callbacks run after this one (Lightning orders them last),
    so ``last.ckpt`` stays the last good state; resume from it after fixing the cause (lower LR,
    precision=32, ...).

    skip: the step's gradients are dropped before the optimizer sees them (no weight, momentum or
    Adam moment changes; the LR schedule still advances), a warning names the step, and the count
    is kept in ``skipped_steps`` (saved in checkpoints, reported in metrics.json). More than
    ``max_consecutive`` skips in a row is a diverged run, not a bad batch: it stops as above.
    """

    def __init__(self, mode: str = "stop", max_consecutive: int = 10) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss={mode!r}: use stop or skip")
        self.mode = mode
        self.max_consecutive = int(max_consecutive)
        self.skipped_steps: list[int] = []
        self._consecutive = 0
        self._step = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[override]
        self._step = trainer.global_step  # optimizer steps done before this batch's

    def _stop(self, trainer: pl.Trainer, what: str, step: int) -> NonFiniteLossError:
        why = (f" after {self._consecutive} skipped steps in a row (nonfinite_loss=skip allows "
               f"{self.max_consecutive})" if self.mode == "skip" else "")
        return NonFiniteLossError(
            f"non-finite {what} at global step {step}{why}; "
            f"the last good checkpoint is kept in {Path(trainer.default_root_dir) / CKPT_DIR}. "
            "Lower the learning rate, use trainer.precision=32, or check the data"
            + (" (or skip such steps: nonfinite_loss=skip)." if self.mode == "stop" else ".")
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[override]
        # skip decides on the gradients the optimizer is about to use: summed over an accumulation
        # window and, under DDP, averaged over the ranks, so every rank takes the same decision.
        if self.mode != "skip" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # 16-mixed: the GradScaler skips steps with inf/NaN gradients itself and lowers its scale
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._consecutive = 0
            return
        step = trainer.global_step  # optimizer steps done before this one
        if self._consecutive >= self.max_consecutive:
            raise self._stop(trainer, "gradients", step)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
        self._consecutive += 1
        self.skipped_steps.append(step)
        log.warning("non-finite loss or gradients at global step %d: step skipped, weights unchanged "
                    "(%d skipped so far, %d in a row; nonfinite_loss=skip)", step, len(self.skipped_steps),
                    self._consecutive)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if self.mode == "skip":
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            # Checkpoint callbacks run after this one: last.ckpt stays at the step before this batch.
            raise self._stop(trainer, f"training loss ({loss.item()})", self._step)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])]


def skipped_nonfinite_steps(trainer: pl.Trainer) -> list[int]:
    """The global steps whose update ``nonfinite_loss=skip`` dropped (over resumes too)."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StopOnNonFiniteLoss):
            return list(cb.skipped_steps)
    return []


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes ``metrics.csv`` when a run starts; a resumed run keeps the
    earlier rows before the step it resumes from (later ones are logged again) in front of its own."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self._earlier = list(csv.DictReader(f))
            self._fs.rm_file(self.metrics_file_path)

    def save(self) -> None:
        if self._earlier and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            keep = [r for r in self._earlier if r.get("step") and int(float(r["step"])) < first]
            self._earlier = []
            if keep:
                self.metrics_keys = sorted(set(self.metrics_keys) | {k for r in keep for k in r})
                with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(keep)
        super().save()


class ResumingCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` survives a resume in the same run directory."""

    @property
    def experiment(self) -> _ResumingWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


def build_trainer(
    trainer_cfg: DictConfig | dict,
    run_dir: str | Path,
    callbacks: Iterable[Callback] = (),
    checkpoint: ModelCheckpoint | None = None,
    nonfinite_loss: str = "stop",
    loggers: Iterable[Mapping[str, Any]] = (),
) -> pl.Trainer:
    """A Lightning Trainer writing checkpoints, CSV logs and progress into ``run_dir``.

    ``trainer_cfg`` is passed through to ``pl.Trainer`` (any Trainer argument is a
    Hydra override: ``trainer.max_epochs=100 trainer.precision=bf16-mixed``).
    ``nonfinite_loss``: stop (default) or skip, see :class:`StopOnNonFiniteLoss`.
    ``loggers``: the ``logger.extra`` config, Lightning loggers beside the CSV one (see :func:`extra_loggers`).
    """
    run_dir = Path(run_dir)
    kwargs: dict[str, Any] = (
        dict(OmegaConf.to_container(trainer_cfg, resolve=True))  # type: ignore[arg-type]
        if isinstance(trainer_cfg, DictConfig)
        else dict(trainer_cfg)
    )
    if str(kwargs.get("precision", "auto")) == "auto":
        precision.apply(kwargs)
    ckpt = checkpoint or last_checkpoint_callbacks(run_dir)[0]
    cbs = [ckpt, StopOnNonFiniteLoss(nonfinite_loss), SaveOnSigterm(run_dir), pl.callbacks.LearningRateMonitor("step"),
           *callbacks]
    plugins = kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=[ResumingCSVLogger(str(run_dir), name="logs", version=""), *extra_loggers(loggers, run_dir)],
        callbacks=cbs,
        plugins=plugins,
        **kwargs,
    )


def extra_loggers(specs: Iterable[Mapping[str, Any]], run_dir: str | Path) -> list[Logger]:
    """Instantiate ``logger.extra``: each a ``_target_`` (a Lightning logger class) with its arguments;
    ``save_dir`` defaults to the run directory where the class takes one."""
    import inspect

    import hydra

    out: list[Logger] = []
    for spec in specs:
        spec = dict(OmegaConf.to_container(spec, resolve=True)  # type: ignore[arg-type]
                    if isinstance(spec, DictConfig) else spec)
        target = spec.get("_target_")
        if not target:
            raise ValueError(f"logger.extra entry {spec} has no _target_ "
                             "(e.g. pytorch_lightning.loggers.TensorBoardLogger)")
        try:
            cls = hydra.utils.get_class(str(target))
            if "save_dir" not in spec and "save_dir" in inspect.signature(cls).parameters:
                spec["save_dir"] = str(run_dir)
            logger = hydra.utils.instantiate(spec)
        except Exception as e:  # a missing package names itself in the cause
            raise RuntimeError(f"logger.extra: could not create {target}: {e.__cause__ or e}") from e
        if not isinstance(logger, Logger):
            raise TypeError(f"logger.extra: {target} is not a Lightning logger")
        out.append(logger)
    return out


def log_images(trainer: pl.Trainer, paths: Iterable[Path], step: int | None = None) -> int:
    """Send image files (a run's plots) to every logger that takes images: TensorBoard's
    ``add_image``, or a ``log_image(key, images)`` method (Weights & Biases and loggers like it).
    Returns how many (logger, image) pairs were sent. Rank zero only; the CSV logger has no images."""
    if not trainer.is_global_zero:
        return 0
    from PIL import Image

    step = trainer.global_step if step is None else step
    sent = 0
    for path in paths:
        path = Path(path)
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        for logger in trainer.loggers:
            tag = f"plots/{path.stem}"
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(tag, rgb, global_step=step, dataformats="HWC")  # type: ignore[union-attr]
                experiment.flush()  # type: ignore[union-attr]
                sent += 1
            elif callable(getattr(logger, "log_image", None)):
                logger.log_image(key=tag, images=[rgb], step=step)  # type: ignore[attr-defined]
                sent += 1
    return sent
