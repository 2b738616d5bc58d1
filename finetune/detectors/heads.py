"""Box heads of the detectors: Faster R-CNN RoI heads and RetinaNet's smooth-L1 regression."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetRegressionHead
from torchvision.models.resnet import Bottleneck

from finetune.detectors.registry import registrar
from pretrain.core.backbone.resnet import group_norm

HEAD_NORMS = ("gn", "bn", "none")
FPN_CHANNELS = 256
ROI_SIZE = 7  # MultiScaleRoIAlign output of torchvision's Faster R-CNN

# (in_channels, representation_size, head_norm) -> head on (N, in_channels, 7, 7) RoI features
BoxHeadBuilder = Callable[[int, int, str | None], nn.Module]
# The Faster R-CNN RoI box heads by name (``detector.box_head``); add one with @register_box_head.
BOX_HEADS: dict[str, BoxHeadBuilder] = {}


# ``@register_box_head("name")`` adds ``fn(in_channels, representation_size, head_norm) -> nn.Module``
# as ``detector.box_head=<name>``; ``in_channels`` is the FPN width (``fpn_channels``).
register_box_head = registrar(BOX_HEADS, "box head")


def build_box_head(kind: str, representation_size: int = 1024, head_norm: str | None = None,
                   in_channels: int = FPN_CHANNELS) -> nn.Module:
    """The Faster R-CNN RoI box head on ``in_channels`` x 7 x 7 pooled FPN features (256 in torchvision's
    detectors); outputs ``representation_size``.

    Why these heads: ``mlp`` is torchvision's default; ``mlp_ln`` adds LayerNorm, which keeps the
    head's activations in range when a normalised-but-unfamiliar SSL backbone feeds it.
    ``res5`` is a res5-*style* head: in detectron2's C4 models (the MoCo/SwAV detection
    transfer protocol) the RoI head is the backbone's own res5 stage. With an FPN, layer4 stays
    in the backbone, so here the head is new and random: torchvision Bottleneck blocks (an
    unstrided C->2C block with a projection shortcut, C the FPN width, then 2C->2C, so the 7x7
    RoI keeps its resolution), global average pooling as in C4 heads, and one fc layer, with a
    trainable norm (GN by default; FrozenBN on a random head would be an identity). ``4conv1fc`` is the
    convolutional head that FPN detectors pair with GN/SyncBN backbones (Faster R-CNN v2).
    """
    if kind not in BOX_HEADS:
        raise ValueError(f"unknown box_head {kind!r}; registered: {sorted(BOX_HEADS)}")
    return BOX_HEADS[kind](in_channels, representation_size, head_norm)


@register_box_head("mlp")
def _mlp(in_channels: int, representation_size: int, head_norm: str | None) -> nn.Module:
    return TwoMLPHead(in_channels * ROI_SIZE * ROI_SIZE, representation_size)


@register_box_head("mlp_ln")
def _mlp_ln(in_channels: int, representation_size: int, head_norm: str | None) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(start_dim=1),
        nn.Linear(in_channels * ROI_SIZE * ROI_SIZE, representation_size),
        nn.LayerNorm(representation_size),
        nn.ReLU(inplace=True),
        nn.Linear(representation_size, representation_size),
        nn.LayerNorm(representation_size),
        nn.ReLU(inplace=True),
    )


@register_box_head("res5")
def _res5(in_channels: int, representation_size: int, head_norm: str | None) -> nn.Module:
    norm = norm_factory(head_norm or "gn")
    if norm is None:
        raise ValueError("the res5 box head needs a norm: head_norm=gn or bn")
    return Res5BoxHead(in_channels, representation_size, norm)


@register_box_head("4conv1fc")
def _four_conv_one_fc(in_channels: int, representation_size: int, head_norm: str | None) -> nn.Module:
    return FastRCNNConvFCHead((in_channels, ROI_SIZE, ROI_SIZE), [in_channels] * 4, [representation_size],
                              norm_layer=norm_factory(head_norm or "gn"))


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
        width = in_channels // 2  # Bottleneck's expansion 4 gives 2 x in_channels output channels
        out_channels = width * Bottleneck.expansion
        shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 norm_layer(out_channels))
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


class SmoothL1RegressionHead(RetinaNetRegressionHead):
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


def norm_factory(norm: str | None) -> Callable[[int], nn.Module] | None:
    """The norm layer of the FPN and the heads: ``gn`` (32 groups), ``bn``, or ``none`` (None)."""
    if norm == "gn":
        return partial(group_norm, 32)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm in ("none", None):
        return None
    raise ValueError(f"unknown head/FPN norm {norm!r}; choose one of {HEAD_NORMS}")
