"""Detector builders: the torchvision class plus our backbone wrapping, one registered builder each.

Adding a detector is one file with a function decorated with ``@register_detector("name",
capabilities)`` (imported by ``finetune/detectors/__init__.py``) and one yaml in
``conf/finetune/detector/`` naming it; :func:`build_detector` does the shared part (arguments,
anchors, frozen stages) and dispatches. Faster R-CNN is :mod:`finetune.detectors.fasterrcnn`,
RetinaNet :mod:`finetune.detectors.retinanet`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from finetune.detectors.capabilities import DetectorCapabilities, register_capabilities
from finetune.detectors.freezing import freeze_stages
from finetune.detectors.heads import (
    FPN_CHANNELS,
    norm_factory,
)
from finetune.detectors.registry import registrar

RETINANET_BOX_LOSSES = ("smooth_l1", "l1", "giou", "diou", "ciou")
NUM_LEVELS = 5  # P2-P6 (Faster R-CNN) and P3-P7 (RetinaNet) alike


@dataclass
class DetectorSpec:
    """What every builder receives, validated and resolved by :func:`build_detector`."""

    backbone: torchvision.models.ResNet
    num_classes: int
    trainable_layers: int
    anchor_sizes: Sequence[int] | Sequence[Sequence[int]] | None
    aspect_ratios: tuple[float, ...]
    box_head: str
    box_loss: str
    transform: dict[str, Any]  # min_size, max_size, image_mean, image_std for the torchvision class
    score_thresh: float
    detections_per_img: int
    options: dict[str, Any]  # our keyword options (head_norm, fpn_norm, representation_size, ...)
    extra: dict[str, Any]  # everything else: passed to the torchvision class


Builder = Callable[[DetectorSpec], nn.Module]
DETECTORS: dict[str, Builder] = {}
# Our keyword options (popped before the rest goes to the torchvision class), with defaults.
OPTIONS = {"head_norm": None, "fpn_norm": None, "fpn_channels": FPN_CHANNELS, "aspect_ratios": (0.5, 1.0, 2.0),
           "representation_size": 1024, "retinanet_p6p7_from": "c5", "smooth_l1_beta": 0.1, "roi_sampling_ratio": 2}


_register_builder = registrar(DETECTORS, "detector")


def register_detector(name: str, capabilities: DetectorCapabilities | None = None) -> Callable[[Builder], Builder]:
    """``@register_detector("name", capabilities)`` adds ``fn(spec) -> nn.Module`` as the builder of
    ``detector.name=<name>``, with what the detector can do (:mod:`finetune.detectors.capabilities`).

    Without ``capabilities`` the built model is known by its class (e.g. a builder that returns a
    torchvision FasterRCNN has Faster R-CNN's capabilities), and name-based config checks refuse it.
    """

    def add(fn: Builder) -> Builder:
        _register_builder(name)(fn)
        if capabilities is not None:
            register_capabilities(name, capabilities)
        return fn

    return add


def build_detector(
    name: str,
    backbone: torchvision.models.ResNet,
    arch: str,
    num_classes: int,
    trainable_layers: int = 3,
    box_head: str = "mlp",
    box_loss: str = "smooth_l1",
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] | Sequence[Sequence[int]] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    **kwargs: Any,
) -> nn.Module:
    """Wrap a loaded ResNet into a torchvision detector.

    Args:
        name: a registered detector (``DETECTORS``): ``fasterrcnn`` (P2-P6 FPN, RPN + RoI head) or
            ``retinanet`` (P3-P7 FPN, focal loss); add one with :func:`register_detector`.
        backbone: the ResNet from :func:`finetune.backbone.load_backbone`, in any norm.
        arch: its architecture name (recorded on the model as ``arch``; the FPN reads channels
            from the module itself).
        num_classes: K, the number of foreground classes; labels are 1..K.
        trainable_layers: backbone stages left trainable, counted from layer4 (torchvision's
            convention): 0 = none, 4 = layer1-4, 5 = also the stem (conv1/bn1). BatchNorm inside
            frozen stages is converted to FrozenBatchNorm2d so its statistics do not drift either.
        box_head: Faster R-CNN RoI box head: ``mlp`` (torchvision's TwoMLPHead), ``mlp_ln`` (the
            same with LayerNorm after each layer), ``res5`` (two residual bottleneck blocks on the
            7x7 RoI features, average pooled, then fc) or ``4conv1fc`` (four 3x3 convs + fc,
            torchvision's FastRCNNConvFCHead as in Faster R-CNN v2 / "Rethinking ImageNet
            pre-training"). RetinaNet keeps its own head and accepts only the default ``mlp``.
        box_loss: Faster R-CNN supports ``smooth_l1`` only (torchvision's fixed RoI/RPN loss);
            RetinaNet supports ``smooth_l1`` (beta ``smooth_l1_beta``, default 0.1 as in
            detectron2), ``l1`` (torchvision v1), ``giou`` (torchvision v2), ``diou``, ``ciou``.
        min_size: shorter side the detector resizes every image to; a list trains at a random
            one of them per batch (multi-scale training) and evaluates at the last.
        max_size: cap on the longer side.
        anchor_sizes: one size per pyramid level (5), or one tuple of sizes per level. RetinaNet
            expands a single size s into the octave scales (s, s*2^(1/3), s*2^(2/3)). Default:
            torchvision's 32..512 at min_size >= 800, scaled down with smaller inputs (never
            below 8 px) so that small images with small objects get fitting anchors.
        image_mean: input normalisation; default ImageNet's (use the backbone file's if it has it).
        image_std: see image_mean.
        score_thresh: minimum score of a returned detection.
        detections_per_img: maximum detections per image.
        **kwargs: ``head_norm`` (gn|bn|none; norm of the conv box heads and of the RetinaNet head;
            default gn for res5/4conv1fc and none for RetinaNet as in the paper), ``fpn_norm``
            (gn|bn|none, default none), ``fpn_channels`` (FPN width, default 256 as torchvision; the
            FPN, the RPN / RetinaNet head convs and the RoI features all scale with it),
            ``aspect_ratios`` (default (0.5, 1, 2)), ``representation_size`` (RoI head width, default
            1024), ``roi_sampling_ratio`` (RoIAlign samples per bin side, default 2 as torchvision),
            ``retinanet_p6p7_from`` (``c5`` as in the RetinaNet paper, or ``p5``), ``smooth_l1_beta``;
            anything else goes to the torchvision class (e.g. ``rpn_batch_size_per_image``, ``box_nms_thresh``,
            ``nms_thresh``, ``topk_candidates``).

    Returns:
        A torchvision FasterRCNN or RetinaNet; in train mode it takes ``(images, targets)`` and
        returns a loss dict, in eval mode a list of ``{"boxes", "labels", "scores"}``.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be the number of foreground classes (>= 1), got {num_classes}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(
            f"trainable_layers must be in [0, 5] (5 = all, incl. conv1/bn1), got {trainable_layers}"
        )
    options = {k: kwargs.pop(k, default) for k, default in OPTIONS.items()}
    if int(options["fpn_channels"]) < 1:  # before any builder makes a conv of that width
        raise ValueError(f"fpn_channels must be positive, got {options['fpn_channels']}")
    min_sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    transform = {
        "min_size": min_sizes,
        "max_size": max_size,
        "image_mean": list(image_mean) if image_mean is not None else None,
        "image_std": list(image_std) if image_std is not None else None,
    }
    freeze_stages(backbone, trainable_layers)
    spec = DetectorSpec(backbone, num_classes, trainable_layers, anchor_sizes,
                        tuple(options.pop("aspect_ratios")), box_head, box_loss, transform, score_thresh,
                        detections_per_img, options, kwargs)
    model = DETECTORS[name](spec)
    model.arch = arch  # type: ignore[assignment]  # recorded for reports; not used by forward
    fp32_head_outputs(model)
    return model


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


def _fp32_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_fp32(output)


def fp32_head_outputs(model: nn.Module) -> nn.Module:
    """Everything after the last learned layer runs in fp32, also under bf16/fp16 autocast.

    torchvision decodes boxes in the dtype of the regression output (``BoxCoder.decode_single``) and
    ``batched_nms`` separates classes by offsetting boxes by ``label * (max + 1)``: with bf16 head
    outputs, boxes snap to a grid of several pixels and, at class ids above ~10, the offset boxes
    collapse so that per-class NMS keeps duplicates (fp16 overflows to inf on COCO's 80 classes).
    Forward hooks cast the RPN head's, the RoI box predictor's and RetinaNet's head outputs to fp32,
    so decoding, softmax, score thresholds and NMS (and the losses) are fp32 in training, validation
    and inference alike. Returns ``model``.
    """
    for part in (getattr(getattr(model, "rpn", None), "head", None),
                 getattr(getattr(model, "roi_heads", None), "box_predictor", None),
                 getattr(model, "head", None)):
        if isinstance(part, nn.Module):
            part.register_forward_hook(_fp32_hook)
    return model


def fpn_backbone(
    backbone: torchvision.models.ResNet,
    returned_layers: Sequence[int],
    fpn_norm: str | None = None,
    extra_blocks: nn.Module | None = None,
    out_channels: int = FPN_CHANNELS,
) -> BackboneWithFPN:
    """The ResNet's ``layer{returned_layers}`` outputs into an FPN of ``out_channels`` channels
    (torchvision's wrapper, whose own helper fixes 256). It freezes nothing: :func:`build_detector`
    freezes the stages (:func:`freeze_stages`) before any builder runs."""
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be ResNet stages in 1..4, got {list(returned_layers)}")
    if out_channels < 1:
        raise ValueError(f"fpn_channels must be positive, got {out_channels}")
    c2 = backbone.inplanes // 8  # layer1's output channels (64 for ResNet-18/34, 256 for ResNet-50)
    return BackboneWithFPN(
        backbone,
        {f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
        [c2 * 2 ** (k - 1) for k in returned_layers],
        out_channels,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
        norm_layer=None if fpn_norm in (None, "none") else norm_factory(fpn_norm),
    )


def anchor_generator(spec: DetectorSpec, octaves: bool) -> AnchorGenerator:
    min_sizes = spec.transform["min_size"]
    sizes = _anchor_sizes(spec.anchor_sizes, max(min_sizes), octaves=octaves)
    return AnchorGenerator(sizes, (spec.aspect_ratios,) * len(sizes))


def default_anchor_sizes(min_size: int) -> tuple[int, ...]:
    """One anchor size per level: 32..512 at min_size >= 800 (torchvision), smaller for small inputs.

    The base size follows the input scale (32 px at 800, rounded to a power of two, at least 8 px):
    at min_size 128-200 the anchors run 8..128, which covers objects of ~10-120 px.
    """
    base = 32 * min(1.0, min_size / 800)
    base = max(8, 2 ** round(math.log2(base)))
    return tuple(int(base * 2**i) for i in range(NUM_LEVELS))


def _anchor_sizes(
    anchor_sizes: Sequence[int] | Sequence[Sequence[int]] | None, min_size: int, octaves: bool
) -> tuple[tuple[int, ...], ...]:
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(min_size)
    sizes: list[Any] = list(anchor_sizes)
    if len(sizes) != NUM_LEVELS:
        raise ValueError(f"anchor_sizes needs one entry per FPN level ({NUM_LEVELS}), got {sizes}")
    out = []
    for s in sizes:
        if isinstance(s, (int, float)):
            if octaves:  # RetinaNet: three scales per octave (Lin et al. 2017)
                out.append(tuple(int(s * 2 ** (i / 3)) for i in range(3)))
            else:
                out.append((int(s),))
        else:
            out.append(tuple(int(v) for v in s))
    if len({len(level) for level in out}) != 1:
        raise ValueError(f"every FPN level needs the same number of anchor sizes, got {out}")
    return tuple(out)
