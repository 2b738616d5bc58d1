"""Fine-tuning run: data, backbone, detector, Lightning fit, then COCO evaluation of the best epoch.

``train(cfg)`` is what ``python -m finetune`` runs; tests call it with a ``compose()``d config.
A run directory ends up holding::

    config.yaml, label_map.json, logs/metrics.csv,
    checkpoints/best.ckpt (best val AP), checkpoints/last.ckpt (resume),
    metrics.json, predictions.json (the best checkpoint on the val set), plots/*.png
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from finetune.backbone import load_backbone
from finetune.ddp_report import DistributedReport
from finetune.evaluate import evaluate_module
from finetune.inference import AUTOCAST_DTYPES, prepare
from finetune.module import IMAGENET_MEAN, IMAGENET_STD, DetectionModule, load_detection_checkpoint
from finetune.transforms import build_transforms
from pretrain.core import precision
from pretrain.core.coco import CocoDetection, collate_fn, save_label_map
from pretrain.core.resume import DeterministicResume, seeded_loader_parts
from pretrain.core.runtime import (
    CKPT_DIR,
    build_trainer,
    fit,
    hydra_run_dir,
    last_checkpoint,
    last_checkpoint_callbacks,
    log_images,
    save_config,
    skipped_nonfinite_steps,
    use_sync_batchnorm,
    write_json,
)
from pretrain.core.safe_load import load_torch_file

log = logging.getLogger(__name__)
DEFAULT_ARCH = "resnet50"  # arch=auto without a checkpoint

# Conventional layouts under data.root, tried in order (see conf/finetune/data/coco.yaml).
TRAIN_CANDIDATES = ("train.json", "annotations/instances_train*.json", "train/_annotations.coco.json")
VAL_CANDIDATES = ("val.json", "valid.json", "annotations/instances_val*.json", "valid/_annotations.coco.json",
                  "val/_annotations.coco.json")


@dataclass
class DataPaths:
    train_json: Path
    val_json: Path | None
    train_images: Path | None
    val_images: Path | None


def resolve_data_paths(data: Mapping[str, Any]) -> DataPaths:
    """Annotation files and image folders from ``data.*``: explicit paths win, else ``data.root``'s layout.

    Synthetic data (``data.synthetic``) is generated under ``data.root`` first if missing.

    Raises:
        FileNotFoundError: no training annotations could be found; the message lists what was tried.
    """
    root = Path(data["root"]).expanduser() if data.get("root") else None
    if data.get("synthetic") is not None:
        from pretrain.core.synthetic import ensure_synthetic

        if root is None:
            raise ValueError("synthetic data needs data.root (where to generate it)")
        ensure_synthetic(root, **dict(data["synthetic"]))
    train_json = _pick(data.get("train_json"), root, TRAIN_CANDIDATES, "train")
    if train_json is None:
        raise FileNotFoundError(
            "no training annotations: set data.train_json=FILE, or data.root=DIR holding one of "
            f"{', '.join(TRAIN_CANDIDATES)}" + (f" (looked in {root})" if root else "")
        )
    val_json = _pick(data.get("val_json"), root, VAL_CANDIDATES, "val")
    return DataPaths(
        train_json=train_json,
        val_json=val_json,
        train_images=_image_root(data.get("train_images"), train_json),
        val_images=_image_root(data.get("val_images"), val_json) if val_json else None,
    )


def _pick(explicit: Any, root: Path | None, patterns: tuple[str, ...], split: str) -> Path | None:
    if explicit:
        p = Path(explicit).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"data.{split}_json={p} does not exist")
        return p
    if root is None:
        return None
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder")
    for pattern in patterns:
        found = sorted(glob.glob(str(root / pattern)))
        if found:
            return Path(found[0]).resolve()
    return None


def _image_root(explicit: Any, ann_file: Path | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if ann_file is not None and ann_file.parent.name == "annotations" and ann_file.stem.startswith("instances_"):
        # COCO layout: annotations/instances_train2017.json describes images in train2017/.
        guess = ann_file.parent.parent / ann_file.stem[len("instances_"):]
        if guess.is_dir():
            return guess
    return None  # CocoDetection's default: the JSON's folder


def build_datasets(cfg: DictConfig, paths: DataPaths) -> tuple[CocoDetection, CocoDetection | None]:
    """Training set with augmentation and the validation set with the training set's label map."""
    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    common = {"max_pixels": cfg.data.get("max_pixels"), "missing": cfg.data.get("missing", "error")}
    train_ds = CocoDetection(paths.train_json, paths.train_images, transforms=build_transforms(True, **aug),  # type: ignore[arg-type]
                             train=True, bad_images="skip", **common)
    if train_ds.num_classes == 0:
        raise ValueError(f"{paths.train_json} has no categories to train on")
    if train_ds.report.boxes == 0:
        raise ValueError(f"{paths.train_json} has no usable boxes to train on ({train_ds.report.summary()})")
    val_ds = None
    if paths.val_json is not None:
        val_ds = CocoDetection(paths.val_json, paths.val_images, transforms=build_transforms(False), train=False,
                               label_map=train_ds.label_map, **common)
    return train_ds, val_ds


