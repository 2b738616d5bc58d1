"""CocoDetection: targets, class numbering, and the repairs it makes to real-world files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from pretrain.core.data.coco import CocoDetection, LabelMap, collate_fn, load_label_map, save_label_map
from pretrain.core.data.coco_clean import LoadReport, clean_annotations, ground_truth


def _write(tmp_path: Path, images: list[dict], anns: list[dict], cats: list[dict] | None = None,
           make_files: bool = True) -> Path:
    for im in images:
        if make_files:
            (tmp_path / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (im["width"], im["height"]), (120, 60, 30)).save(tmp_path / im["file_name"])
    cats = cats if cats is not None else [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _img(i: int, w: int = 64, h: int = 48) -> dict:
    return {"id": i, "file_name": f"im/{i}.png", "width": w, "height": h}


def _ann(i: int, image_id: int, cat: int, bbox: list[float], **kw: object) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_target_format_and_noncontiguous_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, [_img(10), _img(20)],
                  [_ann(1, 10, 7, [4, 5, 10, 20]), _ann(2, 10, 3, [0, 0, 64, 48], area=100.0)])
    ds = CocoDetection(path)
    assert ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert ds.label_to_cat_id == {1: 3, 2: 7} and ds.cat_id_to_label == {3: 1, 7: 2} and ds.cat_ids == [3, 7]
    img, t = ds[0]
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.float32 and img.shape == (3, 48, 64)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].canvas_size == (48, 64)
    assert t["boxes"].tolist() == [[4, 5, 14, 25], [0, 0, 64, 48]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [2, 1]
    assert t["image_id"] == 10 and t["area"].tolist() == [200.0, 100.0] and t["iscrowd"].tolist() == [0, 0]
    _, t2 = ds[1]  # an image without boxes stays, as a negative
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)


def test_bad_boxes_dropped_and_clipped_with_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    anns = [
        _ann(1, 1, 3, [10, 10, 0, 5]),  # zero width
        _ann(2, 1, 3, [10, 10, 5, -3]),  # negative height
        _ann(3, 1, 3, [-10, 40, 30, 20]),  # reaches outside: clipped to [0, 40, 20, 48]
        _ann(4, 1, 3, [70, 10, 5, 5]),  # entirely outside: dropped
        _ann(5, 1, 3, [1, 2, float("nan"), 4]),  # not finite
        _ann(6, 99, 3, [1, 1, 5, 5]),  # unknown image
        _ann(7, 1, 42, [1, 1, 5, 5]),  # unknown category
        _ann(8, 1, 7, [1, 1, 5, 5]),  # fine
    ]
    with caplog.at_level(logging.INFO, logger="pretrain.core.data.coco"):
        ds = CocoDetection(_write(tmp_path, [_img(1)], anns))
    r = ds.report
    assert (r.dropped_empty, r.clipped, r.dropped_outside, r.dropped_nonfinite) == (2, 1, 1, 1)
    assert (r.dropped_unknown_image, r.dropped_unknown_category, r.boxes) == (1, 1, 2)
    assert "dropped_empty=2" in caplog.text and "clipped=1" in caplog.text
    _, t = ds[0]
    assert t["boxes"].tolist() == [[0, 40, 20, 48], [1, 1, 6, 6]]
    assert t["area"][0].item() == pytest.approx(600 * (20 * 8) / (30 * 20))
    clipped = ds.coco.loadAnns(3)[0]
    assert clipped["bbox"] == [0, 40, 20, 8]


def test_missing_files_error_lists_them(tmp_path: Path) -> None:
    path = _write(tmp_path, [_img(1), _img(2), _img(3)], [_ann(1, 2, 3, [1, 1, 5, 5])])
    (tmp_path / "im/2.png").unlink()
    (tmp_path / "im/3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 3 image files are missing.*im/2.png.*im/3.png"):
        CocoDetection(path)
    ds = CocoDetection(path, missing="skip")
    assert ds.ids == [1] and ds.report.skipped_missing_files == 2 and ds.report.dropped_unknown_image == 0
    # A wrong image_root is the common cause; the message names it.
    with pytest.raises(FileNotFoundError, match="image_root=/nonexistent"):
        CocoDetection(path, image_root="/nonexistent")


def test_crowd_left_out_of_training_targets(tmp_path: Path) -> None:
    path = _write(tmp_path, [_img(1), _img(2)],
                  [_ann(1, 1, 3, [1, 1, 10, 10]), _ann(2, 1, 7, [20, 20, 30, 20], iscrowd=1),
                   _ann(3, 2, 7, [2, 2, 8, 8], iscrowd=1)])
    train = CocoDetection(path, train=True)
    _, t = train[0]
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]
    assert train[1][1]["boxes"].shape == (0, 4)
    assert len(train.coco.getAnnIds(iscrowd=None)) == 3  # evaluation still sees the crowd regions
    assert train.report.crowd == 2 and train.report.images_without_boxes == 1
    _, t = CocoDetection(path, train=False)[0]
    assert t["labels"].tolist() == [1, 2] and t["iscrowd"].tolist() == [0, 1]


def test_label_map_shared_with_val_and_saved(tmp_path: Path) -> None:
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    train = CocoDetection(_write(train_dir, [_img(1)],
                                 [_ann(1, 1, 3, [1, 1, 5, 5]), _ann(2, 1, 7, [1, 1, 5, 5])]))
    # The val file only uses "dog" and names one more category; it must keep train's numbering.
    val_path = _write(val_dir, [_img(1)], [_ann(1, 1, 7, [1, 1, 5, 5]), _ann(2, 1, 9, [1, 1, 5, 5])],
                      cats=[{"id": 7, "name": "dog"}, {"id": 9, "name": "cow"}])
    assert CocoDetection(val_path).class_names == ["dog", "cow"]
    val = CocoDetection(val_path, label_map=train.label_map, train=False)
    assert val.class_names == ["cat", "dog"] and val[0][1]["labels"].tolist() == [2]
    assert val.report.dropped_unmapped_category == 1
    assert sorted(val.coco.getCatIds()) == [3, 7]
    lm_path = save_label_map(tmp_path, train)
    assert lm_path.name == "label_map.json"
    lm = load_label_map(lm_path)
    assert lm == train.label_map and lm.num_classes == 2
    assert CocoDetection(val_path, label_map=lm_path).label_to_cat_id == {1: 3, 2: 7}
    assert CocoDetection(val_path, label_map={1: 7}).class_names == ["dog"]
    with pytest.raises(ValueError, match="without gaps"):
        LabelMap({1: 3, 3: 7}, ["a", "b"])


def test_json_size_mismatch_trusts_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, [_img(1, 64, 48)], [_ann(1, 1, 3, [8, 8, 16, 16])])
    Image.new("RGB", (128, 96)).save(tmp_path / "im/1.png")  # the file is twice as large
    ds = CocoDetection(path)
    img, t = ds[0]
    assert img.shape[-2:] == (96, 128) and t["boxes"].tolist() == [[16, 16, 48, 48]]
    assert t["boxes"].canvas_size == (96, 128)
    assert "trusting the image" in caplog.text


def test_v2_transforms_and_collate(synthetic_data: dict[str, Path]) -> None:
    tf = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Resize((48, 48))])
    ds = CocoDetection(synthetic_data["train_json"], transforms=lambda i, t: tf(i, t))
    plain = CocoDetection(synthetic_data["train_json"])
    (img, t), (_, t0) = ds[0], plain[0]
    assert img.shape == (3, 48, 48) and isinstance(t["boxes"], tv_tensors.BoundingBoxes)
    flipped = t0["boxes"].clone()
    flipped[:, [0, 2]] = 96 - t0["boxes"][:, [2, 0]]
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), flipped.as_subclass(torch.Tensor) * 0.5)
    images, targets = collate_fn([ds[0], ds[1], ds[2]])
    assert len(images) == 3 and len(targets) == 3 and targets[1]["image_id"] == plain.ids[1]
    loader = torch.utils.data.DataLoader(plain, batch_size=4, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert [i.shape for i in images] == [(3, 96, 96)] * 4 and all("boxes" in t for t in targets)


def test_chess_as_is(shared_data: Path) -> None:
    """Real Roboflow export: placeholder id 0 'pieces' is no class, the one-box 'bishop' is one."""
    train = CocoDetection(shared_data / "chess/train/_annotations.coco.json")
    assert len(train) == 202 and train.report.boxes == 2108 and train.num_classes == 13
    assert "pieces" not in train.class_names and train.report.ignored_categories == ["pieces"]
    assert train.report.per_class["bishop"] == 1 and train.label_to_cat_id[1] == 1
    assert train.report.fixes() == {}
    counts = {"valid": (58, 386), "test": (29, 376)}
    for split, (n_img, n_box) in counts.items():
        ds = CocoDetection(shared_data / f"chess/{split}/_annotations.coco.json", label_map=train.label_map,
                           train=False)
        assert (len(ds), ds.report.boxes, ds.num_classes) == (n_img, n_box, 13)
    img, t = train[0]
    assert img.shape == (3, 1371, 2048) and int(t["labels"].min()) >= 1 and int(t["labels"].max()) <= 13
    # Labels and the evaluation ground truth agree on the category of every box.
    ann_cats = sorted(a["category_id"] for a in train.coco.imgToAnns[train.ids[0]])
    assert sorted(train.label_to_cat_id[int(lbl)] for lbl in t["labels"]) == ann_cats


def test_synthetic_loads(synthetic_data: dict[str, Path]) -> None:
    ds = CocoDetection(synthetic_data["train_json"])
    assert len(ds) == 12 and ds.num_classes == 5 and ds.report.fixes() == {}
    boxes = np.concatenate([ds.annotations(i)["boxes"] for i in range(len(ds))])
    assert len(boxes) > 12 and (boxes[:, 2:] > boxes[:, :2]).all() and boxes.max() <= 96


def test_clean_annotations_without_images() -> None:
    """The cleaning step on its own: ids fixed for COCOeval, strings accepted, only the K classes scored."""
    images = {1: _img(1), 2: _img(2)}
    cats = {3: {"id": 3, "name": "cat"}, 7: {"id": 7, "name": "dog"}, 9: {"id": 9, "name": "cow"}}
    lm = LabelMap({1: 7, 2: 3}, ["dog", "cat"])
    anns = [
        _ann(5, 1, 3, [1, 1, 4, 4]),
        _ann(5, "2", "7", [2, 2, 6, 6]),  # duplicate id, ids as strings
        {"image_id": 1, "category_id": 7, "bbox": [60, 40, 10, 10]},  # no id, reaches outside
        _ann(6, 2, 9, [1, 1, 5, 5]),  # a category outside the label map
    ]
    report = LoadReport("mem")
    targets, clean = clean_annotations(images, anns, cats, lm, report)
    assert [a["id"] for a in clean] == [5, 7, 8]  # unique, after the file's largest id
    assert targets[1]["labels"].tolist() == [2, 1] and targets[2]["labels"].tolist() == [1]
    assert targets[1]["boxes"][1].tolist() == [60, 40, 64, 48]
    assert targets[1]["area"][1] == pytest.approx(4 * 8)
    assert (report.clipped, report.dropped_unmapped_category, report.boxes) == (1, 1, 3)
    assert report.per_class == {"dog": 2, "cat": 1}
    gt = ground_truth(images, clean, cats, lm)
    assert sorted(gt.getCatIds()) == [3, 7] and len(gt.getAnnIds()) == 3  # no "cow"
