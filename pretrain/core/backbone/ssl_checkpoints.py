"""The ResNet inside the checkpoints of other self-supervised code bases.

Users bring checkpoints from the official releases, each with its own layout (keys after the
``module.`` / ``model.`` wrappers are stripped):

=============  ===========================================  ==========================================
repository     ResNet under                                 ignored, listed in the load report
=============  ===========================================  ==========================================
SwAV           (top level)                                  ``projection_head.*``, ``prototypes.*``
MoCo v1/v2     ``encoder_q.*``                              ``encoder_q.fc.*``, ``encoder_k.*``, ``queue``
MoCo v3        ``base_encoder.*``                           ``base_encoder.fc.*``, ``momentum_encoder.*``,
                                                            ``predictor.*``
SimCLR         ``encoder.*`` or (top level)                 ``projector.*``, ``fc.*``
BYOL           ``online_encoder.net.*`` / ``online_network  ``online_encoder.projector.*``,
               .encoder.*`` / ``net.*``                     ``online_predictor.*``, ``target_*``
DINO           ``teacher``: ``backbone.*``                  ``head.*``
VICReg         ``backbone.*`` or (top level)                ``projector.*``
Barlow Twins   ``backbone.*`` or (top level)                ``projector.*``, ``bn.*``
solo-learn     ``backbone.*``                               ``projector.*``, ``classifier.*``,
                                                            ``momentum_*``, ``predictor.*``, ``queue``
VISSL          ``trunk._feature_blocks.*`` (nested dicts)   ``heads.*``
lightly        ``backbone.*`` (torchvision names, or the    ``projection_head.*``, ``prediction_head.*``,
               ``nn.Sequential`` indices 0/1/4-7)           ``prototypes.*``, ``*_momentum.*``
timm           (top level)                                  ``fc.*``
=============  ===========================================  ==========================================

The ResNet is found by its key pattern wherever it sits; every other key must belong to a known
head (then it is listed as ignored) or it stays in the weights as *unexpected*, which a strict
load refuses: nothing is dropped silently. This project's own pretraining checkpoints
(``backbone.*`` beside the heads, ``backbone_momentum.*`` and the queues) and fine-tuned detectors
(``model.backbone.body.*``) are read the same way, by :func:`pretrain.core.backbone.backbone_file.extract_backbone`
and by fine-tuning's loader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# Prefixes that wrappers add in front of torchvision's names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.")
# Containers that hold the state dict inside a checkpoint file, most specific first.
CONTAINERS = ("state_dict", "model", "teacher", "classy_state_dict", "base_model", "online_network_state_dict")
# Where the *online* encoder sits, preferred in this order when several ResNet copies are present
# (MoCo's encoder_k, BYOL's target, solo-learn's momentum_backbone are the other copies).
ONLINE_PREFIXES = ("", "backbone.", "encoder_q.", "base_encoder.", "encoder.", "online_encoder.net.",
                   "online_network.encoder.", "online_network.", "net.", "trunk._feature_blocks.",
                   "_feature_blocks.", "trunk.")
# First key components of the parts that are not the backbone, across the code bases above.
KNOWN_PARTS = frozenset({
    "projection_head", "prediction_head", "prototypes", "projector", "predictor", "head", "heads",
    "classifier", "fc", "bn", "queue", "queue_ptr", "encoder_k", "momentum_encoder", "momentum_backbone",
    "momentum_projector", "backbone_momentum", "projection_head_momentum", "target_encoder", "target_network",
    "target_projector", "online_projector", "online_predictor", "teacher", "student", "local_crops",
    "rpn", "roi_heads",  # a torchvision detector's heads, when one detector seeds the next
    "epochs_done", "images_seen", "queue_count",  # this project's pretraining counters
    "dense_head", "dense_head_momentum",  # DenseCL's per-location projection (ours and lightly's name)
})
# The first key component of a torchvision ResNet's weights (``fc`` is its classifier).
RESNET_STAGES = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})
_RESNET_PARTS = RESNET_STAGES | {"fc", "body"}
_RESNET_KEY = re.compile(r"(?:^|\.)((?:conv1|bn1|layer[1-4]|fc)\.)")
# lightly's examples wrap the ResNet as nn.Sequential(*list(resnet.children())[:-1]).
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


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


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` state dict inside a checkpoint object (nested dicts joined by dots;
    non-tensor entries such as ``epoch`` or ``arch`` left out)."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(  # noqa: TRY004 (read_weights turns ValueErrors into one message)
            f"a checkpoint must hold a state dict (a mapping of tensors), got {type(obj).__name__}")
    flat: dict[str, torch.Tensor] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, torch.Tensor):
                flat[prefix + str(k)] = v
            elif isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")

    walk(obj, "")
    return flat


def _lightly_sequential(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.0.weight`` / ``backbone.4.0.conv1.weight`` -> torchvision names, where the
    indices are those of a ResNet's children in an nn.Sequential."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*?)([0-7])\.(.*)$", k)
        if m and f"{m.group(1)}4.0.conv1.weight" in sd and f"{m.group(1)}0.weight" in sd and m.group(2) in _SEQUENTIAL:
            k = f"{m.group(1)}{_SEQUENTIAL[m.group(2)]}.{m.group(3)}"
        out[k] = v
    return out


def resnet_prefixes(keys: list[str]) -> dict[str, int]:
    """Every prefix under which ResNet-named keys (conv1, bn1, layer1-4) sit, with their count."""
    counts: dict[str, int] = {}
    for k in keys:
        m = _RESNET_KEY.search(k)
        if m and not m.group(1).startswith("fc."):
            prefix = k[: m.start(1)]
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def split_backbone(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ResNet's weights under torchvision names, and the keys of known heads that were left out.

    Keys that belong neither to the ResNet nor to a known head stay in the returned weights, where
    the loader reports them as unexpected. ``fc.*`` stays too (the loader lists it as ignored).

    Raises:
        ValueError: no ResNet-looking keys, or several unknown ResNet copies to choose from.
    """
    sd = _lightly_sequential({strip_wrappers(k): v for k, v in state_dict.items()})
    prefixes = resnet_prefixes(list(sd))
    if not prefixes:
        raise ValueError(f"no ResNet weights (conv1, bn1, layer1-4) found; first keys: {list(sd)[:5]}")
    known = [p for p in ONLINE_PREFIXES if prefixes.get(p, 0) >= 0.5 * max(prefixes.values())]
    if known:
        chosen = known[0]
    else:
        top = sorted(prefixes, key=prefixes.__getitem__, reverse=True)
        if len(top) > 1 and prefixes[top[0]] == prefixes[top[1]]:
            raise ValueError(f"several ResNet copies of equal size under {top[:3]}: which one is the encoder? "
                             "Save the encoder's own state_dict() and load that.")
        chosen = top[0]
    def encoder_key(k: str) -> bool:
        return k.startswith(chosen) if chosen else k.split(".", 1)[0] in _RESNET_PARTS

    weights = {k[len(chosen):]: v for k, v in sd.items() if encoder_key(k)}
    if any(k.startswith("body.") for k in weights):  # a torchvision detector's backbone.body.*
        weights = {k[len("body."):]: v for k, v in weights.items() if k.startswith("body.")}
    copies = [p for p in prefixes if p and p != chosen]
    if chosen.endswith("body."):  # a detector: its FPN sits beside the body
        copies.append(chosen[: -len("body.")] + "fpn.")
    ignored = []
    for k, v in sd.items():
        if encoder_key(k):
            continue
        if KNOWN_PARTS.intersection(k.split(".")) or any(k.startswith(p) for p in copies):
            ignored.append(k)  # a head, a queue or another (momentum / target) copy of the encoder
        else:
            weights[k] = v  # unknown: reported as unexpected
    # Keys under the encoder prefix that are not ResNet weights (an MLP head kept as fc.0/fc.2 stays
    # as fc.* for the loader, anything else is unexpected there too).
    return weights, sorted(ignored)
