"""``python -m finetune [overrides]``: detection fine-tuning (see conf/finetune/finetune.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pretrain.core.run.configs import config_dir


@hydra.main(config_path=config_dir("finetune"), config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`finetune.run.run` (fine-tuning, or the semi stage); returns val AP so Hydra sweepers
    can optimise it."""
    from finetune.run import run  # imported here so `--help` / `--cfg job` stay fast

    metrics = run(cfg)
    coco = metrics.get("coco") or {}
    return coco.get("AP")


if __name__ == "__main__":
    main()
