"""The bad-input corpus: every kind of broken image, annotation file and config a real folder or a
user's command line holds, generated here (no committed binaries), and what each one gets: a clear
error naming the file and the fix, or a counted and logged skip or fix. Never a silent drop, and
never a crash mid-run because of one file among thousands.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image
from test_data_convert import _voc, _voc_obj
from test_pretrain_train import smoke_cfg as pretrain_cfg
from test_semi_train import smoke_cfg

from finetune.data.convert import ConversionError, voc_to_coco, yolo_to_coco
from finetune.run import run as finetune_train
from pretrain.core.data.coco import CocoDetection
from pretrain.core.data.images import ImageError
from pretrain.core.data.unlabeled import UnlabeledImages

W, H = 64, 48


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def make_image_corpus(folder: Path) -> dict[str, str]:
    """Write the corpus into ``folder``; returns ``{file name: expected outcome}``:
    ``ok`` (read, converted to upright RGB) or ``skip`` (unusable: counted, logged, replaced)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    out: dict[str, str] = {}
    for i in range(3):
        good.save(folder / f"good{i}.png")
        out[f"good{i}.png"] = "ok"
    buf = io.BytesIO()
    good.save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text_named.jpg").write_text("this is a text file, not a JPEG\n")
    rgba = good.convert("RGBA")
    rgba.putalpha(Image.new("L", (W, H), 0))  # fully transparent: must come out white, not black
    rgba.save(folder / "alpha.png")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((H, W), 40000, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "one_pixel.png")
    _png_header_only(folder / "bomb.png", 20000, 20000)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the upright image is H x W
    good.save(folder / "exif_rotated.jpg", exif=exif)
    good.save(folder / "ünïcödé námé.png")
    good.save(folder / "with space.png")
    good.save(folder / "vanishes.png")  # deleted after the listing, before the read
    out.update({"truncated.jpg": "skip", "zero_bytes.jpg": "skip", "text_named.jpg": "skip", "alpha.png": "ok",
                "cmyk.jpg": "ok", "sixteen_bit.png": "ok", "one_pixel.png": "skip-unlabeled", "bomb.png": "skip",
                "exif_rotated.jpg": "ok", "ünïcödé námé.png": "ok", "with space.png": "ok", "vanishes.png": "skip"})
    return out


# ----------------------------------------------------------------------------------- images
def test_unlabeled_folder_corpus(tmp_path, caplog):
    """Pretraining's and the semi stage's image source: every bad file is skipped once, logged and
    counted with its reason; every good one comes back as upright 8-bit RGB."""
    folder = tmp_path / "unlabeled"
    expected = make_image_corpus(folder)
    (folder / "sub").mkdir()
    shutil.copy(folder / "good0.png", folder / "sub" / "nested.png")
    os.symlink("..", folder / "sub" / "loop")  # a symlink loop: sub/loop -> the folder itself
    with caplog.at_level(logging.WARNING):
        ds = UnlabeledImages(folder, min_side=8)
    names = [p.name for p in ds.paths]
    assert sorted(names) == sorted([*expected, "nested.png"])  # each file once, loop cut
    assert "symlink loop" in caplog.text
    (folder / "vanishes.png").unlink()
    got = {p.name: ds.load(i) for i, p in enumerate(ds.paths)}
    skipped = {Path(k).name: v for k, v in ds.skipped.items()}
    assert set(skipped) == {n for n, e in expected.items() if e.startswith("skip")}
    for name, reason in skipped.items():
        assert name in reason, reason  # the message names the file
    assert "too large" in skipped["bomb.png"] and "file not found" in skipped["vanishes.png"]
    assert "smaller than min_side" in skipped["one_pixel.png"]
    for name, img in got.items():
        if expected.get(name, "ok") == "ok":
            assert img is not None and img.mode == "RGB", name
    assert got["exif_rotated.jpg"].size == (H, W)  # upright
    assert np.asarray(got["alpha.png"]).min() == 255  # transparent -> white
    assert 150 < np.asarray(got["sixteen_bit.png"]).mean() < 160  # 40000/65535 of 255, not clipped to 255
    # Iterating the whole set never raises: the next readable image takes a bad one's place.
    assert all(ds[i] is not None for i in range(len(ds)))
    assert caplog.text.count("skipping unlabeled image") == len(skipped)  # each logged once


def _coco_for(folder: Path, names: list[str]) -> Path:
    images, anns = [], []
    for i, n in enumerate(names, 1):
        w, h = (H, W) if n == "exif_rotated.jpg" else (1, 1) if n == "one_pixel.png" else (W, H)
        images.append({"id": i, "file_name": n, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, min(w, 10), min(h, 10)],
                     "area": 1, "iscrowd": 0})
    p = folder / "labeled.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return p


