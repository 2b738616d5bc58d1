"""COCO evaluation on hand-built ground truth and predictions, and the LR schedule."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.coco_eval import COCO_STATS, evaluate_coco
from finetune.coco_results import detections_to_coco, format_table, write_predictions
from pretrain.core.run.schedule import lr_factor


def _gt(tmp_path, anns, cats=((3, "cat"), (7, "dog")), n_images=2, first_ann_id=1):
    """A COCO file with 100x100 images and the given (image_id, category_id, bbox) boxes."""
    data = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(n_images)],
        "annotations": [
            {"id": first_ann_id + k, "image_id": iid, "category_id": cid, "bbox": list(b), "area": b[2] * b[3],
             "iscrowd": 0}
            for k, (iid, cid, b) in enumerate(anns)
        ],
        "categories": [{"id": c, "name": n} for c, n in cats],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


ANNS = [(1, 3, (10, 10, 30, 30)), (1, 7, (50, 50, 40, 20)), (2, 3, (5, 60, 20, 30))]


def _perfect(anns):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9} for i, c, b in anns]


def test_perfect_predictions_give_ap_one(tmp_path):
    r = evaluate_coco(_gt(tmp_path, ANNS), _perfect(ANNS))
    assert set(r.stats) == set(COCO_STATS)
    assert r.stats["AP"] == pytest.approx(1.0)
    assert r.stats["AP50"] == pytest.approx(1.0)
    assert r.stats["AR100"] == pytest.approx(1.0)
    assert r.stats["APl"] == -1.0  # no large objects in this set: COCO's "undefined"
    assert r.per_class_ap == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert r.num_images == 2 and r.num_detections == 3


def test_per_class_ap_and_missed_class(tmp_path):
    preds = _perfect(ANNS[:1] + ANNS[2:])  # every cat found, the dog missed
    r = evaluate_coco(_gt(tmp_path, ANNS), preds)
    assert r.per_class_ap["cat"] == pytest.approx(1.0)
    assert r.per_class_ap["dog"] == pytest.approx(0.0)
    assert r.stats["AP"] == pytest.approx(0.5)  # the mean over classes with ground truth


def test_class_without_ground_truth_is_minus_one(tmp_path):
    gt = _gt(tmp_path, ANNS, cats=((3, "cat"), (7, "dog"), (9, "bird")))
    r = evaluate_coco(gt, _perfect(ANNS))
    assert r.per_class_ap["bird"] == -1.0
    assert r.stats["AP"] == pytest.approx(1.0)  # bird does not drag the mean down


def test_empty_predictions(tmp_path):
    r = evaluate_coco(_gt(tmp_path, ANNS), [])
    assert r.stats["AP"] == 0.0 and r.stats["AR100"] == 0.0
    assert r.per_class_ap == {"cat": 0.0, "dog": 0.0}
    assert r.num_detections == 0
    empty = evaluate_coco(_gt(tmp_path, ANNS), [], image_ids=[])
    assert all(v == -1.0 for v in empty.stats.values())


def test_image_ids_restrict_the_evaluation(tmp_path):
    gt = _gt(tmp_path, ANNS)
    only_first = [p for p in _perfect(ANNS) if p["image_id"] == 1]
    assert evaluate_coco(gt, only_first, image_ids=[1]).stats["AP"] == pytest.approx(1.0)
    # Image 2 was predicted on but got nothing: its cat counts as missed.
    assert evaluate_coco(gt, only_first, image_ids=[1, 2]).stats["AP"] < 1.0
    with pytest.raises(ValueError, match="outside the evaluated images"):
        evaluate_coco(gt, _perfect(ANNS), image_ids=[1])
    with pytest.raises(ValueError, match="not in the annotations"):
        evaluate_coco(gt, [], image_ids=[99])


def test_annotation_id_zero_is_not_a_miss(tmp_path):
    """pycocotools reads a matched gt id of 0 as "unmatched": ids are renumbered before evaluating."""
    gt = _gt(tmp_path, ANNS, first_ann_id=0)
    raw = COCO(str(gt))
    ev = COCOeval(raw, raw.loadRes(_perfect(ANNS)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] < 1.0  # the bug we avoid
    for backend in ("pycocotools", "faster_coco_eval"):
        assert evaluate_coco(gt, _perfect(ANNS), backend=backend).stats["AP"] == pytest.approx(1.0)
    assert raw.anns[0]["id"] == 0  # the caller's object is untouched


def test_detections_to_coco_writes_original_category_ids_and_frame():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])
    out = detections_to_coco(42, boxes, torch.tensor([0.9, 0.3]), torch.tensor([2, 1]), {1: 3, 2: 7}, scale=(2.0, 0.5))
    assert [d["category_id"] for d in out] == [7, 3]
    assert out[0]["bbox"] == [20.0, 10.0, 40.0, 20.0]  # xywh, x scaled by 2, y by 0.5
    assert out[0]["image_id"] == 42 and out[0]["score"] == pytest.approx(0.9)
    with pytest.raises(KeyError):
        detections_to_coco(1, boxes[:1], torch.tensor([0.5]), torch.tensor([5]), {1: 3})
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), {1: 3}) == []


def test_matches_pycocotools_and_faster_coco_eval_on_real_annotations(tmp_path, shared_data):
    """On the chess val set with noisy, partly wrong predictions: our numbers are pycocotools' own,
    and faster-coco-eval's are identical."""
    ann = shared_data / "chess" / "valid" / "_annotations.coco.json"
    data = json.loads(ann.read_text())
    rng = random.Random(0)
    cats = [c["id"] for c in data["categories"]]
    preds = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(3):
            cat = a["category_id"] if rng.random() < 0.8 else rng.choice(cats)
            preds.append({"image_id": a["image_id"], "category_id": cat,
                          "bbox": [x + rng.gauss(0, 0.1 * w), y + rng.gauss(0, 0.1 * h), w * rng.uniform(0.7, 1.3),
                                   h * rng.uniform(0.7, 1.3)], "score": rng.random()})
    # Renumber annotation ids from 1 so that plain pycocotools is not hit by the id-0 bug.
    for k, a in enumerate(data["annotations"]):
        a["id"] = k + 1
    fixed = tmp_path / "chess_val.json"
    fixed.write_text(json.dumps(data))
    pred_file = write_predictions(tmp_path / "predictions.json", preds)

    ours = evaluate_coco(fixed, json.loads(pred_file.read_text()))
    coco = COCO(str(fixed))
    ev = COCOeval(coco, coco.loadRes(str(pred_file)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [ours.stats[k] for k in COCO_STATS] == pytest.approx(list(ev.stats), abs=1e-12)
    assert 0.05 < ours.stats["AP"] < 0.95  # a meaningful, not degenerate, comparison
    fast = evaluate_coco(fixed, json.loads(pred_file.read_text()), backend="faster_coco_eval")
    assert fast.stats == pytest.approx(ours.stats, abs=1e-12)
    assert fast.per_class_ap == pytest.approx(ours.per_class_ap, abs=1e-12)


def test_format_table_marks_undefined():
    text = format_table({k: (0.5 if k == "AP" else -1.0) for k in COCO_STATS}, {"cat": 0.25, "dog": -1.0})
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["AP", "AP50"]
    assert lines[1].split()[:2] == ["50.0", "-"]
    assert "cat" in text and "25.0" in text


def test_lr_factor_warmup_step_and_cosine():
    total = 1000
    assert lr_factor(0, total, "step", warmup_steps=100, warmup_factor=0.001) == pytest.approx(0.001)
    assert lr_factor(50, total, "step", warmup_steps=100, warmup_factor=0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, "step", warmup_steps=100) == 1.0
    assert lr_factor(669, total, "step", milestones=(0.67, 0.89), gamma=0.1) == 1.0
    assert lr_factor(670, total, "step", milestones=(0.67, 0.89), gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(999, total, "step", milestones=(0.67, 0.89), gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(100, total, "cosine", warmup_steps=100) == pytest.approx(1.0)
    assert lr_factor(550, total, "cosine", warmup_steps=100) == pytest.approx(0.5)
    assert lr_factor(1000, total, "cosine", warmup_steps=100, min_factor=0.1) == pytest.approx(0.1)
    # Warmup never takes more than a tenth of a short run.
    assert lr_factor(10, 100, "constant", warmup_steps=500) == 1.0
    assert not math.isnan(lr_factor(0, 0, "cosine"))
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(0, 10, "poly")


def test_max_dets_other_than_100_gives_the_hand_set_pycocotools_ap(tmp_path):
    """pycocotools' summarize computes AP at a hard-coded 100 detections: with maxDets 300 it says -1.
    Ours equals pycocotools run with maxDets [1, 10, 300] and AP read from its accumulated precision."""
    rng = random.Random(1)
    anns = [(i, 3 if k % 2 else 7, (rng.uniform(0, 80), rng.uniform(0, 80), 12, 12))
            for i in (1, 2) for k in range(60)]
    gt = _gt(tmp_path, anns)
    # 200 detections per image, the true boxes scored lowest: only a cap above 100 finds most of them.
    preds = [{"image_id": i, "category_id": c, "bbox": list(b), "score": 0.01 + 0.001 * rng.random()}
             for i, c, b in anns]
    preds += [{"image_id": i, "category_id": 3, "bbox": [rng.uniform(0, 80), rng.uniform(0, 80), 5, 5],
               "score": 0.5 + 0.5 * rng.random()} for i in (1, 2) for _ in range(140)]
    pred_file = write_predictions(tmp_path / "p.json", preds)
    coco = COCO(str(gt))
    ev = COCOeval(coco, coco.loadRes(str(pred_file)), "bbox")
    ev.params.maxDets = [1, 10, 300]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == -1  # the pycocotools quirk this guards against
    p = ev.eval["precision"][:, :, :, 0, 2]
    by_hand = float(p[p > -1].mean())
    for backend in ("pycocotools", "faster_coco_eval"):
        ours = evaluate_coco(gt, json.loads(pred_file.read_text()), max_dets=300, backend=backend)
        assert ours.stats["AP"] == pytest.approx(by_hand, abs=1e-12), backend
        assert ours.stats["AP50"] == pytest.approx(ev.stats[1], abs=1e-12)
        assert ours.stats["AR100"] == pytest.approx(ev.stats[8], abs=1e-12)
    at_100 = evaluate_coco(gt, json.loads(pred_file.read_text()))
    assert ours.stats["AP"] > at_100.stats["AP"] + 0.05  # the detections past 100 are true ones
