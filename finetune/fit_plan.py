"""What a fine-tuning run trains, as :func:`finetune.train.train` takes it: the context fine-tuning
has built (data, backbone, labeled loader) and the plan a stage makes from it (module, batches, extra
metrics, callbacks). Plain fine-tuning's plan is :func:`finetune.train.finetune_plan`; a layer on top
of fine-tuning brings its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from finetune.data.labeled import DataPaths
from finetune.finish import ExtraMetrics
from finetune.module import DetectionModule
from pretrain.core.data.coco import CocoDetection
from pretrain.core.run.resume import EpochSampler


@dataclass
class FitContext:
    """What fine-tuning has built before the module: the data, the backbone and the labeled loader."""

    cfg: DictConfig
    run_dir: Path
    paths: DataPaths
    train_ds: CocoDetection
    val_ds: CocoDetection | None
    plain_cfg: dict[str, Any]  # the resolved config as plain containers (the module's hyperparameters)
    backbone_info: dict[str, Any]
    resnet: torch.nn.Module | None  # None: the weights come from a checkpoint (resume, init_from)
    loader_kw: dict[str, Any]  # num_workers, collate_fn, pin_memory, persistent_workers
    labeled: DataLoader  # the labeled training batches, seeded and resumable
    labeled_sampler: EpochSampler


@dataclass
class FitPlan:
    """What a run trains: the module, its training batches and what the rest of the run needs of it.

    ``samplers``: every seeded sampler of ``train_loader`` with its batch size, for
    :class:`~pretrain.core.run.resume.DeterministicResume`; ``extra_metrics``: a section for
    metrics.json; ``callbacks``: added to the trainer's.
    """

    module: DetectionModule
    train_loader: Any
    samplers: dict[str, tuple[EpochSampler, int]]
    extra_metrics: ExtraMetrics | None = None
    callbacks: list[pl.Callback] = field(default_factory=list)


PlanBuilder = Callable[[FitContext], FitPlan]
ConfigCheck = Callable[[DictConfig], None]
