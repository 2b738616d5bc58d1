"""Shared fixtures: a tiny synthetic detection set and the real datasets beside the checkout."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pretrain.core.data.synthetic import make_synthetic

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Several test workers (make test): split the cores among them, for this process and for the
    # stages the tests start as subprocesses.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONF = REPO / "conf"


def compose_config(stage: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The one way the tests compose a stage's Hydra config (``conf/<stage>/<stage>.yaml`` with
    ``overrides``), as ``python -m <stage>`` composes it."""
    with initialize_config_dir(config_dir=str(CONF / stage), version_base="1.3"):
        return compose(stage, overrides=list(overrides))


def finetune_smoke_cfg(data_root: Path, *overrides: str) -> DictConfig:
    """Fine-tuning's smoke config on the session's tiny synthetic set (no generation)."""
    return compose_config("finetune", ["experiment=smoke", f"data.root={data_root}", "data.synthetic=null",
                                       "eval.plot_images=2", *overrides])


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """:func:`compose_config` as a fixture, for tests that take their helpers as arguments."""
    return compose_config


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny synthetic set (12 train, 6 val, 16 unlabeled images of 96 px), made once per session.

    Returns:
        ``{"root", "train_json", "val_json", "unlabeled"}`` (``unlabeled`` is the image folder).
    """
    out = make_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, num_train=12, num_val=6,
                         num_unlabeled=16, image_size=96)
    return {k: out[k] for k in ("root", "train_json", "val_json", "unlabeled")}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real small datasets (chess, bccd, coco128) in ``../shared/data``; skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (CI keeps ../shared beside the checkout)")
    return SHARED_DATA
