"""Faster R-CNN and RetinaNet (FPN) on a ResNet that the caller built and loaded.

The detectors are torchvision's own classes; only the backbone wrapping, the box heads and the
anchor defaults are chosen here. Labels are 1..K for K foreground classes: Faster R-CNN's softmax
gets ``K + 1`` outputs (index 0 is background); RetinaNet's sigmoid classifier gets exactly K and
:class:`KClassRetinaNet` shifts labels to 0..K-1 on the way in and back to 1..K on the way out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead, RetinaNetRegressionHead
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

DETECTORS = ("fasterrcnn", "retinanet")
BOX_HEADS = ("mlp", "mlp_ln", "res5", "4conv1fc")
RETINANET_BOX_LOSSES = ("smooth_l1", "l1", "giou", "diou", "ciou")
HEAD_NORMS = ("gn", "bn", "none")
FPN_CHANNELS = 256
ROI_SIZE = 7  # MultiScaleRoIAlign output of torchvision's Faster R-CNN
NUM_LEVELS = 5  # P2-P6 (Faster R-CNN) and P3-P7 (RetinaNet) alike
# Stem first, as torchvision counts trainable layers from the end: 5 = everything, 0 = nothing.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


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
        name: ``fasterrcnn`` (P2-P6 FPN, RPN + RoI head) or ``retinanet`` (P3-P7 FPN, focal loss).
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
            (gn|bn|none, default none), ``aspect_ratios`` (default (0.5, 1, 2)),
            ``representation_size`` (RoI head width, default 1024), ``roi_sampling_ratio``
            (RoIAlign samples per bin side, default 2 as torchvision), ``retinanet_p6p7_from``
            (``c5`` as in the RetinaNet paper, or ``p5``), ``smooth_l1_beta``; anything else goes
            to the torchvision class (e.g. ``rpn_batch_size_per_image``, ``box_nms_thresh``,
            ``nms_thresh``, ``topk_candidates``).

    Returns:
        A torchvision FasterRCNN or RetinaNet; in train mode it takes ``(images, targets)`` and
        returns a loss dict, in eval mode a list of ``{"boxes", "labels", "scores"}``.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {DETECTORS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be the number of foreground classes (>= 1), got {num_classes}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5] (5 = all, incl. conv1/bn1), got {trainable_layers}")
    head_norm = kwargs.pop("head_norm", None)
    fpn_norm = kwargs.pop("fpn_norm", None)
    aspect_ratios = tuple(kwargs.pop("aspect_ratios", (0.5, 1.0, 2.0)))
    representation_size = int(kwargs.pop("representation_size", 1024))
    p6p7_from = kwargs.pop("retinanet_p6p7_from", "c5")
    smooth_l1_beta = float(kwargs.pop("smooth_l1_beta", 0.1))
    # RoIAlign's bilinear samples per bin side (torchvision: 2). Its CPU backward scales with
    # RoIs x channels x samples and dominates a CPU training step on small images: 1 is 4x cheaper.
    roi_sampling_ratio = int(kwargs.pop("roi_sampling_ratio", 2))

    min_sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    sizes = _anchor_sizes(anchor_sizes, max(min_sizes), octaves=name == "retinanet")
    anchors = AnchorGenerator(sizes, (aspect_ratios,) * len(sizes))
    common = {
        "min_size": min_sizes,
        "max_size": max_size,
        "image_mean": list(image_mean) if image_mean is not None else None,
        "image_std": list(image_std) if image_std is not None else None,
    }
    freeze_stages(backbone, trainable_layers)

    if name == "fasterrcnn":
        if box_loss != "smooth_l1":
            raise ValueError(
                f"Faster R-CNN uses torchvision's smooth-L1 RPN/RoI box loss; box_loss={box_loss!r} is "
                "available for retinanet only"
            )
        body = fpn_backbone(backbone, trainable_layers, returned_layers=(1, 2, 3, 4), fpn_norm=fpn_norm)
        head = build_box_head(box_head, representation_size, head_norm)
        model: nn.Module = FasterRCNN(
            body,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], ROI_SIZE, sampling_ratio=roi_sampling_ratio),
            box_head=head,
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            box_score_thresh=score_thresh,
            box_detections_per_img=detections_per_img,
            **common,
            **kwargs,
        )
    else:
        if box_head != "mlp":
            raise ValueError(
                f"box_head={box_head!r} is a Faster R-CNN RoI head; RetinaNet keeps its own conv head "
                "(leave box_head=mlp; head_norm=gn gives the GroupNorm head of torchvision's v2)"
            )
        if box_loss not in RETINANET_BOX_LOSSES:
            raise ValueError(f"unknown box_loss {box_loss!r}; RetinaNet supports {RETINANET_BOX_LOSSES}")
        if p6p7_from not in ("c5", "p5"):
            raise ValueError(f"retinanet_p6p7_from must be 'c5' or 'p5', got {p6p7_from!r}")
        c5 = backbone.inplanes  # channels of layer4's output, whatever the depth
        extra = LastLevelP6P7(c5 if p6p7_from == "c5" else FPN_CHANNELS, FPN_CHANNELS)
        body = fpn_backbone(backbone, trainable_layers, returned_layers=(2, 3, 4), fpn_norm=fpn_norm,
                            extra_blocks=extra)
        head = RetinaNetHead(
            FPN_CHANNELS,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=_norm_factory(head_norm or "none"),
        )
        if box_loss == "smooth_l1":
            head.regression_head = _SmoothL1RegressionHead(
                FPN_CHANNELS, anchors.num_anchors_per_location()[0], smooth_l1_beta,
                norm_layer=_norm_factory(head_norm or "none"),
            )
        else:
            head.regression_head._loss_type = box_loss
        model = KClassRetinaNet(
            body,
            num_classes=num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            detections_per_img=detections_per_img,
            **common,
            **kwargs,
        )
    model.arch = arch  # type: ignore[assignment]  # recorded for reports; not used by forward
    return model


def fpn_backbone(
    backbone: torchvision.models.ResNet,
    trainable_layers: int,
    returned_layers: Sequence[int],
    fpn_norm: str | None = None,
    extra_blocks: nn.Module | None = None,
) -> BackboneWithFPN:
    """torchvision's ResNet-to-FPN wrapper (freezes stages as torchvision does)."""
    return _resnet_fpn_extractor(
        backbone,
        trainable_layers,
        returned_layers=list(returned_layers),
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
        norm_layer=None if fpn_norm in (None, "none") else _norm_factory(fpn_norm),
    )


