"""kNN probe: how well backbone features of labeled object crops predict their class.

During pretraining there is no detector yet; the probe embeds every labeled box of a COCO set
(cropped, resized to a fixed size) with the backbone and reports the leave-one-out k-nearest-
neighbour top-1 accuracy under cosine similarity (faiss does the search). It rises as the
backbone learns object-level features and falls when training collapses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from pretrain.core.data.coco import CocoDetection

log = logging.getLogger(__name__)
VOTES = ("weighted", "majority")


def knn_top1(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    k: int = 20,
    vote: str = "weighted",
    temperature: float = 0.07,
) -> float:
    """Leave-one-out kNN top-1 accuracy of ``labels`` predicted from ``features``.

    Each sample is classified by its ``k`` most cosine-similar other samples.

    Args:
        features: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer classes.
        k: neighbours per query (clipped to ``N - 1``).
        vote: ``"weighted"``: neighbours vote with ``exp(cos / temperature)`` (InstDisc, DINO);
            ``"majority"``: one vote each.
        temperature: softness of the weighted vote.

    Returns:
        Accuracy in [0, 1]; NaN with fewer than two samples.
    """
    if vote not in VOTES:
        raise ValueError(f"unknown kNN vote {vote!r}; choose one of {VOTES}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    feats = torch.as_tensor(features).detach().float().cpu()
    y = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
    if feats.ndim != 2 or len(feats) != len(y):
        raise ValueError(f"features {tuple(feats.shape)} and labels {y.shape} do not match")
    n = len(y)
    if n < 2:
        return float("nan")
    x = np.ascontiguousarray(F.normalize(feats, dim=1).numpy())
    k = min(k, n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, k + 1)
    # Drop each query's own hit; with exact duplicates it may be missing, then drop the farthest.
    own = np.asarray(idx == np.arange(n)[:, None])
    own[~own.any(axis=1), -1] = True
    nb_idx = idx[~own].reshape(n, k)
    nb_sim = sims[~own].reshape(n, k)
    classes, y_idx = np.unique(y, return_inverse=True)
    weights = np.exp(nb_sim / temperature) if vote == "weighted" else np.ones_like(nb_sim)
    votes = np.zeros((n, len(classes)), dtype=np.float64)
    np.add.at(votes, (np.repeat(np.arange(n), k), y_idx[nb_idx].reshape(-1)), weights.reshape(-1))
    return float((votes.argmax(axis=1) == y_idx).mean())


class BoxCrops(Dataset):
    """The labeled boxes of a COCO JSON as fixed-size normalised crops with their labels.

    Crops are cut once at construction and kept as uint8 (``max_boxes`` x 3 x size x size bytes),
    so every validation epoch only runs the backbone.

    Args:
        ann_file: COCO JSON; its images are read through :class:`pretrain.core.data.coco.CocoDetection`
            (crowd boxes left out, missing images skipped with a warning).
        size: side of the square each box is resized to.
        max_boxes: keep a seeded random subset of at most this many boxes.
        mean, std: input normalisation (the pretraining's).
        seed: subset seed.
        max_pixels: refuse larger images.
    """

    def __init__(
        self,
        ann_file: str | Path,
        size: int = 64,
        max_boxes: int = 10000,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: int = 0,
        max_pixels: int | None = None,
    ) -> None:
        path = Path(ann_file)
        if not path.is_file():
            raise FileNotFoundError(f"kNN probe: no COCO JSON at {path} (data.knn_val_json)")
        ds = (CocoDetection(path, train=True, missing="skip") if max_pixels is None
              else CocoDetection(path, train=True, missing="skip", max_pixels=max_pixels))
        entries = [(i, j) for i in range(len(ds)) for j in range(len(ds.annotations(i)["labels"]))]
        if not entries:
            raise ValueError(f"kNN probe: {path} has no (non-crowd) boxes")
        if len(entries) > max_boxes:
            keep = np.sort(np.random.default_rng(seed).choice(len(entries), max_boxes, replace=False))
            entries = [entries[i] for i in keep]
        by_image: dict[int, list[int]] = defaultdict(list)
        for i, j in entries:
            by_image[i].append(j)

        crops, labels, skipped = [], [], 0
        for i, js in by_image.items():
            image, target = ds[i]
            h, w = image.shape[-2:]
            for j in js:
                x0, y0, x1, y1 = target["boxes"][j].tolist()
                x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
                x1, y1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
                if x1 - x0 < 2 or y1 - y0 < 2:
                    skipped += 1
                    continue
                crop = image[None, :, y0:y1, x0:x1].as_subclass(Tensor)
                crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)
                crops.append(crop.clamp_(0, 1).mul_(255).round_().to(torch.uint8)[0])
                labels.append(int(target["labels"][j]))
        if skipped:
            log.warning("kNN probe: skipped %d boxes smaller than 2 px in %s", skipped, path)
        if len(crops) < 2:
            raise ValueError(f"kNN probe: {path} gives {len(crops)} usable boxes; it needs at least 2")
        self.crops = torch.stack(crops)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = list(ds.class_names)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        log.info("kNN probe: %d crops of %d classes from %s", len(self.labels), len(self.class_names), path)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        """``(normalised crop, label, index)``; the index lets DDP drop the sampler's padding."""
        x = self.crops[index].float().div_(255.0)
        return (x - self.mean) / self.std, self.labels[index], index
