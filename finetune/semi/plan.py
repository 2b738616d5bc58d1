"""The semi stage as a layer on fine-tuning: its config checks, its fit plan and its runner.

``python -m finetune semi=<mode>`` dispatches here (:func:`run`). A mode that trains in fine-tuning's
loop runs :func:`finetune.train.train` with :func:`semi_plan` (a :class:`SemiDetectionModule` on
labeled + unlabeled batches, and the ``semi`` section of metrics.json) and :func:`check_config`; a
mode with a runner of its own (self-training) runs that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader

from finetune.data.labeled import boxes_per_image
from finetune.fit_plan import FitContext, FitPlan
from finetune.semi.base import burn_in_steps, mode_class, modes_of
from finetune.semi.data import UnlabeledDetectionImages, collate_unlabeled, detector_working_size, unlabeled_source
from finetune.semi.module import SemiDetectionModule
from finetune.semi.teacher_student import teacher_options_set
from finetune.train import train
from pretrain.core.data.coco import CocoDetection
from pretrain.core.run.resume import EpochSampler, seeded_loader_parts

log = logging.getLogger(__name__)


class BurnInSampler(EpochSampler):
    """The unlabeled stream's sampler that hands out index -1 (a placeholder the dataset returns
    without reading an image) for every sample of a step before ``burn_in_steps``: during burn-in
    the teacher modes never look at the unlabeled batch, and decoding plus strong augmentation of
    those images cost the CPU as much as the labeled step. The step of a sample is read from its
    position in the epoch's stream (``batch`` samples per step, ``steps_per_epoch`` steps), the same
    count the module's burn-in test uses, so the first semi step gets real images."""

    def __init__(self, n: int, num_samples: int, seed: int, batch: int, steps_per_epoch: int,
                 burn_in_steps: int) -> None:
        super().__init__(n, num_samples, seed)
        self.batch, self.steps_per_epoch, self.burn_in_steps = int(batch), int(steps_per_epoch), int(burn_in_steps)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self._start
        for index, sample_seed in super().__iter__():
            step = self.epoch * self.steps_per_epoch + pos // self.batch
            pos += 1
            yield (-1 if step < self.burn_in_steps else index), sample_seed


def steps_per_epoch(cfg: DictConfig, batches: int) -> int:
    """The training steps of an epoch of ``batches`` labeled batches, as Lightning counts them
    (``trainer.num_training_batches`` under ``trainer.limit_train_batches``, an int or a fraction)."""
    limit = cfg.trainer.get("limit_train_batches")
    if limit is None:
        return batches
    return min(batches, int(limit)) if isinstance(limit, int) or float(limit) > 1 else int(batches * float(limit))


def burn_in_skip_steps(cfg: DictConfig, steps_per_epoch: int, modes_need_burn_in: bool) -> int:
    """Steps whose unlabeled images need not be read: the burn-in, when every mode waits for it, on
    one process without gradient accumulation (where a loader's batch is a step); else 0."""
    s = cfg.semi
    burn_in = burn_in_steps(s, steps_per_epoch)
    devices = str(cfg.trainer.get("devices", "auto"))
    # Under any DDP strategy (even one process) Lightning wraps the sampler in a distributed one, which
    # regroups its samples: placeholders and images would share batches. Only a plain run skips.
    plain_strategy = str(cfg.trainer.get("strategy", "auto")) in ("auto", "single_device")
    one_process = (plain_strategy and int(os.environ.get("WORLD_SIZE", "1")) == 1
                   and int(cfg.trainer.get("num_nodes", 1) or 1) == 1
                   and (devices == "1" or (devices == "auto" and torch.cuda.device_count() <= 1)))
    plain = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1) == 1
    return burn_in if modes_need_burn_in and one_process and plain else 0