def backbone_info_of(cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the configured backbone; return it with the plain-dict description the checkpoint keeps."""
    bb = cfg.backbone
    arch = bb.arch
    if arch == "auto" and not bb.checkpoint:
        arch = DEFAULT_ARCH
    resnet, report = load_backbone(bb.checkpoint or None, arch, bb.norm, gn_groups=bb.gn_groups,
                                   strict=bb.get("strict", True))
    print(report, flush=True)
    if report.format == "random":
        log.warning("no backbone.checkpoint: the ResNet starts from random weights (a from-scratch baseline)%s",
                    "; frozen stages stay random and frozen_bn does not normalise: consider "
                    "backbone.trainable_layers=5 backbone.norm=gn or bn" if bb.norm == "frozen_bn" else "")
    summary = {**report.summary(), "arch": report.meta.get("arch") or arch, "norm": bb.norm,
               "pretrain_norm": report.meta.get("norm"), "trainable_layers": int(bb.trainable_layers)}
    info = {
        "arch": summary["arch"],
        "image_mean": [float(v) for v in (report.image_mean or IMAGENET_MEAN)],
        "image_std": [float(v) for v in (report.image_std or IMAGENET_STD)],
        "summary": summary,
    }
    return resnet, info


def semi_mode(cfg: DictConfig) -> str:
    """``semi.mode`` (``none`` without a semi group, e.g. in configs written before it existed)."""
    semi = cfg.get("semi")
    return str(semi.get("mode", "none")) if semi is not None else "none"


def boxes_per_image(ds: CocoDetection) -> float:
    """Mean number of (non-crowd) boxes per image of a labeled set."""
    return sum(len(ds.annotations(i)["labels"]) for i in range(len(ds))) / max(1, len(ds))


def init_detector(module: DetectionModule, ckpt: str | Path, train_ds: CocoDetection) -> None:
    """Start from the detector of a fine-tuning checkpoint (``init_from``; weights only, not its optimizer).

    How the pipeline's semi stage starts from the fine-tuned detector: its burn-in is done already.
    """
    src = load_detection_checkpoint(ckpt)
    if src.label_map.to_json() != train_ds.label_map.to_json():
        raise ValueError(f"init_from={ckpt} was trained on other classes than {train_ds.ann_file}")
    try:
        module.model.load_state_dict(src.model.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"init_from={ckpt}: its detector does not fit this config's (detector, backbone.arch, "
                         "norm, head settings and detector.kwargs such as fpn_channels must match): "
                         f"{str(e).splitlines()[0]}") from e
    print(f"detector initialised from {ckpt} ({src.deployed_weights} weights, epoch {src.checkpoint_epoch})",
          flush=True)


def check_config(cfg: DictConfig) -> None:
    """Refuse settings that cannot train, before any data is read, naming the override to fix."""
    lr = float(cfg.optimizer.lr)
    if not lr > 0:
        raise ValueError(f"optimizer.lr={lr} must be > 0")
    if int(cfg.data.batch_size) < 1:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and int(epochs) < 1 and int(cfg.trainer.get("max_steps", -1) or -1) < 1:
        raise ValueError(f"trainer.max_epochs={epochs} must be >= 1 (or set trainer.max_steps)")
    if semi_mode(cfg) != "none" and float(cfg.semi.get("unsup_weight", 0.0)) < 0:
        raise ValueError(f"semi.unsup_weight={cfg.semi.unsup_weight} must be >= 0")
    if cfg.get("semi") is not None and bool(cfg.semi.get("soft_background", False)) and (
            semi_mode(cfg) not in ("unbiased_teacher", "mean_teacher") or cfg.detector.name != "fasterrcnn"):
        raise ValueError("semi.soft_background=true weights Faster R-CNN's pseudo-labeled RoI loss by the teacher: "
                         "it needs detector=fasterrcnn and semi=unbiased_teacher or mean_teacher, got "
                         f"detector={cfg.detector.name} semi.mode={semi_mode(cfg)}")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune, keep the best epoch by val AP, evaluate it and write the run's outputs.

    Args:
        cfg: the composed ``conf/finetune`` config.
        run_dir: output folder; default the Hydra run dir. A ``checkpoints/last.ckpt`` there is
            resumed (``resume=false`` starts over).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-zero ranks).
    """
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if semi_mode(cfg) == "self_training":
        check_config(cfg)
        from finetune.semi.self_training import self_train

        return self_train(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True)
    save_config(cfg, run_dir)

    check_config(cfg)
    paths = resolve_data_paths(cfg.data)
    train_ds, val_ds = build_datasets(cfg, paths)
    if int(cfg.data.batch_size) > len(train_ds):
        log.warning("data.batch_size=%d is larger than the %d training images: each epoch is one step of %d "
                    "images", int(cfg.data.batch_size), len(train_ds), len(train_ds))
    if val_ds is None:
        log.warning("no validation set (data.val_json): no val AP, no best-epoch selection; the last epoch is kept")
    save_label_map(run_dir / "label_map.json", train_ds)

    resume = last_checkpoint(run_dir) if cfg.get("resume", True) else None
    plain_cfg: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if resume is not None:
        # The resumed run's own description: the backbone file is not needed (or re-read) again.
        state = load_torch_file(resume, "resume checkpoint", mmap=True)
        hp = state["hyper_parameters"]
        was = (hp["cfg"].get("semi") or {}).get("mode", "none")
        if was != semi_mode(cfg):
            raise ValueError(f"{resume} is from a semi.mode={was} run, this one is semi.mode={semi_mode(cfg)}; "
                             "use another run dir (hydra.run.dir=...) or resume=false")
        if hp["label_map"] != train_ds.label_map.to_json():
            raise ValueError(f"{resume} was trained with other classes than {paths.train_json}; "
                             "use another run dir (hydra.run.dir=...) or resume=false")
        print(f"resuming from {resume}", flush=True)
        resnet, info = None, hp["backbone_info"]
    elif cfg.get("init_from"):
        # The whole detector comes from a fine-tuning run: so do its backbone's description and input
        # normalisation (backbone.checkpoint is not read).
        init_path = Path(str(cfg.init_from)).expanduser()
        if not init_path.is_file():
            raise FileNotFoundError(f"init_from={init_path} does not exist "
                                    "(give a checkpoints/best.ckpt of a fine-tuning run)")
        hp = load_torch_file(init_path, "init_from checkpoint", mmap=True).get("hyper_parameters") or {}
        if "backbone_info" not in hp:
            raise ValueError(f"init_from={init_path} is not a fine-tuning checkpoint of `python -m finetune`")
        resnet, info = None, hp["backbone_info"]
    else:
        resnet, info = backbone_info_of(cfg)
    mode = semi_mode(cfg)
    loader_kw: dict[str, Any] = {
        "num_workers": int(cfg.data.num_workers),
        "collate_fn": collate_fn,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": int(cfg.data.num_workers) > 0,
    }
    samples, sampler = seeded_loader_parts(train_ds, int(cfg.seed))
    train_loader: Any = DataLoader(samples, batch_size=int(cfg.data.batch_size), sampler=sampler, **loader_kw)
    samplers = {"labeled": (sampler, int(cfg.data.batch_size))}
    if mode == "none":
        module: DetectionModule = DetectionModule(cfg=plain_cfg, label_map=train_ds.label_map.to_json(),
                                                  backbone_info=info, num_classes=train_ds.num_classes, resnet=resnet)
    else:
        from finetune.semi.module import SemiDetectionModule
        from finetune.semi.train import semi_loader

        module = SemiDetectionModule(cfg=plain_cfg, label_map=train_ds.label_map.to_json(), backbone_info=info,
                                     num_classes=train_ds.num_classes, resnet=resnet,
                                     labeled_boxes_per_image=boxes_per_image(train_ds))
        train_loader, samplers["unlabeled"] = semi_loader(cfg, train_loader, train_ds, loader_kw)
    if resume is None and cfg.get("init_from"):
        init_detector(module, cfg.init_from, train_ds)
    val_loader = (DataLoader(val_ds, batch_size=int(cfg.eval.batch_size), shuffle=False, **loader_kw)
                  if val_ds is not None else None)

    # last.ckpt (resume) and best.ckpt (best val AP: small labeled sets overfit, the best epoch
    # matters) come from two callbacks: Lightning 2.6 only refreshes a monitoring callback's
    # last.ckpt when its top-k improved, which would resume from a stale epoch. The best one
    # runs first so that last.ckpt carries its up-to-date state.
    last_cb, *step_cb = last_checkpoint_callbacks(run_dir, cfg.get("checkpoint_every_n_steps"))
    checkpoint = None
    if val_ds is not None:
        checkpoint = ModelCheckpoint(dirpath=run_dir / CKPT_DIR, filename="best", monitor="val/AP", mode="max",
                                     save_top_k=1, save_last=False, auto_insert_metric_name=False)
    trainer_cfg: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    hardware = precision.apply(trainer_cfg)
    trainer_cfg["sync_batchnorm"] = use_sync_batchnorm(trainer_cfg, str(cfg.backbone.norm), norms=("syncbn",))
    extra: list[pl.Callback] = [DeterministicResume(int(cfg.seed), samplers)]
    extra += [DistributedReport()] if int(trainer_cfg.get("num_nodes", 1) or 1) > 1 or str(
        trainer_cfg.get("strategy", "auto")).startswith("ddp") else []
    trainer = build_trainer(trainer_cfg, run_dir,
                            callbacks=[*([last_cb] if checkpoint else []), *step_cb, *extra],
                            checkpoint=checkpoint or last_cb,
                            nonfinite_loss=str(cfg.get("nonfinite_loss", "stop")),
                            loggers=(cfg.get("logger") or {}).get("extra") or ())

    t0 = time.perf_counter()
    fit(trainer, module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    train_s = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, run_dir, trainer, module, checkpoint, train_ds, val_ds, paths, train_s, hardware)


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
) -> dict[str, Any]:
    """Evaluate the best checkpoint on the val set; write metrics.json, predictions.json and plots."""
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
    if semi_mode(cfg) != "none":
        from finetune.semi.train import semi_metrics

        base["semi"] = semi_metrics(cfg, history, best_module)
    if val_ds is None:
        metrics = {**base, "coco": None, "per_class_ap": None}
        write_json(run_dir / "metrics.json", metrics)
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
    if cfg.eval.get("plots", True):
        # Plots are a convenience: a plotting failure must not lose a finished run's metrics.
        try:
            from finetune.plots import plot_predictions
            from pretrain.core.curves import plot_training_curves

            logs = sorted((run_dir / "logs").glob("metrics*.csv"))
            plot_training_curves(logs, run_dir / "plots", history)
            plot_predictions(val_ds.ann_file, {run_dir.name: preds}, run_dir / "plots" / "predictions.png",
                             image_root=val_ds.image_root, num_images=int(cfg.eval.plot_images),
                             score=float(cfg.eval.plot_score))
            log_images(trainer, sorted((run_dir / "plots").glob("*.png")))
        except Exception as e:  # noqa: BLE001
            log.warning("plots failed: %s", e)
    print(f"run dir: {run_dir} (metrics.json, predictions.json, label_map.json, checkpoints/, plots/)")
    return metrics
