"""The CSV log that a resumed run appends to (instead of starting over), extra Lightning loggers
from the config, and images sent to the loggers that take them."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes ``metrics.csv`` when a run starts; a resumed run keeps the
    earlier rows before the step it resumes from (later ones are logged again) in front of its own."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = list(csv.DictReader(f))
            # A row with more fields than the header (a file two processes wrote, a crash mid-row)
            # carries them under the key None: kept without them, counted, never a crash on resume.
            self._earlier = [{k: v for k, v in r.items() if k is not None} for r in rows]
            ragged = sum(None in r for r in rows)
            if ragged:
                log.warning("%s: %d row(s) had more fields than its header; kept without the extra fields",
                            self.metrics_file_path, ragged)
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
