"""The end of a fine-tuning run: the best checkpoint evaluated on the val set, and the run's outputs.

:func:`finish` writes ``metrics.json`` (COCO summary, per-class AP, history, backbone, hardware),
``predictions.json``, the plots and ``report.html`` (:mod:`finetune.report_html`). What a layer on top
of fine-tuning adds to metrics.json comes in through ``extra_metrics`` (see :class:`finetune.train.FitPlan`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from finetune.checkpoint import load_detection_checkpoint
from finetune.confusion import format_confusion
from finetune.data.labeled import DataPaths
from finetune.ddp_report import DistributedReport
from finetune.evaluate import evaluate_module
from finetune.inference import AUTOCAST_DTYPES, prepare
from finetune.module import DetectionModule
from finetune.report_html import write_run_report
from pretrain.core.data.coco import CocoDetection
from pretrain.core.run import precision
from pretrain.core.run.checkpoints import CKPT_DIR, last_checkpoint, write_json
from pretrain.core.run.guards import skipped_nonfinite_steps
from pretrain.core.run.logs import log_images

log = logging.getLogger(__name__)

# (history, the best checkpoint's module) -> (metrics.json key, its section)
ExtraMetrics = Callable[[Sequence[Mapping[str, Any]], DetectionModule], tuple[str, dict[str, Any]]]


def finish(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    module: DetectionModule,
    checkpoint: ModelCheckpoint | None,
    train_ds: CocoDetection,
    val_ds: CocoDetection | None,
    paths: DataPaths,
    train_s: float,
    hardware: precision.HardwareChoice | None = None,
    extra_metrics: ExtraMetrics | None = None,
) -> dict[str, Any]:
    """Evaluate the best checkpoint on the val set; write metrics.json, predictions.json and plots.

    ``extra_metrics(history, best_module)`` returns a ``(key, section)`` added to metrics.json.
    """
    ckpt_dir = run_dir / CKPT_DIR
    best = Path(checkpoint.best_model_path) if checkpoint is not None and checkpoint.best_model_path else None
    if best is None or not best.is_file():
        best = ckpt_dir / "best.ckpt" if (ckpt_dir / "best.ckpt").is_file() else last_checkpoint(run_dir)
    if best is None:
        raise RuntimeError(f"training left no checkpoint in {ckpt_dir}")
    best_module = load_detection_checkpoint(best)
    history = module.history or best_module.history
    summary = module.hparams["backbone_info"]["summary"]
    base: dict[str, Any] = {
        "stage": "finetune",
        "detector": cfg.detector.name,
        "ann_file": str(paths.val_json) if paths.val_json else None,
        "train_ann_file": str(paths.train_json),
        "num_train_images": len(train_ds),
        # Set when the training JSON is a splitter's labeled.json (python -m finetune.data.split).
        "labeled_fraction": train_ds.info.get("split_fraction"),
        "split_seed": train_ds.info.get("split_seed"),
        "num_classes": train_ds.num_classes,
        "classes": train_ds.class_names,
        "backbone": summary,
        "best_epoch": best_module.checkpoint_epoch,
        "best_checkpoint": str(best),
        "global_step": int(trainer.global_step),
        "history": history,
        "train_time_s": round(train_s, 2),
        "precision": hardware.precision if hardware else str(trainer.precision),
        "hardware": hardware.as_dict() if hardware else None,
        "run_dir": str(run_dir),
    }
    skipped = list(module.skipped_images) or list(best_module.skipped_images)
    if skipped:
        base["skipped_images"] = skipped
    if skipped_steps := skipped_nonfinite_steps(trainer):
        base["skipped_nonfinite_steps"] = skipped_steps
    report = next((c.report for c in trainer.callbacks if isinstance(c, DistributedReport)), None)  # type: ignore[attr-defined]
    if report is not None:
        base["distributed"] = report
    if extra_metrics is not None:
        key, section = extra_metrics(history, best_module)
        base[key] = section
    if val_ds is None:
        metrics = {**base, "coco": None, "per_class_ap": None}
        write_json(run_dir / "metrics.json", metrics)
        write_report(run_dir, metrics)
        return metrics
    device = trainer.strategy.root_device
    # The training precision, as validation ran and as `python -m finetune.evaluate` runs by default.
    trained = hardware.precision if hardware else "32"
    setup = prepare(best_module.model, device, trained if trained in ("32", *AUTOCAST_DTYPES) else "32")
    result, preds, metrics = evaluate_module(
        best_module, val_ds, run_dir, batch_size=int(cfg.eval.batch_size), num_workers=0, device=device,
        backend=cfg.eval.backend, extra=base, setup=setup,
    )
    print(f"\nbest epoch {best_module.checkpoint_epoch} ({best.name}) on {paths.val_json}: "
          f"{result.num_images} images, {result.num_detections} detections")
    print(result.table(), flush=True)
    if metrics["confusion"] is not None:
        print(format_confusion(metrics["confusion"]), flush=True)
    if cfg.eval.get("plots", True):
        # Plots are a convenience: a plotting failure must not lose a finished run's metrics.
        try:
            from finetune.plots import plot_predictions
            from pretrain.core.run.curves import plot_training_curves

            logs = sorted((run_dir / "logs").glob("metrics*.csv"))
            plot_training_curves(logs, run_dir / "plots", history)
            plot_predictions(val_ds.ann_file, {run_dir.name: preds}, run_dir / "plots" / "predictions.png",
                             image_root=val_ds.image_root, num_images=int(cfg.eval.plot_images),
                             score=float(cfg.eval.plot_score))
            log_images(trainer, sorted((run_dir / "plots").glob("*.png")))
        except Exception as e:  # noqa: BLE001
            log.warning("plots failed: %s", e)
    write_report(run_dir, metrics)
    print(f"run dir: {run_dir} (report.html, metrics.json, predictions.json, label_map.json, checkpoints/, plots/)")
    return metrics


def write_report(run_dir: Path, metrics: Mapping[str, Any]) -> None:
    """``report.html`` beside metrics.json; like the plots, a failure is logged and loses nothing else."""
    try:
        write_run_report(run_dir, metrics)
    except Exception as e:  # noqa: BLE001
        log.warning("report.html failed: %s", e)
