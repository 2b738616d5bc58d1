"""VOC and YOLO converters: exact counts on the real sets, conventions on small crafted ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.convert import ConversionError, main, voc_to_coco, yolo_label_path, yolo_to_coco
from pretrain.core.data.coco import CocoDetection


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_bccd_voc(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bccd"
    main(["voc", str(shared_data / "bccd"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "trainval" in printed and f"relative to {out}" in printed
    assert sorted(p.name for p in out.glob("*.json")) == ["test.json", "train.json", "val.json"]
    counts = {s: _load(out / f"{s}.json") for s in ("train", "val", "test")}
    assert {s: len(c["images"]) for s, c in counts.items()} == {"train": 205, "val": 87, "test": 72}
    assert sum(len(c["annotations"]) for c in counts.values()) == 4888
    assert [c["name"] for c in counts["train"]["categories"]] == ["Platelets", "RBC", "WBC"]
    assert [c["id"] for c in counts["train"]["categories"]] == [1, 2, 3]
    ids = [im["id"] for c in counts.values() for im in c["images"]]
    assert len(ids) == len(set(ids)) == 364  # one id per image across splits
    # BloodImage_00000: WBC <xmin>260</xmin><ymin>177</ymin><xmax>491</xmax><ymax>376</ymax>, 1-based.
    train = counts["train"]
    im0 = next(im for c in counts.values() for im in c["images"] if im["file_name"].endswith("_00000.jpg"))
    ann0 = next(a for c in counts.values() for a in c["annotations"] if a["image_id"] == im0["id"])
    assert ann0["bbox"] == [259, 176, 232, 200] and ann0["category_id"] == 3
    ds = CocoDetection(out / "train.json")  # file_names resolve against the JSON's folder
    assert len(ds) == 205 and ds.num_classes == 3 and ds.image_path(0).is_file()
    assert train["info"]["image_root"] == os.path.abspath(out)


def test_coco128_yolo(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c128"
    main(["yolo", str(shared_data / "coco128/data.yaml"), "--out", str(out)])
    printed = capsys.readouterr().out
    train, val = _load(out / "train.json"), _load(out / "val.json")
    assert not (out / "test.json").exists()
    assert (len(train["images"]), len(val["images"])) == (128, 128)
    assert len(val["annotations"]) == 898
    # The README's 941 train boxes count the label files: 929 belong to the 128 images and 12 sit in
    # two label files whose images are not in the set; the converter reports them instead.
    assert len(train["annotations"]) == 929
    orphans = train["info"]["orphan_label_files"]
    assert [Path(o).name for o in orphans] == ["000000000656.txt", "000000000659.txt"]
    assert sum(len(Path(o).read_text().split("\n")) - 1 for o in orphans) == 941 - 929
    assert "2 label files name no image" in printed and "12 boxes not converted" in printed
    assert len(train["categories"]) == 80 and train["categories"][0] == {"id": 1, "name": "person",
                                                                         "supercategory": "none"}
    assert len({a["category_id"] for a in train["annotations"]}) == 71
    assert len({a["category_id"] for a in val["annotations"]}) == 73
    ds = CocoDetection(out / "val.json")
    assert ds.num_classes == 80 and ds.report.fixes() == {}  # every COCO class kept, none broken


def _voc_obj(name: str, box: tuple, difficult: int = 0) -> str:
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _voc(root: Path, files: dict[str, list[str]], ext: str = ".jpg") -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem, objs in files.items():
        Image.new("RGB", (50, 40)).save(root / "JPEGImages" / f"{stem}{ext}")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>50</width><height>40</height>"
            f"<depth>3</depth></size>{''.join(objs)}</annotation>")


def test_voc_conventions(tmp_path: Path) -> None:
    root = tmp_path / "VOCtiny" / "VOC2007"  # found one level below the given folder
    _voc(root, {"a": [_voc_obj("zebra", (1, 1, 50, 40)), _voc_obj("ant", (10.5, 5, 20.5, 15), difficult=1)],
                "b": [_voc_obj("ant", (3, 3, 3, 3))]}, ext=".PNG")
    out = tmp_path / "out"
    cocos = voc_to_coco(tmp_path / "VOCtiny", out)
    assert list(cocos) == ["all"]  # no ImageSets: one file
    c = cocos["all"]
    assert [x["name"] for x in c["categories"]] == ["ant", "zebra"]
    anns = c["annotations"]
    assert anns[0]["bbox"] == [0, 0, 50, 40] and anns[0]["category_id"] == 2  # full image, 1-based inclusive
    assert anns[1]["bbox"] == [9.5, 4, 11, 11] and anns[1]["iscrowd"] == 1 and anns[1]["difficult"] == 1
    assert anns[2]["bbox"] == [2, 2, 1, 1]  # xmin == xmax is one pixel wide in VOC
    assert c["images"][0]["file_name"] == "../VOCtiny/VOC2007/JPEGImages/a.PNG"
    assert [a["iscrowd"] for a in voc_to_coco(root, out, difficult="keep")["all"]["annotations"]] == [0, 0, 0]
    assert len(voc_to_coco(root, out, difficult="drop")["all"]["annotations"]) == 2
    assert [x["name"] for x in voc_to_coco(root, out, classes=["zebra", "ant"])["all"]["categories"]] == [
        "zebra", "ant"]
    with pytest.raises(ConversionError, match=r"\['zebra'\] are not in --classes"):
        voc_to_coco(root, out, classes=["ant"])
    (root / "JPEGImages" / "b.PNG").unlink()
    with pytest.raises(ConversionError, match=r"1 annotated images are missing.*'b'"):
        voc_to_coco(root, out)


def test_voc_imagesets(tmp_path: Path) -> None:
    _voc(tmp_path, {s: [_voc_obj("x", (1, 1, 5, 5))] for s in ("a", "b", "c")})
    main_dir = tmp_path / "ImageSets" / "Main"
    main_dir.mkdir(parents=True)
    (main_dir / "train.txt").write_text("a\nb\n")
    (main_dir / "val.txt").write_text("c\n")
    (main_dir / "trainval.txt").write_text("a\nb\nc\n")
    (main_dir / "x_train.txt").write_text("a  1\nb -1\n")  # per-class list: not a split
    cocos = voc_to_coco(tmp_path, tmp_path / "o")
    assert sorted(cocos) == ["train", "val"] and len(cocos["train"]["images"]) == 2
    (main_dir / "missing.txt").write_text("zzz\n")
    with pytest.raises(ConversionError, match="no Annotations/<id>.xml"):
        voc_to_coco(tmp_path, tmp_path / "o")


def test_yolo_conventions(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(root / "images/train/a.jpg")
    Image.new("RGB", (100, 50)).save(root / "images/train/b.png")
    Image.new("RGB", (10, 10)).save(root / "images/val/c.jpg")
    (root / "labels/train/a.txt").write_text(
        "1 0.5 0.5 0.2 0.4\n"  # a box
        "0 0.1 0.1 0.3 0.1 0.2 0.5\n"  # a polygon -> its box
        "5 0.5 0.5 0.1 0.1\n"  # unknown class: skipped
        "0 0.5 0.5\n"  # wrong length: skipped
        "\n")
    (root / "labels/train/zz.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # orphan
    (root / "lists").mkdir()
    (root / "lists/val.txt").write_text("./../images/val/c.jpg\n")
    yaml_path = tmp_path / "data.yaml"
    yaml_path.write_text("path: ds\ntrain: images/train\nval: lists/val.txt\ntest:\n"
                         "names: {0: cat, 1: dog}\n")
    cocos = yolo_to_coco(yaml_path, tmp_path / "out")
    assert sorted(cocos) == ["train", "val"]
    tr = cocos["train"]
    assert [im["file_name"] for im in tr["images"]] == ["../ds/images/train/a.jpg",
                                                        "../ds/images/train/b.png"]
    assert [a["bbox"] for a in tr["annotations"]] == [[40.0, 15.0, 20.0, 20.0], [10.0, 5.0, 20.0, 20.0]]
    assert [a["category_id"] for a in tr["annotations"]] == [2, 1]
    assert [Path(p).name for p in tr["info"]["orphan_label_files"]] == ["zz.txt"]
    assert len(cocos["val"]["images"]) == 1 and cocos["val"]["annotations"] == []
    assert yolo_label_path(Path("/x/images/a/images/b/c.jpg")) == Path("/x/images/a/labels/b/c.txt")
    yaml_path.write_text("path: ds\ntrain: images/nope\nnames: [a]\n")
    with pytest.raises(ConversionError, match="does not exist"):
        yolo_to_coco(yaml_path, tmp_path / "out")
    yaml_path.write_text("path: ds\ntrain: images/train\nnc: 3\nnames: [a]\n")
    with pytest.raises(ConversionError, match="nc=3 but 1 names"):
        yolo_to_coco(yaml_path, tmp_path / "out")


def _labelimg(root: Path, ann_dir: str, img_dir: str, filename_of=lambda stem: f"{stem}.jpg") -> None:
    """LabelImg's output: one XML per image, ``<filename>`` as the tool wrote it."""
    (root / ann_dir).mkdir(parents=True, exist_ok=True)
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    for stem, box in (("cat1", (5, 5, 30, 20)), ("cat2", (1, 1, 10, 10)), ("dog", (20, 10, 45, 35))):
        Image.new("RGB", (50, 40)).save(root / img_dir / f"{stem}.jpg")
        (root / ann_dir / f"{stem}.xml").write_text(
            f"<annotation><folder>{img_dir}</folder><filename>{filename_of(stem)}</filename><size><width>50</width>"
            f"<height>40</height><depth>3</depth></size>{_voc_obj(stem.rstrip('12'), box)}</annotation>")


