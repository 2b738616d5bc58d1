"""Deterministic resume: after a restart, the same batches, augmentations and random draws as without one.

Three sources of randomness decide a training run besides the weights, and a plain
``DataLoader(shuffle=True)`` ties all three to the history of the process: the order of the
samples (the global RNG at each epoch's start), the augmentation of each sample (worker RNG
streams that depend on which worker got which batch) and the draws made in the training step
(RPN/RoI sampling, on-device augmentation). A run killed mid-epoch and resumed therefore sees a
fresh order, trains on part of it, and diverges from the run that was not killed. Here each is
a pure function of ``(seed, epoch, position)``:

- :class:`EpochSampler` yields ``(index, sample_seed)`` pairs from a permutation seeded by
  ``(seed, epoch)`` and can start ``k`` samples into its epoch;
- :class:`SeededSamples` seeds ``random``, NumPy and torch with ``sample_seed`` before reading a
  sample, in whichever worker (or in the main process), so a sample's augmentation depends
  neither on ``num_workers`` nor on what that worker did before;
- :class:`DeterministicResume` reseeds the training process before each batch from
  ``(seed, epoch, batch index)``, records in each checkpoint where the epoch stood, and on a
  resume points the samplers at that epoch and skips the batches already trained on.

With deterministic kernels (CPU training; ``trainer.deterministic=true`` on a GPU) a killed and
resumed run ends with the uninterrupted run's weights and metrics. Under DDP Lightning wraps the
sampler in its distributed sampler: the order per epoch is still reproducible, but a mid-epoch
resume draws the rest of that epoch afresh (logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)

_MASK = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (splitmix64 steps): nearby tuples give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


class EpochSampler(Sampler[tuple[int, int]]):
    """``num_samples`` ``(index, sample_seed)`` pairs per epoch from permutations seeded by ``(seed, epoch)``.

    ``num_samples`` defaults to ``n`` (one permutation); longer or shorter streams take
    back-to-back permutations (the semi stage's unlabeled stream lasts as many batches as the
    labeled loader has). :meth:`start_at` makes the next iteration begin ``k`` samples in.
    It is not a RandomSampler, so Lightning wraps it (instead of replacing it) under DDP.
    """

    def __init__(self, n: int, num_samples: int | None = None, seed: int = 0) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n = int(n)
        self.num_samples = int(num_samples if num_samples is not None else n)
        self.seed = int(seed)
        self.epoch = 0
        self._start = 0
        self._salt: int | None = None

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, k: int) -> None:
        """Skip the first ``k`` samples of the next iteration only (a mid-epoch resume)."""
        self._start = max(0, int(k))

    def draw_afresh(self, salt: int) -> None:
        """Make the next iteration a fresh permutation (a DDP mid-epoch resume, where the batches
        already trained on cannot be skipped per rank: better new ones than the same ones again)."""
        self._salt = int(salt)

    def order(self) -> list[int]:
        """This epoch's indices, in order."""
        key = (self.seed, self.epoch) if self._salt is None else (self.seed, self.epoch, self._salt, 3)
        g = torch.Generator().manual_seed(mix(*key))
        out: list[int] = []
        while len(out) < self.num_samples:
            out += torch.randperm(self.n, generator=g)[: self.num_samples - len(out)].tolist()
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        order = self.order()
        salt, self._salt = self._salt, None
        for pos, index in enumerate(order[start:], start=start):
            key = (self.seed, self.epoch, pos, 1) if salt is None else (self.seed, self.epoch, pos, salt, 4)
            yield index, mix(*key)


class SeededSamples(Dataset):
    """``dataset[index]`` with every RNG seeded by the sampler's ``sample_seed`` first.

    Plain integer keys read the dataset unseeded (evaluation, tests). Attributes not defined
    here are the wrapped dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            seed_all(seed)
            return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class DeterministicResume(pl.Callback):
    """Reseeds each training batch and resumes the samplers where the checkpoint left them.

    ``samplers`` maps a name to ``(sampler, batch_size)`` for every training loader (the semi
    stage has a labeled and an unlabeled one).
    """

    def __init__(self, seed: int, samplers: Mapping[str, tuple[EpochSampler, int]]) -> None:
        self.seed = int(seed)
        self.samplers = dict(samplers)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning sets the epoch of a loader's own sampler, but under DDP that is its distributed
        # wrapper, not this sampler inside it (whose order would repeat every epoch).
        for sampler, _ in self.samplers.values():
            sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_all(batch_seed(self.seed, trainer, batch_idx))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)  # this batch included
        total = trainer.num_training_batches
        checkpoint["deterministic_resume"] = {
            "epoch": {name: s.epoch for name, (s, _) in self.samplers.items()},
            "batches_done": done,
            "epoch_complete": bool(total != float("inf") and done >= total),
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("deterministic_resume")
        if not state:
            log.info("the checkpoint predates deterministic resume: this epoch's order is drawn afresh")
            return
        complete, done = bool(state["epoch_complete"]), int(state["batches_done"])
        ddp_mid_epoch = not complete and done and trainer.world_size > 1
        if ddp_mid_epoch:
            log.warning("mid-epoch resume under DDP: the rest of epoch %s is a fresh draw of the data (Lightning's "
                        "distributed wrapper cannot skip per rank), so some of its images may come twice and "
                        "others not at all; epoch-end checkpoints resume exactly", state["epoch"])
        for name, (sampler, batch_size) in self.samplers.items():
            epoch = int(state["epoch"].get(name, 0))
            # Lightning sets the epoch only after it has built the first iterator of a resumed
            # run: set it here, before that.
            sampler.set_epoch(epoch + 1 if complete else epoch)
            if ddp_mid_epoch:
                sampler.draw_afresh(done)
            else:
                sampler.start_at(0 if complete else done * batch_size)
        if not complete and done:
            log.info("resuming mid-epoch: skipping the %d batches already trained on", done)


def seeded_loader_parts(dataset: Any, seed: int, num_samples: int | None = None
                        ) -> tuple[SeededSamples, EpochSampler]:
    """``(SeededSamples(dataset), EpochSampler(len(dataset), num_samples, seed))`` for a DataLoader."""
    return SeededSamples(dataset), EpochSampler(len(dataset), num_samples, seed)



def batch_seed(seed: int, trainer: pl.Trainer, batch_idx: int) -> int:
    """The seed of one training batch's random draws: ``(seed, epoch, batch index, rank)``."""
    return mix(seed, trainer.current_epoch, batch_idx, trainer.global_rank, 2)
