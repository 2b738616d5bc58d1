"""``python -m pretrain [overrides]``: self-supervised pretraining (see conf/pretrain/pretrain.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pretrain.core.run.configs import config_dir
from pretrain.train import train


@hydra.main(config_path=config_dir("pretrain"), config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
