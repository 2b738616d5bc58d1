"""Labeled (COCO JSON) and unlabeled data: datasets, converters, splitter, synthetic data."""
