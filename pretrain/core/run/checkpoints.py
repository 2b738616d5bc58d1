"""Run directories and checkpoint files: where a run writes, ``last.ckpt`` written atomically (the
previous one kept), the checkpoint callbacks, the resolved config and JSON outputs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pretrain.core.run.safe_load import CorruptCheckpointError, load_torch_file

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
