"""finetune.api.Detector used as a user would: the README's example as written, every kind of image input,
boxes in the image's own pixels with the original category ids and names, the same detections as
``finetune.predict``, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, finetune_smoke_cfg
from PIL import Image

from finetune.api import Detections, Detector
from finetune.train import train
from pretrain.core.data.images import ImageError


@pytest.fixture(scope="module")
def run_dir(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api_run")
    train(finetune_smoke_cfg(synthetic_data["root"], "eval.plots=false"), run_dir=out)
    return out


@pytest.fixture(scope="module")
def detector(run_dir) -> Detector:
    # fp32 so that the comparisons below are exact; score 0 keeps everything the model emits.
    return Detector.load(run_dir, precision="32", score=0.0)


def val_images(synthetic_data) -> list[Path]:
    return sorted((Path(synthetic_data["root"]) / "val").glob("*.png"))


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert block, "README.md lost its API example"
    return block.group(1)


def test_readme_example_runs_as_written(run_dir, synthetic_data, tmp_path, monkeypatch):
    """In a folder laid out as after `python -m finetune experiment=smoke hydra.run.dir=outputs/smoke`."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "smoke").symlink_to(run_dir)
    (tmp_path / "data" / "synthetic_smoke").mkdir(parents=True)
    (tmp_path / "data" / "synthetic_smoke" / "val").symlink_to(Path(synthetic_data["root"]) / "val")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})  # noqa: S102 (the documentation's own code)
    lines = out.getvalue().splitlines()
    names = {c["name"] for c in json.loads((run_dir / "label_map.json").read_text())["classes"]}
    assert lines, "the example printed no detection"
    for line in lines:
        source, name, score, *_ = line.split(" ", 3)
        assert Path(source).parent.name == "val" and name in names and float(score) >= 0.2


def test_every_kind_of_image_gives_the_same_detections(detector, synthetic_data):
    path = val_images(synthetic_data)[0]
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    forms = [path, str(path), pil, array, tensor, tensor.float() / 255, tensor[None].float() / 255]
    results = [detector(f)[0] for f in forms]
    assert len(results[0]) > 0
    for r in results[1:]:
        torch.testing.assert_close(r.boxes, results[0].boxes)
        assert r.names == results[0].names
    folder = detector(path.parent)  # a folder: every image in path order
    assert [Path(d.source).name for d in folder] == [p.name for p in val_images(synthetic_data)]
    mixed = detector([pil, path.parent, tensor])
    assert [d.source for d in mixed][:1] == ["#0"] and mixed[-1].source == "#1" and len(mixed) == 2 + len(folder)


def test_boxes_are_in_the_images_own_pixels_with_category_ids_and_names(detector, run_dir, synthetic_data):
    path = val_images(synthetic_data)[1]
    small = Image.open(path).convert("RGB")
    big = small.resize((small.width * 2, small.height * 2), Image.NEAREST)
    a, b = detector([small, big])
    assert (b.width, b.height) == (2 * a.width, 2 * a.height)
    # The detector resizes both to the same network input; the boxes come back in each image's frame.
    torch.testing.assert_close(b.boxes, 2 * a.boxes, atol=1e-2, rtol=0)
    classes = {c["label"]: c for c in json.loads((run_dir / "label_map.json").read_text())["classes"]}
    assert detector.classes == [classes[k] | {"label": k} for k in sorted(classes)]
    for label, cat, name in zip(a.labels.tolist(), a.category_ids, a.names):
        assert classes[label]["category_id"] == cat and classes[label]["name"] == name
    d = a.as_dicts()[0]
    x1, y1, x2, y2 = a.boxes[0].tolist()
    assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1]) and d["class_name"] == a.names[0]
    assert a.to_coco(7)[0]["image_id"] == 7


def test_the_same_detections_as_finetune_predict(detector, run_dir, synthetic_data):
    from finetune.checkpoint import load_detection_checkpoint
    from finetune.inference import prepare
    from finetune.predict import predict_images

    module = load_detection_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    paths = val_images(synthetic_data)[:3]
    cli = predict_images(module, paths, None, score=0.3, setup=prepare(module.model, "cpu", "32"))
    ours = Detector.load(run_dir, precision="32", score=0.3)(paths)
    for entry, det in zip(cli, ours):
        assert [d["bbox"] for d in entry["detections"]] == [[round(v, 2) for v in b["bbox"]] for b in det.as_dicts()]
        assert [d["category_id"] for d in entry["detections"]] == det.category_ids


def test_fast_path_settings_are_the_inference_modules(run_dir):
    fast = Detector.load(run_dir, proposals=20, score=0.5)
    assert fast.setup.proposals == {"rpn_pre_nms_top_n_test": 20, "rpn_post_nms_top_n_test": 20}
    assert fast.setup.precision in ("32", "bf16-mixed")  # auto: what the hardware computes natively
    assert fast.module.deployed_weights == "student"
    # Only confident detections, and no more than the budget's.
    out = fast(torch.rand(3, 96, 96))[0]
    assert isinstance(out, Detections) and (out.scores >= 0.5).all()


def test_bad_input_is_named(detector, run_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        detector(bad)
    skipped = detector([bad, torch.rand(3, 64, 64)], errors="skip")
    assert skipped[0].error and len(skipped[0]) == 0 and skipped[1].error is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detector(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"\(3, H, W\) RGB"):
        detector(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        detector(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="cannot read an image from int"):
        detector([3])
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        Detector.load(tmp_path)
    with pytest.raises(ValueError, match="no 'teacher' weights"):
        Detector.load(run_dir, weights="teacher")
    with pytest.raises(ValueError, match="score must be in"):
        Detector.load(run_dir, score=2.0)
