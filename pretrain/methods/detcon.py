"""DetCon-S: SimCLR's contrast between mask-pooled regions of two views instead of whole images.

- [0] Hénaff et al., Efficient Visual Pretraining with Contrastive Detection, ICCV 2021,
  https://arxiv.org/abs/2103.10957 (up to 10x less pretraining than SimCLR/BYOL for the same
  COCO detection and segmentation transfer)
- [1] Chen et al., SimCLR, ICML 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import DetConSLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import DetConSTransform
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision.tv_tensors import Mask

from pretrain.data import augment_mode
from pretrain.methods.base import SSLMethod, plain_config


class DetConViews:
    """Two views of an image and their grid masks, cropped and flipped with the pixels.

    lightly's ``DetConSTransform`` applies each view's random geometry to the image and its mask
    together (torchvision transforms v2; masks are resized nearest-neighbour). The mask is the
    paper's spatial heuristic: a ``grid_size`` grid over the whole image, cell ``r * cols + c``.

    Args:
        grid_size: ``(rows, cols)`` of the grid.
        **kwargs: ``DetConSTransform``'s view arguments (``input_size``, ``min_scale``, ``cj_prob``,
            ``gaussian_blur_t1``, ``normalize``, ...).

    Returns (``__call__``):
        ``[view0, view1, mask0, mask1]``: two ``(3, S, S)`` float images, then two ``(S, S)``
        int64 masks of cell ids; the loader stacks each into a batch.
    """

    def __init__(self, grid_size: Sequence[int] = (4, 4), **kwargs: Any) -> None:
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"method.transform.grid_size={list(grid_size)} must be [rows, cols] >= 1")
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.transform = DetConSTransform(grid_size=self.grid_size, **kwargs)

    @property
    def num_regions(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        w, h = image.size if isinstance(image, Image.Image) else image.shape[-1:-3:-1]
        # A placeholder the transform's AddGridTransform overwrites with the grid, at the image's size.
        (v0, m0), (v1, m1) = self.transform(image, Mask(torch.zeros(1, h, w, dtype=torch.int64)))
        return [v0.as_subclass(Tensor), v1.as_subclass(Tensor), m0.as_subclass(Tensor)[0], m1.as_subclass(Tensor)[0]]


def region_weights(masks: Tensor, num_regions: int, size: Sequence[int]) -> Tensor:
    """``(B, N, h, w)``: the fraction of each feature-map cell's pixels that lie in each region.

    lightly's ``pool_masked`` takes hard masks at the feature map's resolution, where a region
    smaller than a cell (a 4x4 grid over a 7x7 or 2x2 map) vanishes or takes a whole cell; area
    fractions keep every region that a view shows, in proportion.

    Args:
        masks: ``(B, H, W)`` integer region ids in ``[0, num_regions)``.
        num_regions: the number of ids.
        size: ``(h, w)`` of the feature map.
    """
    if masks.min() < 0 or masks.max() >= num_regions:
        raise ValueError(f"mask ids must be in [0, {num_regions}), got {int(masks.min())}..{int(masks.max())}")
    one_hot = F.one_hot(masks.long(), num_regions).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, (int(size[0]), int(size[1])))


def sample_regions(present0: Tensor, present1: Tensor, num_samples: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``num_samples`` region ids per image for each view, drawn with replacement.

    Ids come from the regions both views show, the same ids for both (the positives); an image
    whose views share none (disjoint crops) draws each view's from its own regions, so that its
    regions serve as negatives only (lightly's loss weighs a region without a positive by zero).

    Args:
        present0, present1: ``(B, N)`` booleans, region shown in view 0 / view 1.
    """
    shared = present0 & present1
    has_shared = shared.any(dim=1, keepdim=True)
    ids0 = torch.multinomial(torch.where(has_shared, shared, present0).float(), num_samples, replacement=True,
                             generator=generator)
    own1 = torch.multinomial(present1.float(), num_samples, replacement=True, generator=generator)
    return ids0, torch.where(has_shared, ids0, own1)


def pool_regions(features: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """``(B, M, C)``: the features of ``(B, C, h, w)`` averaged over each region ``ids[b, m]``,
    weighted by :func:`region_weights`' ``(B, N, h, w)`` area fractions."""
    w = weights.gather(1, ids[:, :, None, None].expand(-1, -1, *weights.shape[-2:]))
    pooled = torch.einsum("bmhw,bchw->bmc", w.to(features.dtype), features)
    return pooled / w.sum(dim=(2, 3)).clamp_min(1e-6)[..., None].to(features.dtype)


class DetConS(SSLMethod):
    """DetCon-S: regions of a mask (a grid by default), pooled from the last feature map of both
    views, projected by SimCLR's MLP and contrasted by lightly's ``DetConSLoss``: a region's
    positive is the same region in the other view; every other region of every image in the
    (global) batch is a negative.

    The views and masks come from :class:`DetConViews` on the PIL path (``data.augment=pil``);
    ``num_samples`` regions are drawn per image and step (the paper's 16).
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        config = plain_config(config)
        if augment_mode(config.get("data", {})) == "tensor":
            raise ValueError(
                "method=detcon needs data.augment=pil: its masks must be cropped and flipped with each view, "
                "which lightly's DetConSTransform does in the loader and the tensor path (pretrain/augment.py) "
                "does not. Override data.augment=pil (and data.num_workers>0 to feed it)"
            )
        super().__init__(config)
        m = self.method_cfg
        transform = m["transform"]
        if not str(transform.get("_target_", "")).endswith("DetConViews"):
            raise ValueError("method.transform must be pretrain.methods.detcon.DetConViews (views with masks)")
        rows, cols = transform.get("grid_size", (4, 4))
        self.num_regions = int(rows) * int(cols)
        self.num_samples = int(m["num_samples"])
        if self.num_samples < 1:
            raise ValueError(f"method.num_samples={self.num_samples} must be >= 1 (the paper's 16)")
        self.projection_head = SimCLRProjectionHead(
            self.feature_dim, int(m["projection_hidden_dim"]), int(m["projection_dim"]),
            num_layers=int(m.get("projection_layers", 2)),
        )
        self.criterion = DetConSLoss(
            temperature=float(m["temperature"]),
            gather_distributed=dist.is_available(),  # only acts under a process group
        )

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) != 4:
            raise ValueError(f"DetCon takes two views and their two masks per image, got {len(views)} tensors "
                             "(method.transform must be pretrain.methods.detcon.DetConViews)")
        images, masks = views[:2], views[2:]
        if images[0].shape == images[1].shape:  # both views in one pass (BN over 2B samples), as SimCLR
            maps0, maps1 = self.feature_maps(torch.cat(list(images))).chunk(2)
        else:
            maps0, maps1 = (self.feature_maps(x) for x in images)
        w0 = region_weights(masks[0], self.num_regions, maps0.shape[-2:])
        w1 = region_weights(masks[1], self.num_regions, maps1.shape[-2:])
        present0, present1 = w0.sum(dim=(2, 3)) > 0, w1.sum(dim=(2, 3)) > 0
        ids0, ids1 = sample_regions(present0, present1, self.num_samples)
        pooled = torch.cat([pool_regions(maps0, w0, ids0), pool_regions(maps1, w1, ids1)])  # (2B, M, C)
        z = self.projection_head(pooled.flatten(0, 1)).view(*pooled.shape[:2], -1).float()
        z0, z1 = z.chunk(2)
        with torch.autocast(self.device.type, enabled=False):
            loss = self.criterion(z0, z1, ids0, ids1)
        shared = (present0 & present1).sum(dim=1).float().mean()
        return loss, {"detcon_shared_regions": shared}