def test_labeled_set_skips_bad_images_mid_epoch_and_names_them(tmp_path, caplog):
    """Training: a file that cannot be decoded when the epoch reaches it is replaced by the next
    readable one, logged, and named in the substitute's target (the training loop counts it);
    evaluation (bad_images="error") stops with the file's name instead of scoring fewer images."""
    folder = tmp_path / "labeled"
    expected = make_image_corpus(folder)
    ann = _coco_for(folder, sorted(expected))
    ds = CocoDetection(ann, train=True, bad_images="skip")
    strict = CocoDetection(ann, train=False)
    (folder / "vanishes.png").unlink()
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(expected)
    named = {Path(r.split(":")[0]).name for _, t in items for r in t.get("skipped", [])}
    bad = {n for n, e in expected.items() if e == "skip"}
    assert named == bad and {Path(p).name for p in ds.skipped} == bad
    assert all(img.shape[0] == 3 for img, _ in items)
    idx = sorted(expected).index("truncated.jpg")
    with pytest.raises(ImageError, match=r"truncated\.jpg.*cannot decode.*of .*labeled\.json"):
        strict[idx]


def test_finetune_run_survives_a_bad_training_image(synthetic_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_data["root"], root)
    train_json = json.loads((root / "train.json").read_text())
    victim = root / train_json["images"][0]["file_name"]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated after the listing and the JSON
    m = finetune_train(smoke_cfg(root, "eval.plots=false", "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=null"), tmp_path / "run")
    assert m["global_step"] == 6
    assert len(m["skipped_images"]) == 1 and victim.name in m["skipped_images"][0]
    assert m["history"][-1]["skipped_images"] == 1


# ------------------------------------------------------------------------------- COCO JSON
def _base() -> dict:
    return {"images": [{"id": 1, "file_name": "1.png", "width": W, "height": H},
                       {"id": 2, "file_name": "2.png", "width": W, "height": H}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}


def _set(path: list, value: object):  # type: ignore[no-untyped-def]
    def f(d: dict) -> None:
        node = d
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return f


_DELETE = object()

# (case, change, expected): ("error", words in the message) or ("fix", {counter: n}, boxes per image)
COCO_CASES = [
    ("missing images key", _set(["images"], _DELETE), ("error", "no 'images' list")),
    ("missing categories key", _set(["categories"], _DELETE), ("error", "no 'categories' list")),
    ("missing annotations key", _set(["annotations"], _DELETE), ("fix", {}, [0, 0])),
    ("image without file_name", _set(["images", 0, "file_name"], _DELETE), ("error", "without id/file_name")),
    ("annotation without bbox", _set(["annotations", 0, "bbox"], _DELETE), ("fix", {"dropped_malformed": 1}, [0, 1])),
    ("bbox of length 3", _set(["annotations", 0, "bbox"], [1, 2, 3]), ("fix", {"dropped_malformed": 1}, [0, 1])),
    ("bbox with strings", _set(["annotations", 0, "bbox"], ["1", "2", "x", "4"]),
     ("fix", {"dropped_malformed": 1}, [0, 1])),
    ("negative width", _set(["annotations", 0, "bbox"], [5, 5, -3, 10]), ("fix", {"dropped_empty": 1}, [0, 1])),
    ("zero height", _set(["annotations", 0, "bbox"], [5, 5, 10, 0]), ("fix", {"dropped_empty": 1}, [0, 1])),
    ("box outside the image", _set(["annotations", 0, "bbox"], [100, 100, 10, 10]),
     ("fix", {"dropped_outside": 1}, [0, 1])),
    ("box partly outside", _set(["annotations", 0, "bbox"], [50, 40, 30, 30]), ("fix", {"clipped": 1}, [1, 1])),
    ("unknown category id", _set(["annotations", 0, "category_id"], 7),
     ("fix", {"dropped_unknown_category": 1}, [0, 1])),
    ("unknown image id", _set(["annotations", 0, "image_id"], 99), ("fix", {"dropped_unknown_image": 1}, [0, 1])),
    ("duplicate image ids", _set(["images", 1, "id"], 1), ("error", "duplicate image id 1")),
    ("duplicate annotation ids", _set(["annotations", 1, "id"], 1),
     ("fix", {"renumbered_annotation_ids": 1}, [1, 1])),
    ("empty annotation list", _set(["annotations"], []), ("fix", {}, [0, 0])),
    ("category id a string", _set(["categories", 0, "id"], "1"), ("error", "category id '1' is not an integer")),
    ("category id a fraction", _set(["categories", 0, "id"], 1.5), ("error", "category id 1.5 is not an integer")),
    ("image id a string", _set(["images", 0, "id"], "a"), ("error", "image id 'a' is not an integer")),
    ("missing image file", _set(["images", 1, "file_name"], "nope.png"), ("error", "missing.*nope.png.*image_root")),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in COCO_CASES], ids=[c[0] for c in COCO_CASES])
def test_coco_json_corpus(change, expected, tmp_path, caplog):
    for i in (1, 2):
        Image.new("RGB", (W, H)).save(tmp_path / f"{i}.png")
    data = copy.deepcopy(_base())
    change(data)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    if expected[0] == "error":
        with pytest.raises((ValueError, FileNotFoundError), match=expected[1]) as e:
            CocoDetection(path)
        assert str(path) in str(e.value)
        return
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(path)
    assert ds.report.fixes() == expected[1]
    assert [len(ds[i][1]["boxes"]) for i in range(len(ds))] == expected[2]
    for counter in expected[1]:
        assert counter in caplog.text  # logged, not only counted
    if "annotations" not in data:
        assert "no 'annotations' key" in caplog.text