def semi_loader(cfg: DictConfig, labeled: DataLoader, train_ds: CocoDetection, loader_kw: Mapping[str, Any],
                strong: bool = True, skip_steps: int = 0) -> tuple[CombinedLoader, tuple[EpochSampler, int]]:
    """Labeled and unlabeled batches together: ``{"labeled": (images, targets), "unlabeled": {...}}``,
    and the unlabeled loader's ``(sampler, batch size)`` for :class:`~pretrain.core.run.resume.DeterministicResume`.

    The labeled loader sets the epoch; the unlabeled one gives ``round(batch_size *
    semi.unlabeled_ratio)`` images per step for as many steps (under DDP, per process: each rank
    gets both kinds). ``strong``: each unlabeled item also has a strong view.
    """
    s = cfg.semi
    ds = UnlabeledDetectionImages(unlabeled_source(cfg), cat_id_to_label=train_ds.cat_id_to_label,
                                  strong=strong, max_pixels=cfg.data.get("max_pixels"),
                                  image_root=s.get("image_root"), working_size=detector_working_size(cfg.detector),
                                  strong_view=str(s.get("strong_view", "unbiased_teacher")),
                                  strong_scale=None if s.get("strong_scale") is None else tuple(s.strong_scale))
    ratio = float(s.unlabeled_ratio)
    if ratio <= 0:
        raise ValueError(f"semi.unlabeled_ratio must be > 0 (unlabeled images per labeled image), got {ratio}")
    batch = max(1, round(int(cfg.data.batch_size) * ratio))
    # As many batches as the labeled loader has, whether the unlabeled set is larger or smaller:
    # back-to-back permutations, seeded apart from the labeled order.
    samples, sampler = seeded_loader_parts(ds, int(cfg.seed) + 1, num_samples=len(labeled) * batch)
    if skip_steps > 0:  # the burn-in's unlabeled samples are placeholders, never read
        sampler = BurnInSampler(len(ds), len(labeled) * batch, int(cfg.seed) + 1, batch,
                                steps_per_epoch(cfg, len(labeled)), skip_steps)
    kw = {**loader_kw, "collate_fn": collate_unlabeled}
    unlabeled = DataLoader(samples, batch_size=batch, sampler=sampler, drop_last=False, **kw)
    log.info("semi %s: %d labeled images (batch %d) + %d unlabeled from %s (batch %d)%s", s.mode, len(train_ds),
             labeled.batch_size, len(ds), ds.images.source, batch,
             "; its annotations serve as hidden ground truth for the health figures" if ds.hidden_ground_truth else "")
    return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="min_size"), (sampler, batch)


def semi_metrics(cfg: DictConfig, history: Sequence[Mapping[str, Any]], best: Any,
                 module: SemiDetectionModule | None = None) -> dict[str, Any]:
    """metrics.json's ``semi`` section: settings, the deployed detector (the best checkpoint's), teacher
    and student AP, health; with the trained ``module``: the EMA in use, the health of the semi phase's
    first step and the fraction of its steps ``semi.empty_weight`` scaled."""
    best_entry = next((h for h in history if h.get("epoch") == best.checkpoint_epoch), None)
    last_health = next((h for h in reversed(history) if h.get("pseudo_labels")), None)
    settings: dict[str, Any] = OmegaConf.to_container(cfg.semi, resolve=True)  # type: ignore[assignment]
    run: dict[str, Any] = {}
    if module is not None:
        run = {
            "empty_scaled": module.empty_scaled_fraction(),
            "ema": None if module.teacher is None else {
                "decay_per_step": module._ema_decay, "last_update_decay": module.last_decay,
                "ramp": bool(settings.get("ema_ramp", False)), "updates": module.ema_updates},
            "pseudo_labels_first_step": module.first_health,
            # semi.max_pseudo_per_image as a number (auto / labeled_max resolved on this labeled set)
            "pseudo_cap_per_image": module.threshold.max_per_image,
            "labeled_max_boxes": module.labeled_max_boxes,
        }
    return {
        "mode": str(cfg.semi.mode),
        "settings": settings,
        "deploy": str(settings.get("deploy", "teacher")),
        "deployed": best.deployed_weights,
        "best_epoch_AP": None if best_entry is None else {
            "teacher": best_entry.get("val_teacher_AP"), "student": best_entry.get("val_student_AP"),
            "teacher_AP50": best_entry.get("val_teacher_AP50"), "student_AP50": best_entry.get("val_student_AP50"),
        },
        "pseudo_labels": None if last_health is None else {
            "epoch": last_health.get("epoch"), "step": last_health.get("step"), **last_health["pseudo_labels"]},
        "sup_loss": None if last_health is None else last_health.get("sup_loss"),
        "unsup_loss": None if last_health is None else last_health.get("unsup_loss"),
        "warnings": None if not history else history[-1].get("warnings"),
        **run,
    }


