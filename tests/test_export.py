"""``python -m finetune.export``: ONNX / TorchScript / safetensors files of both detectors, run the way their
users run them (onnxruntime, torch.jit.load, a process without this package) and matched against the
PyTorch model; and the refusals (wrong checkpoint, format, opset, a file that disagrees)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import finetune_smoke_cfg
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from finetune import export
from finetune.api import Detector, load_module
from finetune.export import ExportMismatchError, Tolerance, compare_detections, export_detector, read_metadata
from finetune.train import train

pytest.importorskip("onnxruntime", reason="pip install '.[export]' (onnx, onnxruntime)")

# The smoke run without its plots; RetinaNet's model then scores about 0.01 everywhere
# (its prior), and a threshold under that gives it 100 near-tied detections per image, the hardest case
# for matching two outputs.
SHORT = ("eval.plots=false",)
DETECTORS = {"fasterrcnn": SHORT, "retinanet": (*SHORT, "detector=retinanet", "detector.score_thresh=0.005")}
# RetinaNet's exports run with make test-full; Faster R-CNN's with every make test.
BOTH = ["fasterrcnn", pytest.param("retinanet", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory) -> Callable[[str], Path]:
    """A trained run per detector, made when a test first asks for it."""
    made: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            train(finetune_smoke_cfg(synthetic_data["root"], *DETECTORS[name]), run_dir=made[name])
        return made[name]

    return run


@pytest.fixture(scope="module")
def exported(runs) -> Callable[[str, str], export.ExportResult]:
    """(detector, format) -> the run's export, verified on its validation images; made once."""
    made: dict[tuple[str, str], export.ExportResult] = {}

    def get(name: str, fmt: str) -> export.ExportResult:
        if (name, fmt) not in made:
            made[(name, fmt)] = export_detector(runs(name), fmt)
        return made[(name, fmt)]

    return get


def odd_sized(synthetic_data, tmp_path: Path) -> Path:
    """A validation image resized to a size and aspect the export never saw (the val images are 96 x 96)."""
    src = min((Path(synthetic_data["root"]) / "val").glob("*.png"))
    dst = tmp_path / "odd.png"
    Image.open(src).convert("RGB").resize((151, 83)).save(dst)
    return dst


@pytest.mark.parametrize("name", BOTH)
def test_onnx_matches_pytorch_on_the_validation_images_and_other_sizes(name, exported, runs, synthetic_data, tmp_path):
    import onnxruntime as ort

    result = exported(name, "onnx")
    c = result.comparison
    assert c.ok and len(c.images) == 12 and c.compared >= 12  # 6 val images at two sizes, all with detections
    assert c.max_box_px <= Tolerance().box_px and c.max_score <= Tolerance().score
    assert result.path == runs(name) / "export" / f"{name}-student.onnx"
    saved = json.loads(Path(str(result.path) + ".verification.json").read_text())
    assert saved["ok"] and saved["tolerance"] == {"box_px": 0.5, "score": 0.001}
    # Dynamic height and width: an image of another size and aspect gives the PyTorch model's boxes,
    # in that image's own pixels.
    image = TF.to_dtype(TF.pil_to_tensor(Image.open(odd_sized(synthetic_data, tmp_path))), torch.float32, scale=True)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    module = load_module(runs(name))
    with torch.no_grad():
        ref = module.model.eval()([image])[0]
    got = {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores), "labels": torch.from_numpy(labels)}
    meta = read_metadata(result.path)
    one = compare_detections("odd", ref, got, meta["postprocessing"]["score_thresh"],
                             meta["postprocessing"]["detections_per_img"], Tolerance())
    assert one.ok(Tolerance()) and one.matched > 0
    assert boxes[:, 2].max() <= 151 + 1e-3 and boxes[:, 3].max() <= 83 + 1e-3 and boxes[:, 2].max() > 96


