"""The backbone file: the only thing that passes from pretrain to finetune.

``backbone.safetensors`` holds the ResNet weights under torchvision's key names
(no ``fc``); ``backbone.json`` beside it describes them. No pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.core.backbone.ssl_checkpoints import RESNET_STAGES, split_backbone, strip_wrappers

__all__ = ["extract_backbone", "meta_path", "read_backbone_file", "save_backbone_file", "strip_wrappers"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"


def extract_backbone(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online ResNet's weights under torchvision names, from any state dict that holds one.

    Wrapper prefixes are stripped and the encoder is found by its key pattern
    (:func:`pretrain.core.backbone.ssl_checkpoints.split_backbone`): ``backbone.*`` of our checkpoints, a
    detector's ``backbone.body.*``, another SSL code base's layout, or plain torchvision names.
    Momentum copies, heads, queues, counters and ``fc.*`` are left out.
    """
    weights, _ = split_backbone(state_dict)
    return {k: v for k, v in weights.items() if k.split(".", 1)[0] in RESNET_STAGES}


def meta_path(weights: str | Path) -> Path:
    """Where a backbone file's metadata lives: ``backbone.json`` beside ``backbone.safetensors``,
    or ``<name>.json`` beside ``<name>.safetensors``."""
    p = Path(weights)
    return p.with_name(META_NAME) if p.name == WEIGHTS_NAME else p.with_suffix(".json")


def save_backbone_file(
    state_dict: Mapping[str, torch.Tensor], out_dir: str | Path, meta: Mapping[str, Any]
) -> Path:
    """Write ``backbone.safetensors`` and ``backbone.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    for required in ("arch", "norm"):
        if required not in meta:
            raise ValueError(f"backbone metadata needs {required!r}")
    save_file(tensors, str(out / WEIGHTS_NAME))
    full = {"format_version": FORMAT_VERSION, **meta}
    (out / META_NAME).write_text(json.dumps(full, indent=2, default=str))
    return out / WEIGHTS_NAME


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a backbone file (weights path or its directory) and its metadata."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.exists():
        raise FileNotFoundError(f"no backbone weights at {p}")
    meta_file = meta_path(p)
    if not meta_file.exists():
        raise FileNotFoundError(
            f"{p} has no {meta_file.name} beside it; the backbone file format needs both "
            "(re-export with `python -m pretrain.export CKPT`)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_file} has format version {meta['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}: upgrade the package"
        )
    return load_file(str(p)), meta
