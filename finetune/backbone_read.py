"""Read ResNet weights and what the file says about them, from every accepted checkpoint kind.

All are read without pickle code execution: the backbone file (``.safetensors`` + ``.json``), a
bare ``.safetensors``, a Lightning ``.ckpt`` (pretrain's or a fine-tuning run's) and the ``.pth`` /
``.pt`` / ``.bin`` / ``.tar`` state dicts of torchvision, timm and the SSL code bases
(:mod:`pretrain.core.backbone.ssl_checkpoints` finds the ResNet in each).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pretrain.core.backbone.backbone_file import WEIGHTS_NAME, extract_backbone, meta_path, read_backbone_file
from pretrain.core.backbone.ssl_checkpoints import split_backbone, unwrap
from pretrain.core.run.safe_load import load_torch_file

# Key of read_weights' metadata listing the head / queue / momentum-copy keys it left out.
IGNORED = "ignored_keys"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read ResNet weights under torchvision names from any accepted file.

    Returns:
        (state dict under torchvision names, metadata, format name). A ``fc.*`` classifier may
        remain (the loader lists it as ignored); the keys of known SSL heads, queues and momentum
        copies are left out and named under ``metadata[IGNORED]``.
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
    if suffix in TORCH_SUFFIXES:
        # torchvision references save {"model": sd}, MoCo {"state_dict": sd}, DINO {"teacher": sd},
        # VISSL nested dicts: pretrain.core.backbone.ssl_checkpoints knows the layouts of the SSL code bases.
        try:
            weights, ignored = split_backbone(unwrap(_torch_load(path)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return weights, {IGNORED: ignored}, "state_dict"
    raise ValueError(
        f"unrecognised backbone checkpoint {path}: expected a backbone file (.safetensors + .json), "
        f"a torchvision state dict ({'/'.join(TORCH_SUFFIXES)}) or a pretrain checkpoint (.ckpt)"
    )


def _torch_load(path: Path) -> Any:
    return load_torch_file(path, "backbone checkpoint")


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
