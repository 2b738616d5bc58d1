"""BatchNorm statistics of a pretrained backbone re-estimated on the fine-tuning images.

Self-supervised pretraining often sees other images than detection does: small crops (the demo's
64 px views of 128 px scenes), grayscale views, other normalisation statistics. A BatchNorm layer
then normalises the detector's inputs with statistics of another distribution, and a frozen
backbone (``freeze_backbone``, ``frozen_bn``, frozen stages) keeps them for good. Before the first
step, ``backbone.recalibrate_bn=N`` runs N batches of the labeled training images through the
ResNet at the detector's own resolution (its transform: resize and normalisation), without
gradients, and replaces every backbone BatchNorm's running mean and variance by their average over
those batches (``momentum=None``), FrozenBatchNorm2d included (as in "Revisiting Batch
Normalization for Practical Domain Adaptation", Li et al. 2016, and the precise-BN of Wu & Johnson
2021). The affine weights are not touched; nothing else in the model changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops.misc import FrozenBatchNorm2d

log = logging.getLogger(__name__)


def _norms(body: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(parent, attribute name, norm) for every BatchNorm and FrozenBatchNorm2d under ``body``."""
    out = []
    for parent in body.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                out.append((parent, name, child))
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]], num_batches: int) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model.backbone.body`` (a torchvision
    detector's ResNet) over ``num_batches`` batches of image lists, at the detector's resolution.

    Returns:
        The number of batches used (fewer when ``batches`` runs out).

    Raises:
        ValueError: ``num_batches`` below 1, or a model without ``transform`` and ``backbone.body``.
    """
    if num_batches < 1:
        raise ValueError(f"backbone.recalibrate_bn must be >= 1 batches, got {num_batches}")
    transform: Any = getattr(model, "transform", None)
    body: Any = getattr(getattr(model, "backbone", None), "body", None)
    if transform is None or body is None:
        raise ValueError(f"{type(model).__name__}: BN recalibration needs a torchvision detector "
                         "(model.transform and model.backbone.body)")
    norms = _norms(body)
    before = [(n.running_mean.clone(), n.running_var.clone()) for _, _, n in norms]
    # Trainable BN layers recompute in place; frozen ones are swapped for a BatchNorm2d for the pass.
    swapped: list[tuple[nn.Module, str, FrozenBatchNorm2d, nn.BatchNorm2d]] = []
    saved: list[tuple[Any, Any, bool]] = []
    for parent, name, norm in norms:
        if isinstance(norm, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(norm.weight.numel(), eps=norm.eps).to(norm.weight.device)
            bn.weight.copy_(norm.weight)
            bn.bias.copy_(norm.bias)
            setattr(parent, name, bn)
            swapped.append((parent, name, norm, bn))
            norm = bn
        saved.append((norm, norm.momentum, norm.training))
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    modes = [(m, m.training) for m in body.modules()]
    body.train()
    used = 0
    device = next(body.parameters()).device
    try:
        for images in batches:
            if used >= num_batches:
                break
            tensors = transform([im.to(device) for im in images])[0].tensors
            body(tensors)
            used += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for norm, momentum, training in saved:
            norm.momentum = momentum
            norm.training = training
        for parent, name, frozen, bn in swapped:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            setattr(parent, name, frozen)
        if used == 0:  # nothing seen: the loaded statistics stay
            for (_, _, norm), (mean, var) in zip(norms, before):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
    if used == 0:
        raise ValueError("BN recalibration got no batch of training images")
    log.info("BatchNorm statistics of %d backbone layers re-estimated on %d batches of training images",
             len(norms), used)
    return used


def image_batches(loader: Any) -> Iterator[list[torch.Tensor]]:
    """The training images of a run's loader in order (no shuffling): a DataLoader of
    ``(images, targets)`` batches, or the first DataLoader of a combined loader."""
    if not isinstance(loader, DataLoader):
        loader = next((d for d in getattr(loader, "iterables", {}).values() if isinstance(d, DataLoader)), None)
        if loader is None:
            raise TypeError("BN recalibration needs a DataLoader of (images, targets) batches")
    fresh = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                       num_workers=0)
    for images, _targets in fresh:
        yield list(images)