def test_json_size_disagreeing_with_the_file_is_fixed_and_said(tmp_path, caplog):
    Image.new("RGB", (W, H)).save(tmp_path / "1.png")
    data = _base()
    data["images"] = data["images"][:1]
    data["images"][0].update(width=2 * W, height=2 * H)
    (tmp_path / "a.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        _, t = CocoDetection(tmp_path / "a.json")[0]
    assert t["boxes"].tolist() == [[2.5, 2.5, 12.5, 12.5]]  # rescaled by the image's true size
    assert "trusting the image and rescaling" in caplog.text


def test_not_json_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a\.json is not valid JSON"):
        CocoDetection(tmp_path / "a.json")


# ------------------------------------------------------------------------------ VOC and YOLO
def test_voc_corpus(tmp_path, capsys):
    root = tmp_path / "voc"
    _voc(root, {"a": [_voc_obj("x", (5, 5, 20, 20)), _voc_obj("x", (30, 5, 10, 20))],  # 2nd: xmax < xmin
                "b": [_voc_obj("x", (1, 1, 9, 9))]})
    # <size> missing: read from the image file.
    (root / "Annotations" / "b.xml").write_text(f"<annotation><filename>b.jpg</filename>{_voc_obj('x', (1, 1, 9, 9))}"
                                                "</annotation>")
    coco = voc_to_coco(root, tmp_path / "o")["all"]
    assert len(coco["annotations"]) == 2 and {(i["width"], i["height"]) for i in coco["images"]} == {(50, 40)}
    assert "1 boxes with max < min" in capsys.readouterr().out
    (root / "Annotations" / "a.xml").write_text("<annotation><object><name>x</name>")  # malformed
    with pytest.raises(ConversionError, match=r"a\.xml: not valid XML"):
        voc_to_coco(root, tmp_path / "o")


def test_yolo_corpus(tmp_path, capsys):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(root / "images/train/a.jpg")
    (root / "labels/train/a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"      # fine
        "0 0.5 0.5 0.2\n"          # 4 numbers
        "0 0.5 0.5 0.2 0.2 0.1\n"  # 6 numbers
        "3 0.5 0.5 0.2 0.2\n"      # class index out of range (nc=2)
        "1 0.95 0.5 0.2 1.4\n")    # reaches outside [0, 1]
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nnames: [a, b]\n")
    coco = yolo_to_coco(root / "data.yaml", tmp_path / "o")["train"]
    out = capsys.readouterr().out
    assert len(coco["annotations"]) == 2
    assert "wrong number of values (skipped): 2" in out and "unknown class id (skipped): 1" in out
    assert "outside [0, 1] (kept; clipped to the image when loaded): 1" in out


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("overrides, error, words", [
    (("optimizer.lr=-0.1",), ValueError, "optimizer.lr=-0.1 must be > 0"),
    (("data.batch_size=0",), ValueError, "data.batch_size=0 must be >= 1"),
    (("semi=unbiased_teacher", "semi.unsup_weight=-1"), ValueError, "semi.unsup_weight=-1"),
    (("backbone.arch=resnet50", "backbone.norm=gn", "backbone.checkpoint=BACKBONE"), ValueError, "resnet18"),
], ids=["negative lr", "batch 0", "negative unsup weight", "arch/norm mismatch"])
def test_bad_finetune_configs_are_refused_before_training(overrides, error, words, synthetic_data, tmp_path):
    from pretrain.core.backbone.backbone_file import save_backbone_file

    backbone = save_backbone_file(torchvision.models.resnet18().state_dict(), tmp_path / "bb",
                                  {"arch": "resnet18", "norm": "bn", "method": "test"})
    overrides = tuple(o.replace("BACKBONE", str(backbone)) for o in overrides)
    with pytest.raises(error, match=words):
        finetune_train(smoke_cfg(synthetic_data["root"], *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_config_errors_that_hydra_and_the_paths_give(synthetic_data, tmp_path, caplog):
    from hydra.errors import MissingConfigException

    for group in ("semi=foo", "detector=yolo"):
        with pytest.raises(MissingConfigException, match="Available options"):
            smoke_cfg(synthetic_data["root"], group)
    with pytest.raises(MissingConfigException, match="Available options"):
        pretrain_cfg("method=foo")
    with pytest.raises(FileNotFoundError, match="data.root=/nonexistent/data is not a folder"):
        finetune_train(smoke_cfg(Path("/nonexistent/data")), tmp_path)
    # A batch larger than the data: said, then one step per epoch.
    with caplog.at_level(logging.WARNING):
        m = finetune_train(smoke_cfg(synthetic_data["root"], "data.batch_size=64", "trainer.max_epochs=1",
                                     "eval.plots=false"), tmp_path / "big")
    assert "data.batch_size=64 is larger than the 12 training images" in caplog.text and m["global_step"] == 1
