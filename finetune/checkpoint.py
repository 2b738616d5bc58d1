"""A trained detector back from its fine-tuning checkpoint, with nothing else: the checkpoint carries
the resolved config, the label map and the backbone description (see :mod:`finetune.module`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from finetune.module import DetectionModule
from pretrain.core.run.safe_load import load_torch_file


def load_detection_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                              weights: str = "auto") -> DetectionModule:
    """Rebuild a trained detector from its Lightning checkpoint alone (``weights_only=True``).

    Args:
        path: a ``.ckpt`` written by ``python -m finetune``, by any stage.
        map_location: where to load the tensors.
        weights: which of the checkpoint's named weight sets (``checkpoint["weight_sets"]``, see
            :meth:`DetectionModule.weight_sets`): ``auto`` (the one the run deployed) or a name it
            holds (plain fine-tuning checkpoints hold only ``student``; a stage that trains more
            than one detector names its own).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a fine-tuning checkpoint of this package, or no weight set of that name in it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    ckpt = load_torch_file(p, "detector checkpoint", map_location=map_location)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not hp or not {"cfg", "label_map", "backbone_info"} <= set(hp) or "state_dict" not in ckpt:
        raise ValueError(
            f"{p} is not a fine-tuning checkpoint (needs hyper_parameters cfg/label_map/backbone_info "
            "and a state_dict); pass a .ckpt written by `python -m finetune`"
        )
    state = ckpt["state_dict"]
    sets = ckpt.get("weight_sets") or legacy_weight_sets(ckpt)
    prefixes = {name: prefix for name, prefix in sets["prefixes"].items() if any(k.startswith(prefix) for k in state)}
    use = sets["deploy"] if weights == "auto" else weights
    if use not in prefixes:
        held = ", ".join(sorted(prefixes)) or "none"
        raise ValueError(f"{p} has no {use!r} weights (it holds: {held}); use weights=auto or one of them")
    prefix = prefixes[use]
    model_state = {"model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    module = DetectionModule(cfg=hp["cfg"], label_map=hp["label_map"], backbone_info=hp["backbone_info"],
                             num_classes=hp.get("num_classes"))
    module.load_state_dict(model_state, strict=True)
    module.history = list(ckpt.get("history", []))
    module.skipped_images = dict.fromkeys(ckpt.get("skipped_images", []))
    module.checkpoint_epoch = ckpt.get("epoch")
    module.checkpoint_step = ckpt.get("global_step")
    module.deployed_weights = use
    return module.eval()


def legacy_weight_sets(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The weight sets of a checkpoint saved before they were recorded: ``student`` under ``model.``, and
    every other top-level prefix whose keys mirror the student's (a second detector kept beside it)
    under its own name; deployed is the name an old section's ``deploy`` gives, else ``student``."""
    state = ckpt["state_dict"]
    student = {k[len("model."):] for k in state if k.startswith("model.")}
    prefixes = {"student": "model."}
    for top in sorted({k.split(".", 1)[0] for k in state} - {"model"}):
        if {k[len(top) + 1:] for k in state if k.startswith(top + ".")} == student:
            prefixes[top] = top + "."
    deploy = next((v["deploy"] for v in ckpt.values() if isinstance(v, Mapping)
                   and isinstance(v.get("deploy"), str) and v["deploy"] in prefixes), "student")
    return {"deploy": deploy, "prefixes": prefixes}