@pytest.mark.parametrize("ann_dir", ["annotations", "annots"])
def test_voc_labelimg_layouts_are_found(tmp_path: Path, ann_dir: str) -> None:
    _labelimg(tmp_path / "set", ann_dir, "images")
    out = tmp_path / "out"
    coco = voc_to_coco(tmp_path / "set", out)["all"]
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 3
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    names = {f"../set/images/{s}.jpg" for s in ("cat1", "cat2", "dog")}
    assert {i["file_name"] for i in coco["images"]} == names


def test_voc_annotations_and_images_given_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # <filename> holds the labelling machine's path: its last part finds the image.
    _labelimg(tmp_path, "xml_here", "pics", filename_of=lambda stem: f"C:\\Users\\me\\pics\\{stem}.jpg")
    out = tmp_path / "out"
    main(["voc", "--annotations", str(tmp_path / "xml_here"), "--images", str(tmp_path / "pics"),
          "--out", str(out)])
    coco = json.loads((out / "all.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 3
    assert "all 3 XML files go to all.json" in capsys.readouterr().out
    ds = CocoDetection(out / "all.json")
    assert len(ds) == 3 and ds.num_classes == 2


def test_voc_xml_beside_images_and_errors(tmp_path: Path) -> None:
    _labelimg(tmp_path / "flat", "", "")
    coco = voc_to_coco(tmp_path / "flat", tmp_path / "o")["all"]
    assert len(coco["images"]) == 3 and coco["images"][0]["file_name"].startswith("../flat/")
    _labelimg(tmp_path / "two" / "a", "annotations", "images")
    _labelimg(tmp_path / "two" / "b", "annots", "images")
    with pytest.raises(ConversionError, match="several VOC annotation folders"):
        voc_to_coco(tmp_path / "two", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no VOC XML found.*--annotations DIR --images DIR"):
        voc_to_coco(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ConversionError, match="missing from .*--images DIR"):
        voc_to_coco(None, tmp_path / "o", annotations=tmp_path / "two" / "a" / "annotations",
                    images=tmp_path / "empty")


def test_out_defaults_to_coco_in_the_set_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --out the JSONs go to <set>/coco/, and their file_names still find the images."""
    _labelimg(tmp_path / "set", "annots", "images")
    main(["voc", str(tmp_path / "set")])
    out = tmp_path / "set" / "coco"
    assert f"relative to {out}" in capsys.readouterr().out
    ds = CocoDetection(out / "all.json")
    assert len(ds) == 3 and ds.num_classes == 2 and ds.image_path(0).is_file()
    # The same with the two folders given by hand: the set is the folder holding the XML folder.
    _labelimg(tmp_path / "hand", "xml_here", "pics")
    hand = tmp_path / "hand"
    main(["voc", "--annotations", str(hand / "xml_here"), "--images", str(hand / "pics")])
    assert len(CocoDetection(hand / "coco" / "all.json")) == 3
    _labelimg(tmp_path / "flat", "", "")  # XML beside the images: coco/ among them
    main(["voc", str(tmp_path / "flat")])
    assert len(CocoDetection(tmp_path / "flat" / "coco" / "all.json")) == 3
