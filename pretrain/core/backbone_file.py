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

FORMAT_VERSION = 1
WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"
# Prefixes that wrappers add in front of torchvision's names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.")


def strip_wrappers(key: str) -> str:
    """Remove torch.compile / DDP / wrapper prefixes wherever they appear at the front."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
        key = key.replace("._orig_mod.", ".")
    return key


def extract_backbone(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Keep the online backbone's weights under torchvision names.

    Keys under ``prefix`` (after wrapper prefixes are stripped) are kept with the
    prefix removed; momentum copies (``backbone_momentum.``), heads, prototypes and
    ``fc.*`` are dropped. A state dict that already has torchvision names (a plain
    ResNet) is returned without ``fc.*``.
    """
    cleaned = {strip_wrappers(k): v for k, v in state_dict.items()}
    if any(k.startswith(prefix) for k in cleaned):
        out = {k[len(prefix) :]: v for k, v in cleaned.items() if k.startswith(prefix)}
    else:
        out = dict(cleaned)
    return {k: v for k, v in out.items() if not k.startswith("fc.")}


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
    meta_path = p.with_name(META_NAME) if p.name == WEIGHTS_NAME else p.with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{p} has no {meta_path.name} beside it; the backbone file format needs both "
            "(re-export with `python -m pretrain.export CKPT`)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format version {meta['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}: upgrade the package"
        )
    return load_file(str(p)), meta