@pytest.mark.parametrize("name", BOTH)
def test_torchscript_takes_a_batch_of_any_sizes(name, exported, runs, synthetic_data, tmp_path):
    result = exported(name, "torchscript")
    assert result.comparison.ok and result.comparison.max_box_px == 0.0  # the same kernels: identical
    scripted = torch.jit.load(str(result.path))
    val = sorted((Path(synthetic_data["root"]) / "val").glob("*.png"))[1]
    images = [TF.to_dtype(TF.pil_to_tensor(Image.open(p).convert("RGB")), torch.float32, scale=True)
              for p in (val, odd_sized(synthetic_data, tmp_path))]
    module = load_module(runs(name))
    with torch.no_grad():
        want = module.model.eval()(images)
        got = scripted(images)
    assert len(got) == 2
    for w, g in zip(want, got):
        assert len(g["boxes"]) > 0 and torch.equal(w["labels"], g["labels"])  # RetinaNet's 1..K labels kept
        torch.testing.assert_close(g["boxes"], w["boxes"])
        torch.testing.assert_close(g["scores"], w["scores"])


def test_metadata_carries_the_label_map_and_what_the_model_does_inside(exported, runs):
    lm = json.loads((runs("fasterrcnn") / "label_map.json").read_text())
    for fmt in ("onnx", "torchscript"):
        meta = read_metadata(exported("fasterrcnn", fmt).path)
        assert [(c["label"], c["category_id"], c["name"]) for c in meta["classes"]] == \
            [(c["label"], c["category_id"], c["name"]) for c in lm["classes"]]
        assert meta["preprocessing"]["resize"] == {"min_size": [96], "max_size": 128}
        assert len(meta["preprocessing"]["normalize"]["mean"]) == 3
        post = meta["postprocessing"]
        assert post["score_thresh"] == 0.05 and post["detections_per_img"] == 100
        assert post["test_budget"] == {"rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}
        assert meta["detector"] == "fasterrcnn" and meta["weights"] == "student"
    assert read_metadata(exported("fasterrcnn", "onnx").path)["opset"] == 17


def test_exported_files_run_in_a_process_without_this_package(exported, runs, synthetic_data):
    """What a user's service does: onnxruntime (numpy + PIL) and torch.jit.load (torch + torchvision), with
    pretrain and finetune made unimportable, then the detections compared with the PyTorch model's here."""
    image = sorted((Path(synthetic_data["root"]) / "val").glob("*.png"))[2]
    script = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pretrain", "finetune"):
            raise ImportError(f"{name} must not be needed")
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
from PIL import Image
onnx_file, ts_file, image_file = sys.argv[1:]
session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["fewlabel_detector"])
names = {c["label"]: c["name"] for c in meta["classes"]}
x = np.asarray(Image.open(image_file).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
boxes, scores, labels = session.run(None, {"image": x})
import torch, torchvision
extra = {"fewlabel_detector.json": ""}
model = torch.jit.load(ts_file, _extra_files=extra)
with torch.no_grad():
    det = model([torch.from_numpy(x)])[0]
print(json.dumps({"onnx": [boxes.tolist(), scores.tolist(), labels.tolist()],
                  "ts": [det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()],
                  "names": [names[int(k)] for k in labels],
                  "ts_classes": json.loads(extra["fewlabel_detector.json"])["classes"],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("pretrain", "finetune"))}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, str(exported("fasterrcnn", "onnx").path),
                          str(exported("fasterrcnn", "torchscript").path), str(image)],
                         capture_output=True, text=True, env=env, cwd="/", timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    want = Detector.load(runs("fasterrcnn"), precision="32", score=0.0)(image)[0]
    assert len(want) > 0
    for key in ("onnx", "ts"):
        boxes, scores, labels = (torch.tensor(v) for v in got[key])
        assert labels.tolist() == want.labels.tolist()
        torch.testing.assert_close(boxes, want.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(scores, want.scores, atol=1e-5, rtol=0)
    assert got["names"] == want.names and len(got["ts_classes"]) == 5


@pytest.mark.slow
def test_safetensors_export_reloads_as_the_same_detector(runs, synthetic_data, tmp_path):
    result = export_detector(runs("fasterrcnn"), "safetensors", out=tmp_path / "det.safetensors", proposals=50)
    assert result.comparison.ok and result.comparison.max_box_px == 0.0
    from safetensors import safe_open

    with safe_open(str(result.path), framework="pt") as f:  # plain tensors, torchvision's key names
        assert "backbone.body.conv1.weight" in f.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
    reloaded = Detector.load(result.path, precision="32", score=0.0)
    assert reloaded.setup.proposals["rpn_post_nms_top_n_test"] == 50  # the budget it was exported at
    original = Detector.load(runs("fasterrcnn"), precision="32", score=0.0, proposals=50)
    val = Path(synthetic_data["root"]) / "val"
    for a, b in zip(reloaded(val), original(val)):
        assert torch.equal(a.boxes, b.boxes) and a.names == b.names


def test_cli_prints_the_comparison(runs, tmp_path, capsys):
    assert export.main([str(runs("fasterrcnn") / "checkpoints" / "best.ckpt"), "--format", "safetensors",
                        "--out", str(tmp_path / "m.safetensors"), "--num-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "safetensors MATCHES the PyTorch model on 4 images" in out and "000000.png" in out


def test_a_file_that_disagrees_is_rejected_naming_the_image(runs, tmp_path, monkeypatch):
    real = export.exported_runner

    def shifted(path, fmt):
        run = real(path, fmt)

        def off(image):
            d = run(image)
            return {**d, "boxes": d["boxes"] + 2.0}  # two pixels: what a wrong resize would do
        return off

    monkeypatch.setattr(export, "exported_runner", shifted)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ExportMismatchError, match=r"disagrees .*000000.png: a box 2 px off"):
        export_detector(runs("fasterrcnn"), "safetensors", out=out, num_images=2)
    assert not out.exists() and (tmp_path / "bad.safetensors.rejected").is_file()
    assert not json.loads((tmp_path / "bad.safetensors.verification.json").read_text())["ok"]


def test_a_model_that_detects_nothing_cannot_be_verified(runs, tmp_path, monkeypatch):
    module = load_module(runs("fasterrcnn"))
    module.model.roi_heads.score_thresh = 1.01  # nothing passes
    monkeypatch.setattr(export, "load_module", lambda *a: module)
    with pytest.raises(ExportMismatchError, match="could not be verified.*detects nothing"):
        export_detector(runs("fasterrcnn"), "safetensors", out=tmp_path / "x.safetensors", num_images=2)


def test_refusals_name_what_and_why(runs, tmp_path, capsys):
    run = runs("fasterrcnn")
    with pytest.raises(ValueError, match="unsupported export format 'tflite'; choose one of onnx, torchscript"):
        export_detector(run, "tflite")
    with pytest.raises(ValueError, match="opset 9 is not supported.*from opset 11"):
        export_detector(run, "onnx", opset=9)
    with pytest.raises(ValueError, match="opset 30 is not supported"):
        export_detector(run, "onnx", opset=30)
    # A pretraining checkpoint (hyper_parameters['config'], no label map) is not a detector.
    pre = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)},
                "hyper_parameters": {"config": {"method": {"name": "swav"}}}}, pre)
    with pytest.raises(ValueError, match="not a fine-tuning checkpoint"):
        export_detector(pre, "onnx")
    # A backbone file is a safetensors file, but not a detector.
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(ValueError, match="not a detector written by .*finetune.export"):
        export_detector(tmp_path / "backbone.safetensors", "onnx")
    with pytest.raises(ValueError, match="no 'teacher' weights"):
        export_detector(run, "onnx", weights="teacher")
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/best.ckpt"):
        export_detector(tmp_path, "onnx")
    # The command line says the same, with a non-zero status and no traceback.
    assert export.main([str(run), "--format", "tflite"]) == 1
    assert "error: unsupported export format 'tflite'" in capsys.readouterr().err



@pytest.mark.slow  # a fresh interpreter per mode
def test_inference_benchmark_times_the_exported_files(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_infer

    bench_infer.main(["--images", "2", "--repeats", "1", "--min-size", "96", "--classes", "3",
                      "--modes", "ours_fp32_p100", "onnx_p100", "torchscript_p100", "--json", str(tmp_path / "i.json")])
    rows = json.loads((tmp_path / "i.json").read_text())["rows"]
    for mode in ("onnx_p100", "torchscript_p100"):
        assert rows[mode]["images_per_s"] > 0 and rows[mode]["rpn_post_nms_top_n_test"] == 100
        assert rows[mode]["file_mb"] > 1 and rows[mode]["precision"].startswith("32")
