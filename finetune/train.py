"""Fine-tuning run: data, backbone, detector, Lightning fit, then COCO evaluation of the best epoch.

``train(cfg)`` is what ``python -m finetune`` runs for plain fine-tuning; tests call it with a
``compose()``d config. A run directory ends up holding::

    config.yaml, label_map.json, logs/metrics.csv,
    checkpoints/best.ckpt (best val AP), checkpoints/last.ckpt (resume),
    metrics.json, predictions.json (the best checkpoint on the val set), plots/*.png

What is trained, on which batches, is a :class:`FitPlan`: :func:`finetune_plan` by default. A layer
on top of fine-tuning (the stage that also learns from unlabeled images) passes its own plan builder,
config checks and callbacks, as detectron2's trainer takes its ``build_*`` methods; this module knows
nothing of what they do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from finetune.backbone import backbone_info_of
from finetune.checkpoint import load_detection_checkpoint
from finetune.data.labeled import DataPaths, build_datasets, resolve_data_paths
from finetune.ddp_report import DistributedReport
from finetune.finish import finish
from finetune.fit_plan import ConfigCheck, FitContext, FitPlan, PlanBuilder
from finetune.module import DetectionModule
from pretrain.core.data.coco import CocoDetection, collate_fn, save_label_map
from pretrain.core.run import precision
from pretrain.core.run.checkpoints import (
    CKPT_DIR,
    hydra_run_dir,
    last_checkpoint,
    last_checkpoint_callbacks,
    save_config,
)
from pretrain.core.run.guards import fit
from pretrain.core.run.resume import DeterministicResume, seeded_loader_parts
from pretrain.core.run.safe_load import load_torch_file
from pretrain.core.run.trainer import build_trainer, use_sync_batchnorm

log = logging.getLogger(__name__)


def finetune_plan(ctx: FitContext) -> FitPlan:
    """Plain fine-tuning: a :class:`DetectionModule` on the labeled batches."""
    module = DetectionModule(cfg=ctx.plain_cfg, label_map=ctx.train_ds.label_map.to_json(),
                             backbone_info=ctx.backbone_info, num_classes=ctx.train_ds.num_classes, resnet=ctx.resnet)
    return FitPlan(module=module, train_loader=ctx.labeled,
                   samplers={"labeled": (ctx.labeled_sampler, int(ctx.cfg.data.batch_size))})



def init_detector(module: DetectionModule, ckpt: str | Path, train_ds: CocoDetection) -> None:
    """Start from the detector of a fine-tuning checkpoint (``init_from``; weights only, not its optimizer).

    How the pipeline's later stages start from the fine-tuned detector.
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


def start_weights(cfg: DictConfig, resume: Path | None, train_ds: CocoDetection, paths: DataPaths
                  ) -> tuple[torch.nn.Module | None, dict[str, Any], str | None]:
    """The backbone to build on and its description: from the resumed checkpoint, ``init_from`` or
    ``backbone.checkpoint``; with the resumed checkpoint's run kind (None on a fresh run)."""
    if resume is not None:
        # The resumed run's own description: the backbone file is not needed (or re-read) again.
        state = load_torch_file(resume, "resume checkpoint", mmap=True)
        hp = state["hyper_parameters"]
        if hp["label_map"] != train_ds.label_map.to_json():
            raise ValueError(f"{resume} was trained with other classes than {paths.train_json}; "
                             "use another run dir (hydra.run.dir=...) or resume=false")
        print(f"resuming from {resume}", flush=True)
        kind = state.get("run_kind")
        if kind is None and any(not k.startswith("model.") for k in state["state_dict"]):
            kind = "an unrecorded kind (saved before run kinds were recorded, with more than one detector)"
        return None, hp["backbone_info"], kind
    if cfg.get("init_from"):
        # The whole detector comes from a fine-tuning run: so do its backbone's description and input
        # normalisation (backbone.checkpoint is not read).
        init_path = Path(str(cfg.init_from)).expanduser()
        if not init_path.is_file():
            raise FileNotFoundError(f"init_from={init_path} does not exist "
                                    "(give a checkpoints/best.ckpt of a fine-tuning run)")
        hp = load_torch_file(init_path, "init_from checkpoint", mmap=True).get("hyper_parameters") or {}
        if "backbone_info" not in hp:
            raise ValueError(f"init_from={init_path} is not a fine-tuning checkpoint of `python -m finetune`")
        return None, hp["backbone_info"], None
    resnet, info = backbone_info_of(cfg)
    return resnet, info, None


