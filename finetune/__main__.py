"""``python -m finetune [overrides]``: detection fine-tuning (see conf/finetune/finetune.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf/finetune", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`finetune.train.train`; returns val AP so Hydra sweepers can optimise it."""
    from finetune.train import train  # imported here so `--help` / `--cfg job` stay fast

    metrics = train(cfg)
    coco = metrics.get("coco") or {}
    return coco.get("AP")


if __name__ == "__main__":
    main()
