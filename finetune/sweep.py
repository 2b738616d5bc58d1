"""``python -m finetune.sweep -m [pretrain overrides]``: a pretraining multirun in which every
job is followed by a fine-tune from its backbone (in ``<job dir>/finetune``).

The pretraining side knows nothing of fine-tuning (dependencies run the way the data flows),
so the downstream stage attaches itself: this entry point is ``python -m pretrain`` with
:class:`finetune.pipeline.FinetuneAfterPretrain` added as a Hydra callback. Fine-tuning
overrides go in ``hydra.callbacks.finetune.overrides=[detector=retinanet]``; add
``hydra.callbacks.finetune.baseline=true`` for the random-init twin of every job.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from pretrain.core.run.configs import config_dir
from pretrain.train import train

CALLBACK = {
    "hydra.callbacks.finetune._target_": "finetune.pipeline.FinetuneAfterPretrain",
    "hydra.callbacks.finetune.overrides": "[]",
    "hydra.callbacks.finetune.baseline": "false",
}


def sweep_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the callback added: ``+key=value`` for each of its settings, the user's value
    where ``argv`` gives one (``hydra.callbacks.finetune.overrides=[detector=retinanet]``)."""
    ours = [a for a in argv if "=" in a and a.lstrip("+").startswith("hydra.callbacks.finetune.")]
    given = dict(a.lstrip("+").split("=", 1) for a in ours)
    rest = [a for a in argv if not ("=" in a and a.lstrip("+").startswith("hydra.callbacks.finetune."))]
    return [*rest, *(f"+{k}={given.pop(k, v)}" for k, v in CALLBACK.items()), *(f"+{k}={v}" for k, v in given.items())]


@hydra.main(config_path=config_dir("pretrain"), config_name="pretrain", version_base="1.3")
def _pretrain(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *sweep_argv(sys.argv[1:])]
    _pretrain()


if __name__ == "__main__":
    main()