def train(cfg: DictConfig, run_dir: str | Path | None = None, plan: PlanBuilder = finetune_plan,
          checks: Sequence[ConfigCheck] = (), callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fine-tune, keep the best epoch by val AP, evaluate it and write the run's outputs.

    Args:
        cfg: the composed ``conf/finetune`` config.
        run_dir: output folder; default the Hydra run dir. A ``checkpoints/last.ckpt`` there is
            resumed (``resume=false`` starts over).
        plan: builds what is trained from what fine-tuning has set up (:func:`finetune_plan`).
        checks: more config checks, run with :func:`check_config` before any data is read.
        callbacks: added to the trainer's (e.g. a step timer).

    Returns:
        The metrics written to ``metrics.json`` (empty on non-zero ranks).
    """
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    save_config(cfg, run_dir)

    for check in (check_config, *checks):
        check(cfg)
    paths = resolve_data_paths(cfg.data)
    train_ds, val_ds = build_datasets(cfg, paths)
    if int(cfg.data.batch_size) > len(train_ds):
        log.warning("data.batch_size=%d is larger than the %d training images: each epoch is one step of %d "
                    "images", int(cfg.data.batch_size), len(train_ds), len(train_ds))
    if val_ds is None:
        log.warning("no validation set (data.val_json): no val AP, no best-epoch selection; the last epoch is kept")
    save_label_map(run_dir / "label_map.json", train_ds)

    resume = last_checkpoint(run_dir) if cfg.get("resume", True) else None
    resnet, info, resumed_kind = start_weights(cfg, resume, train_ds, paths)
    loader_kw: dict[str, Any] = {
        "num_workers": int(cfg.data.num_workers),
        "collate_fn": collate_fn,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": int(cfg.data.num_workers) > 0,
    }
    samples, sampler = seeded_loader_parts(train_ds, int(cfg.seed))
    labeled = DataLoader(samples, batch_size=int(cfg.data.batch_size), sampler=sampler, **loader_kw)
    plain_cfg: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    fit_plan = plan(FitContext(cfg=cfg, run_dir=run_dir, paths=paths, train_ds=train_ds, val_ds=val_ds,
                               plain_cfg=plain_cfg, backbone_info=info, resnet=resnet, loader_kw=loader_kw,
                               labeled=labeled, labeled_sampler=sampler))
    module = fit_plan.module
    # A checkpoint of the same stage saved before run kinds were recorded is checked by the module's
    # own on_load_checkpoint.
    legacy = resumed_kind is not None and resumed_kind.startswith("an unrecorded") and module.run_kind != "finetune"
    if resumed_kind is not None and resumed_kind != module.run_kind and not legacy:
        raise ValueError(f"{resume} is from a {resumed_kind} run, this one is {module.run_kind}; "
                         "use another run dir (hydra.run.dir=...) or resume=false")
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
    # Fine-tuning trains NCHW: torchvision's detection transform batches the images NCHW and the
    # model is not converted, so metrics.json's hardware record says so (inference, finetune.inference,
    # converts where it helps; training in channels_last is not measured yet).
    hardware = precision.apply(trainer_cfg, channels_last=False)
    trainer_cfg["sync_batchnorm"] = use_sync_batchnorm(trainer_cfg, str(cfg.backbone.norm), norms=("syncbn",))
    extra: list[pl.Callback] = [DeterministicResume(int(cfg.seed), fit_plan.samplers)]
    extra += [DistributedReport()] if int(trainer_cfg.get("num_nodes", 1) or 1) > 1 or str(
        trainer_cfg.get("strategy", "auto")).startswith("ddp") else []
    trainer = build_trainer(trainer_cfg, run_dir,
                            callbacks=[*([last_cb] if checkpoint else []), *step_cb, *extra,
                                       *fit_plan.callbacks, *callbacks],
                            checkpoint=checkpoint or last_cb,
                            nonfinite_loss=str(cfg.get("nonfinite_loss", "stop")),
                            loggers=(cfg.get("logger") or {}).get("extra") or ())

    t0 = time.perf_counter()
    fit(trainer, module, fit_plan.train_loader, val_loader, ckpt_path=str(resume) if resume else None,
        weights_only=True)
    train_s = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, run_dir, trainer, module, checkpoint, train_ds, val_ds, paths, train_s, hardware,
                  extra_metrics=fit_plan.extra_metrics)

