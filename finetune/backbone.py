"""Load a pretrained ResNet for detection fine-tuning, with the normalisation swap.

Sources, all read without pickle code execution (:mod:`finetune.backbone_read`):

* the backbone file (``backbone.safetensors`` + ``backbone.json``) written by pretrain;
* a torchvision or timm ResNet state dict (``.pth``/``.pt``/``.bin`` via
  ``torch.load(weights_only=True)``, or a ``.safetensors`` file without its json);
* a checkpoint of another SSL code base (SwAV, MoCo, SimCLR, BYOL, DINO, VICReg, Barlow Twins,
  solo-learn, VISSL, lightly): its heads, queues and momentum copies are listed as ignored;
* a Lightning checkpoint (``.ckpt``) of pretrain, whose weights live under
  ``state_dict["backbone.*"]`` and whose resolved config sits in ``hyper_parameters``, or of a
  fine-tuning run (``backbone.body.*``), so one detector can seed the next.

The ResNet is always built here with the chosen ``norm_layer`` and loaded strictly: torchvision's
detection builders silently fall back to plain BN and all-trainable layers when they are not given
their own weights, so they are avoided.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn

from finetune.backbone_read import IGNORED, read_weights
from pretrain.core.backbone.resnet import ARCHS, NORMS, build_resnet, infer_arch, infer_norm

__all__ = ["BackboneMismatchError", "LoadReport", "load_backbone", "read_weights"]

log = logging.getLogger(__name__)
DEFAULT_ARCH = "resnet50"  # backbone.arch=auto without a checkpoint
# torchvision's defaults, used when the backbone file does not say how it normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Norms whose weights carry BN running statistics; any of them can be loaded into any other.
BN_FAMILY = ("bn", "frozen_bn", "syncbn")


class BackboneMismatchError(ValueError):
    """The weights do not fit the requested architecture or normalisation."""


@dataclass
class LoadReport:
    """What happened when a backbone was loaded.

    Attributes:
        source: the checkpoint path, or None for random initialisation.
        format: ``backbone_file``, ``safetensors``, ``state_dict``, ``lightning_ckpt`` or ``random``.
        matched: keys loaded from the file.
        missing: model keys the file did not provide (empty after a strict load).
        unexpected: file keys the model has no place for (empty after a strict load).
        meta: what the file says about itself (arch, norm, method, epochs, mean/std, ...), with
            ``arch`` and ``norm`` filled in from the weights when the file does not say.
        ignored: keys dropped on purpose: ``fc.*`` classifier weights, ``num_batches_tracked``
            counters that FrozenBatchNorm2d has no buffer for, and the heads, queues and momentum
            copies of SSL checkpoints (see :mod:`pretrain.core.backbone.ssl_checkpoints`).
    """

    source: str | None
    format: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.format == "random":
            return "backbone: random initialisation (no checkpoint)"
        lines = [
            (
                f"backbone: {self.source} ({self.format}; arch={self.meta.get('arch')}, "
                f"norm={self.meta.get('norm')}, method={self.meta.get('method')})"
            ),
            f"  matched    {len(self.matched)}",
            f"  missing    {_preview(self.missing)}",
            f"  unexpected {_preview(self.unexpected)}",
        ]
        if self.ignored:
            lines.append(f"  ignored    {_preview(self.ignored)}")
        return "\n".join(lines)

    @property
    def image_mean(self) -> list[float] | None:
        """Input normalisation mean the backbone was pretrained with, if the file says."""
        return _first_list(self.meta, ("mean", "image_mean", "input_mean"))

    @property
    def image_std(self) -> list[float] | None:
        """Input normalisation std the backbone was pretrained with, if the file says."""
        return _first_list(self.meta, ("std", "image_std", "input_std"))

    def summary(self) -> dict[str, Any]:
        """The ``backbone`` block of finetune's metrics.json."""
        return {
            "checkpoint": self.source,
            "format": self.format,
            "arch": self.meta.get("arch"),
            "norm": self.meta.get("norm"),
            "method": self.meta.get("method"),
            "epochs": self.meta.get("epochs"),
            "num_prototypes": self.meta.get("num_prototypes"),
        }


