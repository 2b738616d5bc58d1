"""Export the pretrained backbone file from a finished run or any pretrain Lightning checkpoint.

``python -m pretrain.export RUN/checkpoints/last.ckpt [--out DIR]`` writes
``backbone.safetensors`` + ``backbone.json`` (see pretrain/core/backbone/backbone_file.py and DESIGN.md) into
the checkpoint's run directory or ``DIR``. The checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.core.backbone.backbone_file import extract_backbone, save_backbone_file
from pretrain.core.backbone.resnet import FEATURE_DIMS, build_resnet
from pretrain.core.run.checkpoints import run_dir_of
from pretrain.core.run.safe_load import load_torch_file

# Method config keys that describe code or augmentation plumbing rather than the method.
_NOT_SETTINGS = ("name", "module", "transform")


def method_settings(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method's hyperparameters for backbone.json: everything but plumbing, plus the views."""
    out = {k: v for k, v in method_cfg.items() if k not in _NOT_SETTINGS}
    transform = method_cfg.get("transform") or {}
    out["views"] = {k: v for k, v in transform.items() if not k.startswith("_") and k != "normalize"}
    return out


def backbone_meta(
    config: Mapping[str, Any], images_seen: int, epochs: int, global_step: int | None = None,
    source: str | None = None, resolved: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``backbone.json`` content (without ``format_version``, which the writer adds).

    ``resolved``: settings the run derived from ``auto`` config values (e.g. MoCo's queue length),
    added to ``method_settings``.
    """
    bcfg, mcfg, dcfg = config["backbone"], config["method"], config["data"]
    norm = bcfg.get("norm", "bn")
    meta: dict[str, Any] = {
        "arch": bcfg["arch"],
        # SyncBN weights are BN weights; downstream only cares about BN vs GN.
        "norm": "bn" if norm == "syncbn" else norm,
        "gn_groups": bcfg.get("gn_groups", 32) if norm == "gn" else None,
        "feature_dim": FEATURE_DIMS[bcfg["arch"]],
        "method": mcfg["name"],
        "num_prototypes": mcfg.get("num_prototypes"),
        "method_settings": {**method_settings(mcfg), **dict(resolved or {})},
        "epochs": int(epochs),
        "global_step": None if global_step is None else int(global_step),
        "images_seen": int(images_seen),
        "mean": list(dcfg["mean"]),
        "std": list(dcfg["std"]),
        "source": source,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": dict(config),
    }
    return meta


def backbone_state(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The online backbone's weights under torchvision names, checked against the configured arch.

    Raises:
        ValueError: when the keys do not match the ResNet the config describes.
    """
    sd = extract_backbone(state_dict)
    bcfg = config["backbone"]
    norm = bcfg.get("norm", "bn")
    ref = build_resnet(bcfg["arch"], "bn" if norm == "syncbn" else norm, bcfg.get("gn_groups", 32)).state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    if missing or unexpected:
        raise ValueError(
            f"backbone weights do not match {bcfg['arch']} with norm={norm}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in ref.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"backbone weight {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    return {k: sd[k] for k in ref}


def write_backbone(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    out_dir: str | Path,
    images_seen: int,
    epochs: int,
    global_step: int | None = None,
    source: str | None = None,
    resolved: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` for a module's full state dict."""
    weights = backbone_state(state_dict, config)
    meta = backbone_meta(config, images_seen, epochs, global_step, source, resolved)
    return save_backbone_file(weights, out_dir, meta)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pretrain Lightning checkpoint, loaded with ``weights_only=True``, checked for its config."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    ckpt = load_torch_file(p, "pretraining checkpoint")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "backbone" not in config or "method" not in config:
        raise ValueError(
            f"{p} carries no pretrain config in hyper_parameters['config']; it was not written by "
            "`python -m pretrain` (a plain ResNet state dict can be given to finetune directly)"
        )
    if "state_dict" not in ckpt:
        raise ValueError(f"{p} has no state_dict")
    return ckpt


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the backbone file of a pretrain checkpoint.

    Args:
        ckpt_path: a ``.ckpt`` written by ``python -m pretrain``.
        out_dir: where to write; default: the run directory (the checkpoint folder's parent).

    Returns:
        The path of ``backbone.safetensors``.
    """
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    sd = ckpt["state_dict"]
    if out_dir is None:
        out_dir = run_dir_of(ckpt_path)
    images_seen = int(sd["images_seen"]) if "images_seen" in sd else 0
    epochs = int(sd["epochs_done"]) if "epochs_done" in sd else int(ckpt.get("epoch", 0))
    return write_backbone(sd, ckpt["hyper_parameters"]["config"], out_dir, images_seen, epochs,
                          ckpt.get("global_step"), source=str(ckpt_path.resolve()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Write backbone.safetensors + backbone.json from a pretrain Lightning checkpoint.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `python -m pretrain` (e.g. RUN/checkpoints/last.ckpt)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's run directory)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as e:  # UnsafeCheckpointError and CorruptCheckpointError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
