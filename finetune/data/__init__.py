"""Labeled (COCO JSON) and unlabeled data: datasets, converters, splitter, synthetic data.

Command-line tools: ``python -m finetune.data.convert`` (VOC/YOLO -> COCO), ``python -m
finetune.data.split`` (labeled fraction), ``python -m finetune.data.report`` (what a set holds),
``scripts/make_synthetic.py`` (the built-in synthetic set).
"""

from pretrain.core.data.coco import CocoDetection, LabelMap, collate_fn, load_label_map, save_label_map
from pretrain.core.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_rgb
from pretrain.core.data.synthetic import ensure_synthetic, make_synthetic
from pretrain.core.data.unlabeled import UnlabeledImages

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "CocoDetection",
    "ImageError",
    "LabelMap",
    "UnlabeledImages",
    "collate_fn",
    "ensure_synthetic",
    "load_label_map",
    "load_rgb",
    "make_synthetic",
    "save_label_map",
]