def load_backbone(
    checkpoint: str | Path | None,
    arch: str,
    norm: str,
    gn_groups: int = 32,
    strict: bool = True,
) -> tuple[torchvision.models.ResNet, LoadReport]:
    """Build a ResNet with the fine-tuning ``norm`` and load pretrained weights into it.

    Args:
        checkpoint: backbone file (``.safetensors`` or its folder), torchvision state dict
            (``.pth``/``.pt``), or pretrain Lightning checkpoint (``.ckpt``); None for random init.
        arch: ``resnet18``/``resnet34``/``resnet50``, or ``auto`` to take it from the file.
        norm: normalisation used while fine-tuning: ``frozen_bn``, ``bn``, ``syncbn`` or ``gn``.
        gn_groups: groups for GroupNorm.
        strict: refuse when keys are missing or unexpected (``fc.*`` and ``num_batches_tracked``
            are always tolerated). With False, load what fits and report the rest.

    Returns:
        The ResNet (``fc`` is Identity) and a LoadReport, which is also logged.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        BackboneMismatchError: arch or norm do not fit, or a strict load found missing/unexpected keys.
        ValueError: an unknown arch/norm, or a file that is not one of the accepted formats.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if checkpoint is None or str(checkpoint) == "":
        if arch == "auto":
            raise ValueError("arch=auto needs a checkpoint to read the architecture from; name an arch")
        model = build_resnet(arch, norm, gn_groups)
        report = LoadReport(source=None, format="random", meta={"arch": arch, "norm": None})
        log.info("%s", report)
        return model, report

    path = Path(checkpoint).expanduser()
    state_dict, meta, fmt = read_weights(path)
    file_arch = meta.get("arch") or infer_arch(state_dict)
    file_norm = infer_norm(state_dict)  # the weights decide, whatever the json claims
    meta = {**meta, "arch": file_arch, "norm": file_norm}

    if arch == "auto":
        if file_arch is None:
            raise BackboneMismatchError(f"cannot tell the ResNet depth of {path}; set the arch explicitly")
        arch = file_arch
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS} or 'auto'")
    if file_arch is not None and file_arch != arch:
        raise BackboneMismatchError(
            f"{path} holds {file_arch} weights but a {arch} backbone was requested; "
            f"set the backbone arch to {file_arch} (override backbone.arch={file_arch}, "
            "or backbone.arch=auto)"
        )
    _check_norm(path, file_norm, norm)

    model = build_resnet(arch, norm, gn_groups)
    heads = meta.pop(IGNORED, [])
    report = _load_into(model, state_dict, strict=strict, source=str(path), fmt=fmt, meta=meta)
    report.ignored = sorted([*report.ignored, *heads])
    log.info("%s", report)
    return model, report


def _check_norm(path: Path, file_norm: str, norm: str) -> None:
    if file_norm == "bn" and norm == "gn":
        raise BackboneMismatchError(
            f"{path} was pretrained with BatchNorm, but GroupNorm fine-tuning was requested: GN cannot use "
            "BN statistics, so the pretrained features would be distorted. Fine-tune with "
            "backbone.norm=frozen_bn (recommended for small batches), bn or syncbn; or pretrain again "
            "with backbone.norm=gn."
        )
    if file_norm == "gn" and norm in BN_FAMILY:
        raise BackboneMismatchError(
            f"{path} was pretrained with GroupNorm and has no BatchNorm running statistics, but "
            f"norm={norm} was requested. Fine-tune with backbone.norm=gn, or pretrain again with "
            "backbone.norm=bn."
        )


def _load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool,
    source: str,
    fmt: str,
    meta: dict[str, Any],
) -> LoadReport:
    target = model.state_dict()
    ignored = sorted(k for k in state_dict if k.startswith("fc."))
    src = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    # FrozenBatchNorm2d keeps no counter, and BN's counter only matters with momentum=None:
    # neither side's num_batches_tracked is worth a mismatch.
    for k in list(src):
        if k.endswith("num_batches_tracked") and k not in target:
            ignored.append(k)
            del src[k]
    missing = sorted(k for k in target if k not in src and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in src if k not in target)
    bad_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in src.items()
        if k in target and v.shape != target[k].shape
    ]
    report = LoadReport(
        source=source,
        format=fmt,
        matched=sorted(k for k in src if k in target and src[k].shape == target[k].shape),
        missing=missing,
        unexpected=unexpected,
        meta=meta,
        ignored=sorted(ignored),
    )
    if bad_shape:
        raise BackboneMismatchError(
            f"{source}: {len(bad_shape)} tensors do not fit the {meta.get('arch')} model, e.g. "
            f"{'; '.join(bad_shape[:3])}. Is the arch right?"
        )
    if strict and (missing or unexpected):
        raise BackboneMismatchError(f"strict load failed, keys do not match:\n{report}")
    model.load_state_dict({k: src[k] for k in report.matched}, strict=False)
    return report


def _first_list(meta: Mapping[str, Any], keys: tuple[str, ...]) -> list[float] | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            return [float(v) for v in value]
    return None


def _preview(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "0"
    head = ", ".join(keys[:n])
    return f"{len(keys)} ({head}{', ...' if len(keys) > n else ''})"


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
