"""What a semi mode is: the registry behind ``semi=<mode>`` and the small base every mode file extends.

A mode says what it needs (an EMA teacher, a strong view of each unlabeled image, detector
capabilities) and computes its unsupervised loss on a batch of unlabeled images; the Lightning module
(:class:`finetune.semi.module.SemiDetectionModule`) does everything the modes share: the supervised
step, burn-in, the EMA teacher, validation of student and teacher, pseudo-label health, checkpoint
state. Adding a mode is one file that subclasses :class:`SemiMode` under
``@register_semi_mode("name")`` (imported by ``finetune/semi/__init__.py``) and one yaml in
``conf/finetune/semi/`` that sets ``mode: name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from finetune.detectors import require
from finetune.detectors.registry import registrar


class SemiStep(Protocol):
    """What a mode sees of the Lightning module (:class:`finetune.semi.module.SemiDetectionModule`)."""

    model: nn.Module  # the student
    teacher: nn.Module | None  # the EMA teacher (modes with needs_teacher, after burn-in)
    label_map: Any  # the labeled set's classes (``num_classes``)
    labeled_boxes_per_image: float | None  # the labeled set's mean boxes per image
    labeled_max_boxes: int | None  # the most boxes on one labeled image
    threshold: Any  # the pseudo-label ScoreThreshold (its per-class thresholds)

    @property
    def device(self) -> torch.device: ...  # read-only on a LightningModule

    @property
    def global_step(self) -> int: ...

    def pseudo_labels(self, detections: list[dict[str, torch.Tensor]],
                      ground_truth: Sequence[Mapping[str, torch.Tensor] | None] | None = None
                      ) -> list[dict[str, torch.Tensor]]:
        """The teacher's detections kept by the score threshold, recorded in the pseudo-label health."""
        ...


@dataclass
class UnsupOutput:
    """One mode's contribution to a step.

    ``loss``: the unweighted unsupervised loss (the module multiplies it by the mode's weight);
    ``logs``: scalars for the logger; ``num_pseudo``: pseudo-boxes made this step (None for a mode
    without pseudo-labels, which then adds nothing to the pseudo-label health and warnings);
    ``empty_scaled``: the loss was scaled by ``semi.empty_weight`` because fewer than half the
    images had a pseudo-box (None: the mode has no such rule).
    """

    loss: torch.Tensor
    logs: dict[str, Any] = field(default_factory=dict)
    num_pseudo: int | None = None
    empty_scaled: bool | None = None


# semi.deploy: which detector val/AP (so best.ckpt) and a checkpoint's deployed weights follow.
DEPLOY_CHOICES = ("best", "teacher", "student")


class SemiMode:
    """The base of a semi mode. Subclasses set the class attributes and implement :meth:`loss`.

    Class attributes:
        name: the ``semi.mode`` it is registered under (set by :func:`register_semi_mode`).
        needs_teacher: the module keeps an EMA teacher, made from the student at the end of burn-in.
        strong_view: the unlabeled loader yields a strong view of each image beside the weak one.
        requires: detector capabilities it needs (:mod:`finetune.detectors.capabilities`).
        after_burn_in: its loss starts once burn-in is over (False: from the first step).
        weight_key: the ``semi.*`` setting that weighs its loss.
        combinable: it can be added to another mode's step when its weight is > 0 (CSD consistency
            on top of a teacher-student mode).
        in_loop: it trains inside fine-tuning's loop with :class:`SemiDetectionModule`; False for a
            mode that runs itself (:meth:`run`, e.g. self-training's rounds of whole fine-tuning runs).
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    strong_view: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    after_burn_in: ClassVar[bool] = True
    weight_key: ClassVar[str] = "unsup_weight"
    combinable: ClassVar[bool] = False
    in_loop: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Refuse a config this mode cannot train, before any data is read (default: the detector
        capabilities in :attr:`requires`, and ``semi.deploy``)."""
        require(str(cfg.detector.name), cls.requires, f"semi={cls.name}")
        deploy = cfg.semi.get("deploy", "teacher")
        if deploy not in DEPLOY_CHOICES:
            raise ValueError(f"semi.deploy={deploy!r}: use one of {', '.join(DEPLOY_CHOICES)} (teacher: the EMA "
                             "teacher once it exists; best: the better of teacher and student at each validation)")

    @classmethod
    def run(cls, cfg: DictConfig, run_dir: Path, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        """Run a mode that is not ``in_loop`` (its own runner, ``callbacks`` for every trainer it builds)
        and return its metrics."""
        raise NotImplementedError(f"semi.mode={cls.name} trains in fine-tuning's loop; it has no runner of its own")

    def weight(self) -> float:
        """The factor of :meth:`loss` in the step's total loss."""
        return float(self.settings.get(self.weight_key, 0.0))

    def setup(self, module: SemiStep) -> None:
        """Adapt the student once it is built (e.g. a focal RoI classifier). Default: nothing."""

    def loss(self, module: SemiStep, unlabeled: Mapping[str, Any]) -> UnsupOutput:
        """The unsupervised loss on one batch of unlabeled images (``unlabeled["weak"]`` and, with
        :attr:`strong_view`, ``unlabeled["strong"]``: lists of image tensors)."""
        raise NotImplementedError


SEMI_MODES: dict[str, type[SemiMode]] = {}
_register = registrar(SEMI_MODES, "semi mode")


def register_semi_mode(name: str):  # type: ignore[no-untyped-def]
    """``@register_semi_mode("name")`` on a :class:`SemiMode` subclass: ``semi.mode=name`` runs it."""

    def add(cls: type[SemiMode]) -> type[SemiMode]:
        cls.name = name
        _register(name)(cls)
        return cls

    return add


def mode_class(name: str) -> type[SemiMode]:
    """The registered mode ``semi.mode=name``."""
    if name not in SEMI_MODES:
        raise ValueError(f"unknown semi.mode {name!r}; registered: {sorted(SEMI_MODES)} (or none)")
    return SEMI_MODES[name]


def modes_of(settings: Mapping[str, Any]) -> list[SemiMode]:
    """The modes one step runs: ``semi.mode`` first, then every other combinable mode whose weight is > 0."""
    main = mode_class(str(settings["mode"]))
    extra = [cls for name, cls in SEMI_MODES.items()
             if name != main.name and cls.combinable and float(settings.get(cls.weight_key, 0.0) or 0.0) > 0]
    return [cls(settings) for cls in (main, *extra)]


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics but leave their running statistics as
    they are (momentum 0), for every unsupervised pass (the student's over the strong views, the
    consistency mode's over perturbed and flipped ones): colour-jittered, grayscale, erased or noised
    images are not the distribution the model is evaluated on, and with trainable BN their statistics
    would otherwise drift into the running ones that validation and the teacher use."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def burn_in_steps(semi: Mapping[str, Any], steps_per_epoch: int) -> int:
    """Burn-in in student steps: ``semi.burn_in_epochs`` epochs of ``steps_per_epoch`` steps if set, else
    ``semi.burn_in`` (the module's burn-in test and the unlabeled sampler's placeholders both read it)."""
    epochs = semi.get("burn_in_epochs")
    return round(float(epochs) * steps_per_epoch) if epochs is not None else int(semi.get("burn_in", 0) or 0)
