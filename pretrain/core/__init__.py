"""What both stages share, importing neither: ResNet building, the backbone file, image
loading, the COCO and unlabeled datasets, synthetic data, curve plots and runtime helpers
(run directories, checkpoints, trainer, precision and device choice).

Dependencies run the way the data flows: ``pretrain.core`` <- ``pretrain`` <- ``finetune``.
``tests/test_imports.py`` fails on any import against that direction.
"""
