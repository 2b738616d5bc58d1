"""``train(cfg)``: one pretraining run in the current Hydra run directory (resuming if it can)."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import hydra.utils
import pytorch_lightning as pl
from omegaconf import DictConfig

from pretrain.core.backbone.resnet import ARCHS
from pretrain.core.run import precision
from pretrain.core.run.checkpoints import (
    hydra_run_dir,
    last_checkpoint,
    last_checkpoint_callbacks,
    save_config,
    write_json,
)
from pretrain.core.run.curves import plot_pretrain_curves
from pretrain.core.run.guards import fit, skipped_nonfinite_steps
from pretrain.core.run.logs import log_images
from pretrain.core.run.resume import DeterministicResume
from pretrain.core.run.trainer import build_trainer, use_sync_batchnorm
from pretrain.data import knn_loader, train_loader
from pretrain.export import write_backbone
from pretrain.methods.base import SSLMethod, plain_config

log = logging.getLogger(__name__)
PRETRAIN_NORMS = ("bn", "gn", "syncbn")
# Objectives built for detection transfer (dense / region-level contrast), suggested when kNN does not move.
DETECTION_AWARE = ("densecl", "detcon")


def check_config(config: dict[str, Any]) -> None:
    """Refuse configs that cannot work, with the override that fixes them."""
    b = config["backbone"]
    if b["arch"] not in ARCHS:
        raise ValueError(f"backbone.arch={b['arch']!r}; choose one of {ARCHS}")
    if b.get("norm", "bn") not in PRETRAIN_NORMS:
        raise ValueError(
            f"backbone.norm={b.get('norm')!r} cannot be pretrained (frozen BN has nothing to learn); "
            f"choose one of {PRETRAIN_NORMS}"
        )
    opt = config.get("optimizer") or {}
    lr = opt.get("base_lr", opt.get("lr"))
    if lr is not None and not float(lr) > 0:
        raise ValueError(f"optimizer.base_lr={lr} must be > 0")
    if int(config["data"]["batch_size"]) < 2:
        raise ValueError("data.batch_size must be >= 2 (batch statistics and negatives need a batch)")
    preset, name = config.get("preset_method"), config["method"].get("name")
    if preset and name != preset:
        raise ValueError(f"this experiment preset is {preset}'s recipe and method={name} would get its {preset} "
                         f"settings: use experiment=demo_{name} (the demo presets: conf/pretrain/experiment/) or "
                         "drop the experiment")
    if "transform" not in config["method"] or "module" not in config["method"]:
        raise ValueError("method config needs `module` (the LightningModule class) and `transform`")


def _trainer_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(config["trainer"])
    kwargs["sync_batchnorm"] = use_sync_batchnorm(kwargs, config["backbone"].get("norm", "bn"))
    return kwargs


def train(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Pretrain, export the backbone file and write ``metrics.json`` into the run directory.

    Re-running with the same run directory resumes from ``checkpoints/last.ckpt``.

    Returns:
        The metrics written to ``metrics.json`` (empty on non-zero ranks).
    """
    run_dir = hydra_run_dir()
    config = plain_config(cfg)
    check_config(config)
    hardware = precision.apply(config["trainer"], config["backbone"].get("channels_last", "auto"))
    config["backbone"]["channels_last"] = hardware.channels_last
    pl.seed_everything(int(config.get("seed", 0)), workers=True)
    save_config(cfg if isinstance(cfg, DictConfig) else DictConfig(config), run_dir)

    method_cls = hydra.utils.get_class(config["method"]["module"])
    if not issubclass(method_cls, SSLMethod):
        raise TypeError(f"method.module={config['method']['module']} is not an SSLMethod")
    model = method_cls(config)
    transform = hydra.utils.instantiate(config["method"]["transform"])
    seed = int(config.get("seed", 0))
    loader = train_loader(config["data"], transform, config["method"]["transform"], seed=seed)
    val_loader = knn_loader(config)
    model.knn_reference_loader = val_loader  # the step-0 reference, whatever the validation cadence

    checkpoint, *step_checkpoint = last_checkpoint_callbacks(run_dir, config.get("checkpoint_every_n_steps"))
    resumable = DeterministicResume(seed, {"train": (loader.sampler, int(loader.batch_size or 1))})  # type: ignore[dict-item]
    trainer = build_trainer(_trainer_kwargs(config), run_dir,
                            [*step_checkpoint, resumable, *model.method_callbacks()],
                            checkpoint=checkpoint, nonfinite_loss=str(config.get("nonfinite_loss", "stop")),
                            loggers=(config.get("logger") or {}).get("extra") or ())
    resume = last_checkpoint(run_dir)
    if resume is not None:
        log.info("resuming from %s", resume)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Expected: the kNN probe (the validation loop) is optional.
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        fit(trainer, model, loader, val_loader, ckpt_path=resume, weights_only=True)
    wall = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {}

    weights = write_backbone(
        model.state_dict(), config, run_dir, int(model.images_seen), int(model.epochs_done),
        trainer.global_step, source=str(run_dir.resolve()), resolved=model.resolved_settings(),
    )
    previous = _previous_metrics(run_dir)
    knn = trainer.callback_metrics.get("knn_top1")
    knn_final = float(knn) if knn is not None else previous.get("knn_top1")
    if model.knn_history:  # the probe's own value (the logged one is float32)
        knn_final = float(model.knn_history[-1]["knn_top1"])
    # From the checkpoint on a resume; metrics.json keeps it for checkpoints that predate it.
    knn_random = model.knn_step0 if model.knn_step0 is not None else previous.get("knn_top1_random")
    final_loss = model.last_epoch_loss if model.last_epoch_loss is not None else previous.get("final_loss")
    metrics = {
        "stage": "pretrain",
        "method": config["method"]["name"],
        "arch": config["backbone"]["arch"],
        "norm": config["backbone"].get("norm", "bn"),
        "epochs": int(model.epochs_done),
        "num_prototypes": config["method"].get("num_prototypes"),
        # What `auto` settings came to for this data (MoCo/DenseCL: queue_length).
        "resolved_settings": model.resolved_settings() or previous.get("resolved_settings", {}),
        "final_loss": final_loss,
        "knn_top1": knn_final,
        # The same probe on the backbone at step 0 (random init): what "learned something" is read against.
        "knn_top1_random": knn_random,
        "knn_gain_over_random": (None if knn_final is None or knn_random is None
                                 else round(knn_final - knn_random, 6)),
        "knn_history": list(model.knn_history) or previous.get("knn_history", []),
        # The method's own last logged health figures (SwAV: embedding cosine, code entropy).
        "diagnostics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                        if k.startswith(f"{config['method']['name']}_") and not k.endswith("_queue_used")}
        or previous.get("diagnostics", {}),
        "images_seen": int(model.images_seen),
        "global_step": int(trainer.global_step),
        "skipped_nonfinite_steps": skipped_nonfinite_steps(trainer),
        "global_batch_size": model.global_batch_size(),
        "precision": hardware.precision,
        "hardware": hardware.as_dict(),
        "wall_time_s": round(wall, 2),
        "backbone": str(weights),
        "run_dir": str(run_dir),
    }
    if final_loss is not None and not math.isfinite(final_loss):
        metrics["final_loss"] = None
    write_json(run_dir / "metrics.json", metrics)
    log.info("backbone written to %s", weights)
    warn_if_no_knn_gain(knn_final, knn_random, config["method"]["name"])
    try:  # plots are a convenience: a plotting failure must not lose the exported backbone
        plot_pretrain_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots", knn_reference=knn_random)
        log_images(trainer, sorted((run_dir / "plots").glob("*.png")))
    except Exception as e:  # noqa: BLE001
        log.warning("plots failed: %s", e)
    return metrics


def warn_if_no_knn_gain(knn_final: float | None, knn_random: float | None, method: str) -> bool:
    """Log a WARNING when the final kNN top-1 is not above the random-init backbone's (step 0).

    Random convolutional features already separate simple objects well above chance, so a kNN
    figure means little on its own: a backbone that does not beat its own initialisation has not
    learned features the detector could use, whatever its loss did. Returns whether it warned.
    """
    if knn_final is None or knn_random is None or knn_final > knn_random + 1e-6:
        return False
    others = " or ".join(f"method={m}" for m in DETECTION_AWARE if m != method)
    log.warning(
        "kNN top-1 %.4f is not above the random-init backbone's %.4f (step 0; %.4f below it): %s pretraining "
        "has not yet learned features that tell these objects apart better than random ones. Try a longer run "
        "(trainer.max_epochs), another learning rate (optimizer.base_lr), views that share objects (larger "
        "crops: method.transform.min_scale; grayscale when colour is a shortcut), or a detection-aware "
        "objective (%s).",
        knn_final, knn_random, knn_random - knn_final, method, others,
    )
    return True


def _previous_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of an earlier, finished run in this directory (a resume that had nothing left)."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
