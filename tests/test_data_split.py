"""Labeled-fraction splitter: deterministic, covers every class when it can, says so when not."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.split import ClassCoverageWarning, choose_labeled, labeled_count, main, split_coco
from pretrain.core.data.coco import CocoDetection


def _toy(n_images: int = 50) -> dict:
    """Class 1 everywhere, class 2 on every 10th image, class 3 on image 37 only (plus a crowd box)."""
    anns = []
    for i in range(1, n_images + 1):
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5]})
        if i % 10 == 0:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 2, "bbox": [0, 0, 5, 5]})
    anns.append({"id": len(anns) + 1, "image_id": 37, "category_id": 3, "bbox": [0, 0, 5, 5]})
    anns.append({"id": len(anns) + 1, "image_id": 5, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 9, "height": 9} for i in range(1, n_images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


def test_choose_is_deterministic_and_covers_classes() -> None:
    coco = _toy()
    a, unc = choose_labeled(coco, 5, seed=1)
    assert (a, unc) == choose_labeled(coco, 5, seed=1)
    assert len(a) == 5 and unc == [] and 37 in a and any(i % 10 == 0 for i in a)
    assert choose_labeled(coco, 5, seed=2)[0] != a
    # Image order in the file does not matter: ids are sorted before the draw.
    shuffled = dict(coco, images=coco["images"][::-1])
    assert choose_labeled(shuffled, 5, seed=1)[0] == a
    # A budget of one image covers the rarest class (c3 only on image 37; the crowd box does not count).
    one, unc = choose_labeled(coco, 1, seed=1)
    assert one == [37] and unc == [2]


def test_labeled_count() -> None:
    assert labeled_count(202, 0.1) == 20 and labeled_count(202, 0.01) == 2 and labeled_count(50, 0.001) == 1
    assert labeled_count(10, num_labeled=3) == 3
    with pytest.raises(ValueError, match="fraction"):
        labeled_count(10, 1.5)
    with pytest.raises(ValueError, match="exactly one"):
        labeled_count(10, 0.5, 3)


def test_split_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    (src_dir / "train.json").write_text(json.dumps(_toy()))
    out = tmp_path / "splits" / "10pct"
    main([str(src_dir / "train.json"), "--fraction", "0.1", "--seed", "1", "--out", str(out)])
    lab, unl = json.loads((out / "labeled.json").read_text()), json.loads((out / "unlabeled.json").read_text())
    assert len(lab["images"]) == 5 and len(unl["images"]) == 45
    assert {im["id"] for im in lab["images"]}.isdisjoint({im["id"] for im in unl["images"]})
    assert unl["info"]["hidden_ground_truth"] is True and "hidden_ground_truth" not in lab["info"]
    assert len(unl["annotations"]) + len(lab["annotations"]) == len(_toy()["annotations"])
    assert lab["info"]["split_seed"] == 1 and lab["info"]["split_fraction"] == 0.1
    assert lab["info"]["split_source"].endswith("data/train.json")
    assert lab["images"][0]["file_name"].startswith("../../data/")  # still resolves from the new folder
    iid = lab["images"][0]["id"]
    assert (out / lab["images"][0]["file_name"]).resolve() == (src_dir / f"{iid}.jpg").resolve()
    first = (out / "labeled.json").read_bytes()
    split_coco(src_dir / "train.json", out, fraction=0.1, seed=1)
    assert (out / "labeled.json").read_bytes() == first
    assert "5 images" in capsys.readouterr().out
    # Fine-tuning on it reads the fraction and seed (metrics.json's labeled_fraction, make report's labeled %).
    from pretrain.core.data.coco import CocoDetection

    ds = CocoDetection(out / "labeled.json", check_files=False)
    assert (ds.info["split_fraction"], ds.info["split_seed"]) == (0.1, 1)


def test_coverage_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.json").write_text(json.dumps(_toy()))
    with pytest.warns(ClassCoverageWarning, match="1 classes have no labeled image \\(c2\\)"):
        r = split_coco(tmp_path / "t.json", tmp_path / "o", num_labeled=1, seed=0)
    assert r["uncovered"] == ["c2"] and "warning:" in capsys.readouterr().out


def test_chess_split(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "chess/train/_annotations.coco.json"
    r = split_coco(src, tmp_path / "s", fraction=0.05, seed=3)
    assert r["num_labeled"] == 10 and r["uncovered"] == []
    ds = CocoDetection(r["labeled"])  # file_names rewritten: the images are found from tmp_path
    assert ds.num_classes == 13 and ds.report.per_class["bishop"] == 1
    assert all(v > 0 for v in ds.report.per_class.values())
    rest = CocoDetection(r["unlabeled"], label_map=ds.label_map)
    assert len(rest) == 192 and Counter(rest.report.per_class)["bishop"] == 0