def freeze_stages(backbone: torchvision.models.ResNet, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages, including their BN statistics.

    torchvision only sets ``requires_grad=False``, which leaves BatchNorm running statistics in
    frozen stages updating in train mode; like detectron2's ``freeze_at`` we convert those
    BatchNorms to FrozenBatchNorm2d (same values, no ``num_batches_tracked``). GroupNorm has no
    statistics and only loses its gradients.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    frozen = STAGES[: 5 - trainable_layers]
    for stage in frozen:
        names = ("conv1", "bn1") if stage == "stem" else (stage,)
        for attr in names:
            module = getattr(backbone, attr)
            setattr(backbone, attr, to_frozen_bn(module))
            for p in getattr(backbone, attr).parameters():
                p.requires_grad_(False)


def to_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (plain or sync) inside ``module`` by an equivalent FrozenBatchNorm2d."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for child_name, child in module.named_children():
        new = to_frozen_bn(child)
        if new is not child:
            setattr(module, child_name, new)
    return module


def build_box_head(kind: str, representation_size: int = 1024, head_norm: str | None = None) -> nn.Module:
    """The Faster R-CNN RoI box head on 256x7x7 pooled FPN features; outputs ``representation_size``.

    Why these heads: ``mlp`` is torchvision's default; ``mlp_ln`` adds LayerNorm, which keeps the
    head's activations in range when a normalised-but-unfamiliar SSL backbone feeds it.
    ``res5`` is a res5-*style* head: in detectron2's C4 models (the MoCo/SwAV detection
    transfer protocol) the RoI head is the backbone's own res5 stage. With an FPN, layer4 stays
    in the backbone, so here the head is new and random: torchvision Bottleneck blocks (an
    unstrided 256->512 block with a projection shortcut, then 512->512, so the 7x7 RoI keeps its
    resolution), global average pooling as in C4 heads, and one fc layer, with a trainable norm
    (GN by default; FrozenBN on a random head would be an identity). ``4conv1fc`` is the
    convolutional head that FPN detectors pair with GN/SyncBN backbones (Faster R-CNN v2).
    """
    in_features = FPN_CHANNELS * ROI_SIZE * ROI_SIZE
    if kind == "mlp":
        return TwoMLPHead(in_features, representation_size)
    if kind == "mlp_ln":
        return nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Linear(in_features, representation_size),
            nn.LayerNorm(representation_size),
            nn.ReLU(inplace=True),
            nn.Linear(representation_size, representation_size),
            nn.LayerNorm(representation_size),
            nn.ReLU(inplace=True),
        )
    norm = _norm_factory(head_norm or "gn")
    if kind == "res5":
        if norm is None:
            raise ValueError("the res5 box head needs a norm: head_norm=gn or bn")
        return Res5BoxHead(FPN_CHANNELS, representation_size, norm)
    if kind == "4conv1fc":
        return FastRCNNConvFCHead(
            (FPN_CHANNELS, ROI_SIZE, ROI_SIZE), [FPN_CHANNELS] * 4, [representation_size], norm_layer=norm
        )
    raise ValueError(f"unknown box_head {kind!r}; choose one of {BOX_HEADS}")


