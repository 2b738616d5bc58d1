"""Inference settings shared by ``finetune.evaluate``, ``finetune.predict`` and the benchmarks.

Two knobs decide a CPU's inference time besides the image size (``scripts/bench_infer.py`` measures
where the time goes and what each setting costs in AP):

- **precision**: ``auto`` (the default) runs the forward pass under bf16 autocast where bf16 is
  computed natively (CPUs with ``avx512_bf16``/AMX, CUDA GPUs with bf16), fp16 autocast on CUDA GPUs
  without bf16, fp32 elsewhere: the same choice as ``trainer.precision=auto``, so stand-alone
  evaluation sees the numbers that validation and the run's own final evaluation (metrics.json,
  which runs at the training precision) saw. The detectors' heads hand fp32
  outputs on (``finetune.detectors.builders.fp32_head_outputs``), so box decoding, scores and NMS
  run in fp32 whatever the precision of the layers before them.
- **proposals**: Faster R-CNN's test-time RPN budget, the regions its box head classifies per image
  (torchvision's default: the top 1000 per FPN level before NMS, 1000 after). The box head's two
  1024-wide layers run on every proposal, and the per-class post-processing on every proposal x
  class, so on a CPU they, not the ResNet, dominate at small image sizes. ``proposals=N`` keeps the
  top N after NMS (and N per level before it unless ``pre_nms`` says otherwise). For RetinaNet
  it is ``topk_candidates``, the candidates per level before NMS (default 1000).

And one that trades time for AP: **tta** ``flip`` (Faster R-CNN) averages the RoI head's class
probabilities and box deltas for the RPN's proposals over each image and its mirror image, the
teacher ensemble of ``semi.teacher_flip`` (:func:`finetune.detectors.roi_ensemble.teacher_forward`): twice the
backbone's cost (chess, the converged detectors of split seeds 1-3: +0.5, +1.4, +1.8 AP at bf16).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.detectors import capabilities_of
from finetune.detectors.roi_ensemble import teacher_forward
from pretrain.core.run.precision import choose

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TTA_MODES = ("flip",)  # test-time augmentations besides none


def detect(model: nn.Module, images: list[torch.Tensor], tta: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The eval-mode detections of ``images`` (on the model's device), plain or under ``tta``."""
    if tta is None:
        return model(images)  # type: ignore[no-any-return]
    if tta == "flip":
        return teacher_forward(model, images, flip=True).detections  # type: ignore[arg-type]
    raise ValueError(f"tta must be None or one of {TTA_MODES}, got {tta!r}")


@dataclass(frozen=True)
class InferenceSetup:
    """What the model runs with, for metrics.json and the logs."""

    device: str
    precision: str
    channels_last: bool
    reason: str
    proposals: dict[str, int | None]
    tta: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "channels_last": self.channels_last,
                "reason": self.reason, **self.proposals, "tta": self.tta}

    def detect(self, model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """:func:`detect` with this setup's test-time augmentation (call it inside :meth:`autocast`)."""
        return detect(model, images, self.tta)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's autocast context (none in fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            yield
        else:
            with torch.autocast(torch.device(self.device).type, dtype=dtype):
                yield


def set_test_budget(model: nn.Module, proposals: int | None = None,
                    pre_nms: int | None = None) -> dict[str, int | None]:
    """Set the test-time proposal budget in place (None keeps the model's); returns what is now in force.

    What the budget is depends on the detector (its registered ``set_test_budget``): Faster R-CNN's
    RPN proposals, RetinaNet's candidates per level.

    Raises:
        ValueError: a budget below 1.
        TypeError: the detector has no test-time budget.
    """
    for name, v in (("proposals", proposals), ("pre_nms", pre_nms)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    setter = capabilities_of(model).set_test_budget
    if setter is None:
        raise TypeError(f"{type(model).__name__}: no test-time proposal budget to set")
    return dict(setter(model, proposals, pre_nms))


def prepare(model: nn.Module, device: str | torch.device = "cpu", precision: str = "auto",
            proposals: int | None = None, pre_nms: int | None = None, tta: str | None = None) -> InferenceSetup:
    """Put ``model`` in eval mode on ``device``, channels_last where it helps, with the test budget set.

    ``precision``: ``auto`` (chosen from the hardware, as ``trainer.precision=auto``) or an explicit
    ``32`` / ``bf16-mixed`` / ``16-mixed``. ``tta``: None or ``flip`` (a detector with RoI heads). Run
    the forward pass as ``setup.detect(model, images)`` inside ``setup.autocast()``.

    Raises:
        ValueError: an unknown precision or ``tta``, or ``flip`` on a detector without RoI heads.
    """
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta must be None or one of {TTA_MODES}, got {tta!r}")
    if tta == "flip" and not capabilities_of(model).roi_heads:
        raise ValueError(f"tta flip averages the RoI head's outputs over the image and its mirror: "
                         f"{type(model).__name__} has no roi_heads (use detector=fasterrcnn)")
    device = torch.device(device)
    choice = choose({"accelerator": device.type, "precision": precision})
    if choice.precision not in ("32", *AUTOCAST_DTYPES):
        raise ValueError(f"inference precision {choice.precision!r}: choose auto, 32, bf16-mixed or 16-mixed")
    model.eval().to(device)
    if choice.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    budget = set_test_budget(model, proposals, pre_nms)
    return InferenceSetup(str(device), choice.precision, choice.channels_last, choice.reason, budget, tta)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """``--precision``, ``--proposals`` / ``--pre-nms`` and ``--tta`` for the command lines that run a
    detector (pass ``args.tta`` through :func:`tta_arg`)."""
    parser.add_argument("--precision", default="auto", choices=("auto", "32", *AUTOCAST_DTYPES),
                        help="forward-pass precision (auto: bf16 where computed natively, as in training)")
    parser.add_argument("--proposals", type=int, default=None,
                        help="Faster R-CNN: RPN proposals kept per image after NMS (and per level before it); "
                             "RetinaNet: candidates per level. Default: the checkpoint's. Fewer is faster on a CPU; "
                             "scripts/bench_infer.py measures what it costs in AP")
    parser.add_argument("--pre-nms", type=int, default=None,
                        help="Faster R-CNN: RPN candidates per level before NMS; RetinaNet: as --proposals")
    parser.add_argument("--tta", choices=("none", *TTA_MODES), default="none",
                        help="test-time augmentation. flip (Faster R-CNN): the RoI head averaged over each image "
                             "and its mirror image (the semi.teacher_flip teacher), at twice the backbone's cost")


def tta_arg(value: str) -> str | None:
    """``--tta``'s value as :func:`prepare` takes it (``none``: None)."""
    return None if value == "none" else value
