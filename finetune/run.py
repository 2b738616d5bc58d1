"""What ``python -m finetune`` runs: plain fine-tuning, or the semi stage when ``semi.mode`` names a mode.

The one place that knows both: fine-tuning (:mod:`finetune.train`) knows nothing of the semi stage,
and the semi stage (:mod:`finetune.semi`) is a layer on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig


def semi_mode(cfg: DictConfig) -> str:
    """``semi.mode`` (``none`` without a semi group, e.g. in configs written before it existed)."""
    semi = cfg.get("semi")
    return str(semi.get("mode", "none")) if semi is not None else "none"


def run(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Run the stage ``cfg`` asks for in ``run_dir`` (default the Hydra run dir); return its metrics.

    ``callbacks`` go to the trainer (e.g. a benchmark's step timer)."""
    from finetune import semi

    if semi_mode(cfg) == "none":
        from finetune.train import train

        semi.plan.check_unused(cfg)
        return train(cfg, run_dir, callbacks=callbacks)
    return semi.run(cfg, run_dir, callbacks=callbacks)