class Res5BoxHead(nn.Module):
    """Residual bottleneck RoI head: 2 blocks -> global average pool -> fc -> ReLU.

    Args:
        in_channels: RoI feature channels (the FPN width).
        representation_size: output width fed to FastRCNNPredictor.
        norm_layer: normalisation inside the blocks (trainable: GN or BN; FrozenBN would be an
            identity on a random head).
    """

    def __init__(self, in_channels: int, representation_size: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        width = in_channels // 2  # 128; Bottleneck's expansion 4 gives 512 output channels
        out_channels = width * Bottleneck.expansion
        shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(out_channels))
        self.blocks = nn.Sequential(
            Bottleneck(in_channels, width, downsample=shortcut, norm_layer=norm_layer),
            Bottleneck(out_channels, width, norm_layer=norm_layer),
        )
        self.fc = nn.Linear(out_channels, representation_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last norm of each residual branch so the head starts as an identity map
        # (Goyal et al. 2017), which keeps the freshly initialised head stable.
        for block in self.blocks:
            last_norm = block.bn3
            if isinstance(last_norm, (nn.GroupNorm, nn.BatchNorm2d)) and last_norm.weight is not None:
                nn.init.zeros_(last_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.relu(self.fc(x))


class KClassRetinaNet(RetinaNet):
    """RetinaNet with exactly K sigmoid classifiers, speaking the 1..K labels of the rest of the code.

    A sigmoid classifier has no background class: built for K+1 classes, index 0 would be a class
    with no positives that still adds focal-loss terms to every anchor and, at a low score
    threshold (0.001 for mAP), is emitted as a detection of no category. So the head has K
    outputs, training labels go in as 0..K-1 and detections come out as 1..K.
    """

    def forward(self, images, targets=None):  # type: ignore[no-untyped-def, override]
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        if isinstance(out, list):  # detections (eval mode)
            out = [{**d, "labels": d["labels"] + 1} for d in out]
        return out


class _SmoothL1RegressionHead(RetinaNetRegressionHead):
    """RetinaNet box regression with smooth-L1 at a chosen beta.

    torchvision's head supports ``smooth_l1`` but never passes a beta, so it uses 1.0, which with
    RetinaNet's unit box-coder weights keeps almost every residual in the quadratic zone (weak
    gradients). detectron2's RetinaNet default is 0.1; only the loss call differs from torchvision.
    """

    def __init__(self, in_channels: int, num_anchors: int, beta: float, norm_layer=None):
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        self._loss_type = "smooth_l1"
        self.beta = beta

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[override]
        losses = []
        for tgt, reg, anc, idx in zip(targets, head_outputs["bbox_regression"], anchors, matched_idxs):
            fg = torch.where(idx >= 0)[0]
            loss = det_utils._box_loss(
                "smooth_l1", self.box_coder, anc[fg], tgt["boxes"][idx[fg]], reg[fg], cnf={"beta": self.beta}
            )
            losses.append(loss / max(1, fg.numel()))
        return sum(losses) / max(1, len(targets))


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


def _norm_factory(norm: str) -> Callable[[int], nn.Module] | None:
    if norm == "gn":
        return partial(_group_norm, 32)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm in ("none", None):
        return None
    raise ValueError(f"unknown head/FPN norm {norm!r}; choose one of {HEAD_NORMS}")


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)
