"""The semi stage's data plumbing and metrics: labeled + unlabeled batches, the metrics.json section.

``python -m finetune semi=<mode>`` runs :func:`finetune.train.train`, which calls into here for the
teacher-student and consistency modes (self-training is :mod:`finetune.semi.self_training`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader

from finetune.semi.data import UnlabeledDetectionImages, collate_unlabeled
from finetune.semi.module import TEACHER_MODES
from pretrain.core.coco import CocoDetection
from pretrain.core.resume import EpochSampler, seeded_loader_parts

log = logging.getLogger(__name__)


def unlabeled_source(cfg: DictConfig) -> Path:
    """``semi.unlabeled`` as an existing path, with a clear error otherwise."""
    src = cfg.semi.get("unlabeled")
    if not src:
        raise ValueError(
            f"semi={cfg.semi.mode} needs unlabeled images: semi.unlabeled=PATH (a folder of images, a COCO JSON "
            "whose annotations are ignored, or the splitter's unlabeled.json)"
        )
    path = Path(str(src)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"semi.unlabeled={path} does not exist")
    return path


def semi_loader(cfg: DictConfig, labeled: DataLoader, train_ds: CocoDetection, loader_kw: Mapping[str, Any]
                ) -> tuple[CombinedLoader, tuple[EpochSampler, int]]:
    """Labeled and unlabeled batches together: ``{"labeled": (images, targets), "unlabeled": {...}}``,
    and the unlabeled loader's ``(sampler, batch size)`` for :class:`~pretrain.core.resume.DeterministicResume`.

    The labeled loader sets the epoch; the unlabeled one gives ``round(batch_size *
    semi.unlabeled_ratio)`` images per step for as many steps (under DDP, per process: each rank
    gets both kinds).
    """
    s = cfg.semi
    ds = UnlabeledDetectionImages(unlabeled_source(cfg), cat_id_to_label=train_ds.cat_id_to_label,
                                  strong=str(s.mode) in TEACHER_MODES, max_pixels=cfg.data.get("max_pixels"),
                                  image_root=s.get("image_root"))
    ratio = float(s.unlabeled_ratio)
    if ratio <= 0:
        raise ValueError(f"semi.unlabeled_ratio must be > 0 (unlabeled images per labeled image), got {ratio}")
    batch = max(1, round(int(cfg.data.batch_size) * ratio))
    # As many batches as the labeled loader has, whether the unlabeled set is larger or smaller:
    # back-to-back permutations, seeded apart from the labeled order.
    samples, sampler = seeded_loader_parts(ds, int(cfg.seed) + 1, num_samples=len(labeled) * batch)
    kw = {**loader_kw, "collate_fn": collate_unlabeled}
    unlabeled = DataLoader(samples, batch_size=batch, sampler=sampler, drop_last=False, **kw)
    log.info("semi %s: %d labeled images (batch %d) + %d unlabeled from %s (batch %d)%s", s.mode, len(train_ds),
             labeled.batch_size, len(ds), ds.images.source, batch,
             "; its annotations serve as hidden ground truth for the health figures" if ds.hidden_ground_truth else "")
    return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="min_size"), (sampler, batch)


def semi_metrics(cfg: DictConfig, history: Sequence[Mapping[str, Any]], best: Any) -> dict[str, Any]:
    """metrics.json's ``semi`` section: settings, the deployed detector, teacher and student AP, health."""
    best_entry = next((h for h in history if h.get("epoch") == best.checkpoint_epoch), None)
    last_health = next((h for h in reversed(history) if h.get("pseudo_labels")), None)
    settings: dict[str, Any] = OmegaConf.to_container(cfg.semi, resolve=True)  # type: ignore[assignment]
    return {
        "mode": str(cfg.semi.mode),
        "settings": settings,
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
    }
