"""The kNN probe: perfect on separable features, chance on random ones, and box crops from COCO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.knn import BoxCrops, knn_top1


@pytest.mark.parametrize("vote", ["weighted", "majority"])
def test_separable_features_give_perfect_accuracy(vote):
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 10
    labels = np.repeat(np.arange(4), 25)
    feats = centers[labels] + rng.normal(0, 0.5, (100, 16))
    assert knn_top1(torch.tensor(feats), torch.tensor(labels), k=10, vote=vote) == 1.0


@pytest.mark.parametrize("vote", ["weighted", "majority"])
def test_random_features_give_about_chance(vote):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 2000)
    feats = rng.normal(size=(2000, 32)).astype(np.float32)
    acc = knn_top1(feats, labels, k=20, vote=vote)
    assert 0.15 < acc < 0.26  # chance is 0.2


def test_leave_one_out_does_not_count_the_query_itself():
    # Every point is alone in its class: with the query left out no neighbour can be right.
    feats = np.eye(6, dtype=np.float32)
    assert knn_top1(feats, np.arange(6), k=3) == 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="vote"):
        knn_top1(np.zeros((3, 2)), np.zeros(3), vote="mean")
    with pytest.raises(ValueError, match="match"):
        knn_top1(np.zeros((3, 2)), np.zeros(4))


def test_box_crops_from_coco(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:15, 5:25] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [30, 20, 20, 15], "area": 300, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [40, 2, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    crops = BoxCrops(tmp_path / "ann.json", size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert len(crops) == 3  # the crowd box is left out
    x0, y0, i0 = crops[0]
    assert x0.shape == (3, 16, 16) and int(y0) == 1 and i0 == 0
    assert torch.allclose(x0, torch.ones_like(x0), atol=0.02)  # the white box
    x1, y1, _ = crops[1]
    assert int(y1) == 2 and float(x1.max()) < 0.02
    limited = BoxCrops(tmp_path / "ann.json", size=8, max_boxes=2)
    assert len(limited) == 2
