"""The confusion matrix of an evaluation (finetune.confusion) on hand-built objects and detections."""

from __future__ import annotations

import pytest

from finetune.confusion import confusion_matrix, format_confusion


def _gt() -> dict:
    box = lambda x: [float(x), 0.0, 10.0, 10.0]
    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": box(0), "iscrowd": 0},    # A: called a dog
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": box(20), "iscrowd": 0},   # B: found
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": box(40), "iscrowd": 0},   # C: missed
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [60.0, 0.0, 30.0, 30.0], "iscrowd": 1},
            {"id": 5, "image_id": 3, "category_id": 7, "bbox": box(0), "iscrowd": 0},    # not evaluated
        ],
    }


def _det(image_id: int, cat: int, x: float, score: float, w: float = 10.0) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": [float(x), 0.0, w, 10.0], "score": score}


PREDICTIONS = [
    _det(1, 7, 0, 0.9),      # on A, the wrong class, highest score: A's column
    _det(1, 3, 0, 0.6),      # on A again, right class but lower: A is taken, so a detection on no object
    _det(1, 7, 20, 0.8),     # on B
    _det(1, 7, 40, 0.3),     # on C, below the score floor: C stays missed
    _det(1, 3, 150, 0.7),    # on nothing
    _det(1, 3, 65, 0.9),     # inside the crowd region: neither object nor background
    _det(2, 7, 0, 0.95),     # on an image without objects
    _det(3, 3, 0, 0.99),     # on an image not evaluated
]


def test_confusion_counts_each_object_once_by_its_best_scoring_detection():
    c = confusion_matrix(_gt(), PREDICTIONS, image_ids=[1, 2], iou=0.5, score=0.5)
    assert c["classes"] == ["cat", "dog"] and c["rows"][-1] == "background" and c["columns"][-1] == "missed"
    assert c["matrix"] == [[0, 1, 1],   # cat: A called a dog, C missed
                           [0, 1, 0],   # dog: B found
                           [2, 1, 0]]   # on no object: the second cat on A, the cat at 150, the dog on image 2
    assert c["confused"] == [{"true": "cat", "predicted": "dog", "count": 1, "share": 0.5}]
    text = format_confusion(c)
    assert "cat -> dog: 1 (50.0% of cat)" in text and "unmatched detections (on no object, or duplicates): 3" in text
    assert "  cat      0.0%   50.0%   50.0%  of 2" in text.splitlines()  # own class / other class / missed
    assert "  dog    100.0%    0.0%    0.0%  of 1" in text.splitlines()


def test_images_without_detections_cutoffs_and_the_best_overlap():
    """An evaluated image without detections still counts its objects as missed; the score floor and the
    IoU are inclusive; a detection over two free objects takes the one it overlaps most; a detection in a
    crowd region that also matches a real object is a match, one that matches none is not background."""
    gt = _gt()
    gt["images"].append({"id": 4, "width": 200, "height": 200, "file_name": "4.jpg"})
    gt["annotations"] += [
        {"id": 6, "image_id": 4, "category_id": 7, "bbox": [0.0, 0.0, 10.0, 10.0], "iscrowd": 0},   # missed
        {"id": 7, "image_id": 2, "category_id": 3, "bbox": [0.0, 50.0, 10.0, 10.0], "iscrowd": 0},
        {"id": 8, "image_id": 2, "category_id": 7, "bbox": [3.0, 50.0, 10.0, 10.0], "iscrowd": 0},
        {"id": 9, "image_id": 2, "category_id": 3, "bbox": [100.0, 100.0, 20.0, 20.0], "iscrowd": 0},
        {"id": 10, "image_id": 2, "category_id": 3, "bbox": [100.0, 100.0, 40.0, 40.0], "iscrowd": 1},
    ]
    box = lambda x, y, w, h, cat, s: {"image_id": 2, "category_id": cat, "bbox": [x, y, w, h], "score": s}
    preds = [
        box(2.0, 50.0, 10.0, 10.0, 3, 0.5),      # score exactly at the floor; IoU 8/12 with 7, 9/11 with 8: takes 8
        box(100.0, 100.0, 40.0, 20.0, 7, 0.9),   # IoU exactly 0.5 with 9 (inside the crowd region too): a match
        box(120.0, 120.0, 20.0, 20.0, 3, 0.8),   # in the crowd region only: not counted
    ]
    c = confusion_matrix(gt, preds, image_ids=[2, 4], iou=0.5, score=0.5)
    assert c["matrix"] == [[0, 1, 1],   # cat 9 called a dog (IoU 0.5 exactly), cat 7 missed
                           [1, 0, 1],   # dog 8 called a cat (the overlap the detection prefers), dog 6 missed
                           [0, 0, 0]]   # nothing unmatched: the crowd-only detection is not background
    assert confusion_matrix(gt, preds, [2, 4], iou=0.5, score=0.51)["matrix"][1] == [0, 0, 2]  # floor inclusive
    assert confusion_matrix(gt, preds, [2, 4], iou=0.51, score=0.5)["matrix"][0] == [0, 0, 2]  # IoU inclusive


def test_score_floor_iou_and_evaluated_images_decide_what_counts():
    everything = confusion_matrix(_gt(), PREDICTIONS, iou=0.5, score=0.0)  # every image, every detection
    assert everything["matrix"] == [[0, 2, 0],   # A and now C (its 0.3 detection) called dogs
                                    [1, 1, 0],   # image 3's dog called a cat
                                    [2, 1, 0]]
    assert everything["confused"][0] == {"true": "cat", "predicted": "dog", "count": 2, "share": 1.0}
    # A detection overlapping B at IoU 6/14 = 0.43: a match at iou 0.4, a detection on no object at 0.5.
    shifted = [_det(1, 7, 24, 0.8)]
    assert confusion_matrix(_gt(), shifted, [1], iou=0.4)["matrix"][1] == [0, 1, 0]
    strict = confusion_matrix(_gt(), shifted, [1], iou=0.5)["matrix"]
    assert strict[1] == [0, 0, 1] and strict[2] == [0, 1, 0]
    with pytest.raises(ValueError, match="iou"):
        confusion_matrix(_gt(), [], iou=0.0)


def test_categories_outside_the_ground_truth_get_their_own_row_and_column():
    """A detector whose label map has a class the validation file does not list (or names them
    otherwise): its detections are shown under that class, not dropped or refused."""
    c = confusion_matrix(_gt(), [_det(1, 99, 20, 0.9)], [1], class_names={3: "kitten", 7: "dog", 99: "wolf"})
    assert c["classes"] == ["kitten", "dog", "wolf"]  # the detector's names over the file's
    assert c["matrix"][1] == [0, 0, 1, 0]  # B, the dog, boxed as a wolf
    assert confusion_matrix(_gt(), [_det(1, 42, 20, 0.9)], [1])["classes"] == ["cat", "dog", "id 42"]
