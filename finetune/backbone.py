"""Load a pretrained ResNet for detection fine-tuning, with the normalisation swap.

Three sources are accepted, all read without pickle code execution:

* the backbone file (``backbone.safetensors`` + ``backbone.json``) written by pretrain;
* a plain torchvision ResNet state dict (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``,
  or a ``.safetensors`` file without its json);
* a pretrain Lightning checkpoint (``.ckpt``), whose weights live under ``state_dict["backbone.*"]``
  and whose resolved config sits in ``hyper_parameters``.

The ResNet inside a torchvision detector's weights (``backbone.body.*``, e.g. a finished fine-tuning
run) is recognised too, so one detector can seed the next.

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
from safetensors.torch import load_file
from torch import nn

from pretrain.core.backbone_file import WEIGHTS_NAME, extract_backbone, meta_path, read_backbone_file
from pretrain.core.resnet import ARCHS, NORMS, build_resnet, infer_arch, infer_norm
from pretrain.core.ssl_checkpoints import split_backbone, unwrap

log = logging.getLogger(__name__)

# Norms whose weights carry BN running statistics; any of them can be loaded into any other.
BN_FAMILY = ("bn", "frozen_bn", "syncbn")
# Key of read_weights' metadata listing the head / queue / momentum-copy keys it left out.
IGNORED = "ignored_keys"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


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
            copies of SSL checkpoints (see :mod:`pretrain.core.ssl_checkpoints`).
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
            f"set the backbone arch to {file_arch} (override backbone.arch={file_arch}, or backbone.arch=auto)"
        )
    _check_norm(path, file_norm, norm)

    model = build_resnet(arch, norm, gn_groups)
    heads = meta.pop(IGNORED, [])
    report = _load_into(model, state_dict, strict=strict, source=str(path), fmt=fmt, meta=meta)
    report.ignored = sorted([*report.ignored, *heads])
    log.info("%s", report)
    return model, report


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read ResNet weights under torchvision names from any accepted file.

    Returns:
        (state_dict without ``fc.*``, metadata, format name).
    """
    if not path.exists():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS_NAME}")
        path = path / WEIGHTS_NAME
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if meta_path(path).exists():
            sd, meta = read_backbone_file(path)
            meta = {**meta, **_method_meta(meta.get("config") or {}), **_flat_meta(meta)}
            return extract_backbone(sd), meta, "backbone_file"
        weights, ignored = split_backbone(load_file(str(path)))
        return weights, {IGNORED: ignored}, "safetensors"
    if suffix == ".ckpt":
        ckpt = _torch_load(path)
        if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
        sd = ckpt["state_dict"]
        try:
            weights, ignored = split_backbone(sd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}; is it a pretrain or fine-tuning checkpoint?") from e
        hp = ckpt.get("hyper_parameters") or {}
        cfg = (hp.get("config") or hp.get("cfg") or hp) if isinstance(hp, Mapping) else {}
        meta = _method_meta(cfg)
        # What was trained, which for a mid-run checkpoint is less than max_epochs: pretrain keeps
        # counters as buffers; otherwise Lightning's 0-based epoch of the save.
        if "epochs_done" in sd:
            meta["epochs"] = int(sd["epochs_done"])
        elif "epoch" in ckpt:
            meta["epochs"] = int(ckpt["epoch"]) + 1
        if "images_seen" in sd:
            meta["images_seen"] = int(sd["images_seen"])
        return weights, {**meta, IGNORED: ignored}, "lightning_ckpt"
    if suffix in _TORCH_SUFFIXES:
        # torchvision references save {"model": sd}, MoCo {"state_dict": sd}, DINO {"teacher": sd},
        # VISSL nested dicts: pretrain.core.ssl_checkpoints knows the layouts of the SSL code bases.
        try:
            weights, ignored = split_backbone(unwrap(_torch_load(path)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return weights, {IGNORED: ignored}, "state_dict"
    raise ValueError(
        f"unrecognised backbone checkpoint {path}: expected a backbone file (.safetensors + .json), "
        f"a torchvision state dict ({'/'.join(_TORCH_SUFFIXES)}) or a pretrain checkpoint (.ckpt)"
    )


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


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True): {e}. Checkpoints holding pickled "
            "objects are not loaded; save a plain state dict (model.state_dict()) instead."
        ) from e


def _method_meta(cfg: Any) -> dict[str, Any]:
    """arch/norm/method/epochs/num_prototypes from a resolved pretrain config, when present."""
    if not isinstance(cfg, Mapping):
        return {}
    out: dict[str, Any] = {}
    backbone = cfg.get("backbone") or {}
    method = cfg.get("method") or {}
    trainer = cfg.get("trainer") or {}
    data = cfg.get("data") or {}
    if isinstance(backbone, Mapping):
        for key in ("arch", "norm"):
            if backbone.get(key) not in (None, "auto"):
                out[key] = backbone[key]
    if isinstance(method, Mapping):
        if method.get("name") is not None:
            out["method"] = method["name"]
        if method.get("num_prototypes") is not None:
            out["num_prototypes"] = method["num_prototypes"]
    if isinstance(trainer, Mapping) and trainer.get("max_epochs") is not None:
        out["max_epochs"] = out["epochs"] = trainer["max_epochs"]
    if isinstance(data, Mapping):  # the input normalisation the backbone was trained with
        for key in ("mean", "std"):
            if isinstance(data.get(key), (list, tuple)):
                out[key] = list(data[key])
    return out


def _flat_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys of backbone.json win over the embedded config; nested hparams fill gaps."""
    out = {k: v for k, v in meta.items() if v is not None}
    for nested in ("method_settings", "hparams", "hyperparameters"):
        block = meta.get(nested)
        if isinstance(block, Mapping):
            for k, v in block.items():
                out.setdefault(k, v)
    if isinstance(out.get("method"), Mapping):  # {"method": {"name": ..., ...}}
        block = out["method"]
        out["method"] = block.get("name")
        for k, v in block.items():
            if k != "name":
                out.setdefault(k, v)
    return out


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
