"""What both stages share, importing neither, in three sub-packages by role:

- ``pretrain.core.data``: COCO detection sets and their cleaning, image loading, label maps,
  unlabeled image folders, the built-in synthetic scenes;
- ``pretrain.core.backbone``: ResNet building, the backbone file, other SSL code bases' checkpoints;
- ``pretrain.core.run``: the trainer, run directories and checkpoints, guards against lost work
  (SIGTERM, non-finite losses), logs, deterministic resume, precision and device choice, LR
  schedules, curve plots, safe checkpoint loading, where the configs are.

Dependencies run the way the data flows: ``pretrain.core`` <- ``pretrain`` <- ``finetune``.
``tests/test_imports.py`` fails on any import against that direction.
"""