def check_config(cfg: DictConfig) -> None:
    """The semi settings, and every mode the step will run, checked before any data is read."""
    if float(cfg.semi.get("unsup_weight", 0.0)) < 0:
        raise ValueError(f"semi.unsup_weight={cfg.semi.unsup_weight} must be >= 0")
    settings: dict[str, Any] = OmegaConf.to_container(cfg.semi, resolve=True)  # type: ignore[assignment]
    modes = modes_of(settings)
    for mode in modes:
        type(mode).check(cfg)
    if not any(m.needs_teacher for m in modes):
        _refuse_teacher_options(settings)


def check_unused(cfg: DictConfig) -> None:
    """With ``semi=none`` (plain fine-tuning), refuse semi settings that would silently do nothing."""
    semi = cfg.get("semi")
    if semi is not None:
        _refuse_teacher_options(OmegaConf.to_container(semi, resolve=True))  # type: ignore[arg-type]


def _refuse_teacher_options(settings: Mapping[str, Any]) -> None:
    used = teacher_options_set(settings)
    if used:
        raise ValueError(f"{', '.join(used)} acts on a teacher and its pseudo-labels (soft_background: and "
                         "detector=fasterrcnn): it needs semi=unbiased_teacher or semi=mean_teacher, got "
                         f"semi={settings.get('mode', 'none')}")


def semi_plan(ctx: FitContext) -> FitPlan:
    """A :class:`SemiDetectionModule` on labeled + unlabeled batches, with the ``semi`` metrics section."""
    cfg = ctx.cfg
    mean_boxes, most_boxes = boxes_per_image(ctx.train_ds)
    module = SemiDetectionModule(cfg=ctx.plain_cfg, label_map=ctx.train_ds.label_map.to_json(),
                                 backbone_info=ctx.backbone_info, num_classes=ctx.train_ds.num_classes,
                                 resnet=ctx.resnet, labeled_boxes_per_image=mean_boxes,
                                 labeled_max_boxes=most_boxes)
    per_epoch = steps_per_epoch(cfg, len(ctx.labeled))
    skip = burn_in_skip_steps(cfg, per_epoch, all(m.after_burn_in for m in module.modes))
    loader, unlabeled = semi_loader(cfg, ctx.labeled, ctx.train_ds, ctx.loader_kw,
                                    strong=any(m.strong_view for m in module.modes), skip_steps=skip)

    def metrics(history: Sequence[Mapping[str, Any]], best: Any) -> tuple[str, dict[str, Any]]:
        return "semi", semi_metrics(cfg, history, best, module)

    return FitPlan(module=module, train_loader=loader,
                   samplers={"labeled": (ctx.labeled_sampler, int(cfg.data.batch_size)), "unlabeled": unlabeled},
                   extra_metrics=metrics)


def run(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """``python -m finetune semi=<mode>``: the mode's own runner, or fine-tuning's loop with the semi plan
    (``callbacks`` added to its trainer's)."""
    from pretrain.core.run.checkpoints import hydra_run_dir

    mode = mode_class(str(cfg.semi.mode))
    if not mode.in_loop:
        check_config(cfg)
        out = Path(run_dir) if run_dir is not None else hydra_run_dir()
        out.mkdir(parents=True, exist_ok=True)
        return mode.run(cfg, out, callbacks)
    return train(cfg, run_dir, plan=semi_plan, checks=(check_config,), callbacks=callbacks)
