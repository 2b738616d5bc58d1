"""End-to-end fine-tuning runs with ``experiment=smoke``: outputs, metrics, checkpoints, resume, CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import finetune_smoke_cfg
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.checkpoint import load_detection_checkpoint
from finetune.coco_eval import COCO_STATS, evaluate_coco
from finetune.train import train
from pretrain.core.backbone.backbone_file import save_backbone_file

smoke_cfg = finetune_smoke_cfg


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A backbone file from a torchvision resnet18 (supervised-style weights, BN)."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    out = tmp_path_factory.mktemp("backbone")
    return save_backbone_file(sd, out, {"arch": "resnet18", "norm": "bn", "method": "testnet", "epochs": 3,
                                        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


@pytest.fixture(scope="module")
def frcnn_run(synthetic_data, backbone_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("frcnn")
    cfg = smoke_cfg(synthetic_data["root"], f"backbone.checkpoint={backbone_file}", "backbone.arch=auto")
    train(cfg, run_dir=run_dir)
    return run_dir


def test_fasterrcnn_smoke_run_outputs(frcnn_run, synthetic_data, backbone_file):
    for name in ("metrics.json", "predictions.json", "label_map.json", "config.yaml", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt", "logs/metrics.csv", "plots/predictions.png", "plots/loss.png",
                 "plots/lr.png", "plots/val_ap.png"):
        assert (frcnn_run / name).is_file(), name
    m = json.loads((frcnn_run / "metrics.json").read_text())
    assert m["stage"] == "finetune" and m["detector"] == "fasterrcnn"
    assert Path(m["source_ann_file"]) == Path(synthetic_data["val_json"]).resolve()
    assert Path(m["ann_file"]) == frcnn_run / "ground_truth.json"  # what was evaluated
    assert set(m["coco"]) == set(COCO_STATS)
    assert set(m["per_class_ap"]) == set(m["classes"]) and m["num_classes"] == 5
    assert m["confusion"]["classes"] == m["classes"] and m["confusion"]["score"] == 0.5
    assert "What each class was taken for" in (frcnn_run / "report.html").read_text()
    bb = m["backbone"]
    assert bb["checkpoint"] == str(backbone_file) and bb["arch"] == "resnet18" and bb["method"] == "testnet"
    assert bb["epochs"] == 3 and bb["norm"] == "frozen_bn"
    assert [h["epoch"] for h in m["history"]] == [0, 1]
    assert all(h["train_loss"] is not None and h["val_AP"] >= 0 for h in m["history"])
    best = max(m["history"], key=lambda h: h["val_AP"])
    assert m["best_epoch"] == best["epoch"]
    assert json.loads((frcnn_run / "label_map.json").read_text())["num_classes"] == 5


def test_checkpoint_is_plain_and_rebuilds(frcnn_run, backbone_file):
    ckpt = torch.load(frcnn_run / "checkpoints" / "best.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["num_classes"] == 5 and hp["cfg"]["detector"]["name"] == "fasterrcnn"
    assert hp["backbone_info"]["image_mean"] == [0.5, 0.5, 0.5]  # taken from backbone.json
    # Rebuilding needs no backbone file: the weights are in the state dict.
    backbone_file.rename(backbone_file.with_suffix(".moved"))
    try:
        module = load_detection_checkpoint(frcnn_run / "checkpoints" / "best.ckpt")
    finally:
        backbone_file.with_suffix(".moved").rename(backbone_file)
    assert module.model.transform.image_mean == [0.5, 0.5, 0.5]
    for k, v in module.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def test_metrics_equal_pycocotools_on_predictions_file(frcnn_run, synthetic_data):
    m = json.loads((frcnn_run / "metrics.json").read_text())
    preds = json.loads((frcnn_run / "predictions.json").read_text())
    assert preds, "the smoke model should emit detections above 0.05"
    assert {p["category_id"] for p in preds} <= {1, 2, 3, 4, 5}
    coco = COCO(str(synthetic_data["val_json"]))
    ev = COCOeval(coco, coco.loadRes(str(frcnn_run / "predictions.json")), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [m["coco"][k] for k in COCO_STATS] == pytest.approx(list(ev.stats), abs=1e-9)
    # faster-coco-eval gives identical numbers on these real predictions.
    fast = evaluate_coco(synthetic_data["val_json"], preds, backend="faster_coco_eval")
    assert [fast.stats[k] for k in COCO_STATS] == pytest.approx(list(ev.stats), abs=1e-12)


def test_metrics_name_the_ground_truth_they_were_computed_on(frcnn_run, synthetic_data, tmp_path):
    """The loader repairs a file (here: boxes running past the image are clipped). metrics.json names
    the repaired ground truth it wrote, and plain pycocotools on it reproduces every number."""
    from finetune.evaluate import evaluate_module
    from pretrain.core.data.coco import CocoDetection

    raw = json.loads(synthetic_data["val_json"].read_text())
    for a in raw["annotations"][::2]:
        a["bbox"][2] += 60  # past the right border of the 96 px images
    (tmp_path / "val").symlink_to(Path(synthetic_data["root"]) / "val")
    broken = tmp_path / "val_broken.json"
    broken.write_text(json.dumps(raw))
    ds = CocoDetection(broken)
    assert ds.report.fixes()  # the loader clipped them
    module = load_detection_checkpoint(frcnn_run / "checkpoints" / "best.ckpt")
    _, _, m = evaluate_module(module, ds, tmp_path / "eval")
    assert m["source_ann_file"] == str(broken) and m["ann_file"] == str(tmp_path / "eval" / "ground_truth.json")
    coco = COCO(m["ann_file"])
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "eval" / "predictions.json")), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [m["coco"][k] for k in COCO_STATS] == pytest.approx(list(ev.stats), abs=1e-9)
    # What was scored is the repaired file, not the raw one: its boxes end at the image border.
    scored = {a["id"]: a["bbox"] for a in json.loads(Path(m["ann_file"]).read_text())["annotations"]}
    clipped = [a for a in raw["annotations"][::2] if a["bbox"] != scored[a["id"]]]
    assert clipped and all(scored[a["id"]][0] + scored[a["id"]][2] <= 96 for a in clipped)


def test_validation_and_evaluation_score_the_same_predictions(frcnn_run, synthetic_data, tmp_path):
    """The per-epoch val AP and the final evaluation predict through one function (predict_coco):
    the same checkpoint at the same precision gives the same detections and the same numbers."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from finetune.evaluate import evaluate_module
    from finetune.transforms import build_transforms
    from pretrain.core.data.coco import CocoDetection, collate_fn

    module = load_detection_checkpoint(frcnn_run / "checkpoints" / "best.ckpt")
    ds = CocoDetection(synthetic_data["val_json"], transforms=build_transforms(train=False), train=False,
                       label_map=module.label_map)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(ds, batch_size=4, collate_fn=collate_fn), verbose=False)
    validated = module.history[-1]
    result, preds, _ = evaluate_module(module, ds, tmp_path / "eval", batch_size=3)
    assert validated["val_detections"] == len(preds) > 0
    assert [validated[f"val_{k}"] for k in COCO_STATS] == pytest.approx([result.stats[k] for k in COCO_STATS],
                                                                        abs=1e-9)


def test_evaluation_with_test_time_flip_scores_the_teacher_ensemble(frcnn_run, synthetic_data, tmp_path):
    """``--tta flip`` evaluates (and the API predicts) exactly the detections of semi.teacher_flip's teacher
    (the RoI head averaged over the image and its mirror), not the plain model's, and says so."""
    from torch.utils.data import DataLoader

    from finetune.api import Detector
    from finetune.coco_results import detections_to_coco
    from finetune.evaluate import evaluate_module
    from finetune.inference import prepare
    from finetune.semi.soft import teacher_forward
    from finetune.transforms import build_transforms
    from pretrain.core.data.coco import CocoDetection, collate_fn

    module = load_detection_checkpoint(frcnn_run / "checkpoints" / "best.ckpt")
    ds = CocoDetection(synthetic_data["val_json"], transforms=build_transforms(train=False), train=False,
                       label_map=module.label_map)
    _, plain, m_plain = evaluate_module(module, ds, tmp_path / "plain", setup=prepare(module.model, "cpu", "32"))
    _, flipped, m = evaluate_module(module, ds, tmp_path / "flip", setup=prepare(module.model, "cpu", "32", tta="flip"))
    assert m["inference"]["tta"] == "flip" and m_plain["inference"]["tta"] is None
    expected = []
    module.model.eval()
    for images, targets in DataLoader(ds, batch_size=4, collate_fn=collate_fn):
        for t, d in zip(targets, teacher_forward(module.model, images, flip=True).detections):
            expected += detections_to_coco(int(t["image_id"]), d["boxes"], d["scores"], d["labels"],
                                           module.label_map.label_to_cat_id)  # val images are model-sized
    key = lambda p: (p["image_id"], p["category_id"], p["score"])
    assert sorted(flipped, key=key) == sorted(expected, key=key) and flipped != plain
    assert sorted(p["score"] for p in flipped) != sorted(p["score"] for p in plain)
    image = ds[0][0]
    api = Detector(module, device="cpu", precision="32", score=0.0, tta="flip")([image])[0]
    ref = teacher_forward(module.model, [image], flip=True).detections[0]
    assert torch.equal(api.scores, ref["scores"].float()) and torch.allclose(api.boxes, ref["boxes"].float())


def test_resume_continues_global_step(frcnn_run, synthetic_data, backbone_file):
    before = torch.load(frcnn_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    cfg = smoke_cfg(synthetic_data["root"], f"backbone.checkpoint={backbone_file}", "backbone.arch=auto",
                    "trainer.max_epochs=3", "eval.plots=false")
    m = train(cfg, run_dir=frcnn_run)
    after = torch.load(frcnn_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert before == 6 and after == 9  # 3 steps per epoch: one more epoch, not three
    assert m["global_step"] == 9 and [h["epoch"] for h in m["history"]] == [0, 1, 2]


def test_evaluate_and_predict_cli(frcnn_run, synthetic_data, tmp_path):
    from finetune import evaluate, predict

    out = tmp_path / "eval"
    metrics = evaluate.main([str(frcnn_run / "checkpoints" / "best.ckpt"), "--ann", str(synthetic_data["val_json"]),
                             "--out", str(out), "--workers", "0", "--confusion-score", "0"])
    assert (out / "metrics.json").is_file() and (out / "predictions.json").is_file()
    assert metrics["stage"] == "evaluate" and set(metrics["coco"]) == set(COCO_STATS)
    written_metrics = json.loads((out / "metrics.json").read_text())
    # The confusion matrix at score 0 places every detection written and every object evaluated once.
    confusion, gt = written_metrics["confusion"], json.loads((out / "ground_truth.json").read_text())
    matrix, names = confusion["matrix"], {c["id"]: c["name"] for c in gt["categories"]}
    assert confusion["score"] == 0 and confusion["classes"] == [names[i] for i in sorted(names)]
    assert not any(a.get("iscrowd") for a in gt["annotations"])  # so every detection has a cell
    placed = sum(sum(row[:-1]) for row in matrix)
    assert placed == len(json.loads((out / "predictions.json").read_text())) == metrics["num_detections"] > 0
    per_class = {n: sum(a["category_id"] == i and not a.get("iscrowd") for a in gt["annotations"])
                 for i, n in names.items()}
    assert {n: sum(matrix[k]) for k, n in enumerate(confusion["classes"])} == per_class
    assert written_metrics["source_ann_file"] == str(synthetic_data["val_json"])
    assert written_metrics["ann_file"] == str(out / "ground_truth.json")

    images = synthetic_data["root"] / "val"
    results = predict.main([str(frcnn_run / "checkpoints" / "best.ckpt"), str(images), "--out", str(tmp_path / "p"),
                            "--score", "0.05"])
    pngs = sorted((tmp_path / "p").glob("*.png"))
    assert len(pngs) == len(results) == 6
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(written["images"]) == 6
    dets = [d for r in written["images"] for d in r["detections"]]
    assert dets and all(d["score"] >= 0.05 and len(d["bbox"]) == 4 and d["class_name"] for d in dets)
    # --tta flip: recorded, and other scores than the plain model's on the same images.
    predict.main([str(frcnn_run / "checkpoints" / "best.ckpt"), str(images), "--out", str(tmp_path / "t"),
                  "--score", "0.05", "--tta", "flip", "--no-draw"])
    flip = json.loads((tmp_path / "t" / "predictions.json").read_text())
    assert flip["inference"]["tta"] == "flip" and written["inference"]["tta"] is None
    flip_scores = sorted(d["score"] for r in flip["images"] for d in r["detections"])
    assert flip_scores and flip_scores != sorted(d["score"] for d in dets)

    # An unreadable file is reported and skipped, the rest still predicted.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.jpg").write_bytes(b"not an image")
    (mixed / "ok.png").write_bytes((images / "000000.png").read_bytes())
    results = predict.main([str(frcnn_run / "checkpoints" / "best.ckpt"), str(mixed), "--out", str(tmp_path / "q")])
    assert [("error" in r) for r in results] == [True, False]
    assert [p.name for p in (tmp_path / "q").glob("*.png")] == ["ok.png"]


def test_retinanet_smoke_run_with_layerwise_lr(synthetic_data, tmp_path):
    # score_thresh 0.001, the usual setting for mAP: far below the classifier's prior (0.01), so an
    # extra always-negative class would be emitted and had no category id (KeyError before the fix).
    cfg = smoke_cfg(synthetic_data["root"], "detector=retinanet", "eval.plots=false", "trainer.max_epochs=1",
                    "lr_multipliers=3-5-7", "optimizer=adamw", "optimizer.lr=0.001", "detector.score_thresh=0.001")
    m = train(cfg, run_dir=tmp_path)
    assert m["detector"] == "retinanet" and m["backbone"]["checkpoint"] is None
    for name in ("metrics.json", "predictions.json", "label_map.json", "checkpoints/best.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert set(m["coco"]) == set(COCO_STATS)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    real = {c["id"] for c in json.loads(synthetic_data["val_json"].read_text())["categories"]}
    assert len(preds) > 100 and {p["category_id"] for p in preds} <= real
    head = load_detection_checkpoint(tmp_path / "checkpoints" / "best.ckpt").model.head
    num_anchors = head.classification_head.num_anchors
    assert head.classification_head.cls_logits.out_channels == num_anchors * len(real)  # K, not K + 1
    # The per-group learning rates Lightning logged at step 0 follow the 3-5-7 preset.
    import csv

    with open(tmp_path / "logs" / "metrics.csv") as f:
        first = next(r for r in csv.DictReader(f) if r.get("lr-AdamW/head"))
    assert float(first["lr-AdamW/head"]) == pytest.approx(1e-3)
    assert float(first["lr-AdamW/layer3"]) == pytest.approx(1e-5)
    assert float(first["lr-AdamW/layer2"]) == pytest.approx(1e-7)
    # Test-time flip averaging works on the RoI head's outputs: refused, by name, for a one-stage detector.
    from finetune.evaluate import evaluate_module
    from finetune.inference import prepare
    from finetune.transforms import build_transforms
    from pretrain.core.data.coco import CocoDetection

    module = load_detection_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    ds = CocoDetection(synthetic_data["val_json"], transforms=build_transforms(train=False), train=False,
                       label_map=module.label_map)
    with pytest.raises(ValueError, match="tta flip.*no roi_heads.*detector=fasterrcnn"):
        evaluate_module(module, ds, tmp_path / "tta", setup=prepare(module.model, "cpu", "32", tta="flip"))


def test_data_paths_errors(tmp_path):
    from finetune.data.labeled import resolve_data_paths

    with pytest.raises(FileNotFoundError, match="no training annotations"):
        resolve_data_paths({"root": str(tmp_path), "train_json": None, "val_json": None})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_paths({"root": None, "train_json": str(tmp_path / "x.json")})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_annotations.coco.json").write_text("{}")
    (tmp_path / "valid").mkdir()
    (tmp_path / "valid" / "_annotations.coco.json").write_text("{}")
    p = resolve_data_paths({"root": str(tmp_path)})
    assert p.train_json.parent.name == "train" and p.val_json is not None and p.val_json.parent.name == "valid"


@pytest.mark.slow
def test_fasterrcnn_overfits_a_handful_of_images(tmp_path):
    """Trained and validated on the same 4 images, Faster R-CNN from scratch reaches AP50 > 0.9 (~80 steps)."""
    from pretrain.core.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", seed=3, num_train=4, num_val=0, num_unlabeled=0, image_size=96)
    cfg = smoke_cfg(data["root"], f"data.val_json={data['train_json']}", "augment=none", "backbone.norm=bn",
                    "backbone.trainable_layers=5", "trainer.max_epochs=80", "trainer.limit_train_batches=null",
                    "trainer.check_val_every_n_epoch=20", "optimizer=adamw", "optimizer.lr=0.001",
                    "optimizer.weight_decay=0.0001", "scheduler=constant", "trainer.gradient_clip_val=10",
                    "eval.plots=false", "data.batch_size=4")
    m = train(cfg, run_dir=tmp_path / "run")
    assert m["coco"]["AP50"] > 0.9, m["coco"]


@pytest.mark.slow
def test_freeze_backbone_under_two_process_cpu_ddp(synthetic_data, backbone_file, tmp_path):
    """Frozen at build time, before DDP wraps the model: the run completes on 2 CPU processes (gloo)
    and the backbone (weights and BN statistics, norm=bn) leaves it exactly as loaded.

    Slow (20-40 s on 2 cores): almost all of it is two interpreters importing Lightning in turn."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "finetune", "experiment=smoke", f"data.root={synthetic_data['root']}",
           "data.synthetic=null", f"backbone.checkpoint={backbone_file}", "backbone.arch=auto", "backbone.norm=bn",
           "freeze_backbone=true", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           "trainer.max_epochs=1", "eval.plots=false", f"hydra.run.dir={run}"]
    result = subprocess.run(cmd, check=False, cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] >= 1 and set(m["coco"]) == set(COCO_STATS)
    body = load_detection_checkpoint(run / "checkpoints" / "last.ckpt").model.backbone.body.state_dict()
    loaded = load_file(str(backbone_file))
    for k in ("conv1.weight", "layer1.0.bn1.running_mean", "layer4.1.conv2.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(body[k], loaded[k]), k


def test_evaluate_and_predict_record_the_fast_path(frcnn_run, synthetic_data, tmp_path):
    from finetune import evaluate, predict

    ckpt = str(frcnn_run / "checkpoints" / "best.ckpt")
    run = json.loads((frcnn_run / "metrics.json").read_text())
    assert run["inference"]["precision"] == run["precision"]  # the run's final evaluation: its training precision
    metrics = evaluate.main([ckpt, "--ann", str(synthetic_data["val_json"]), "--out", str(tmp_path / "e"),
                             "--workers", "0", "--proposals", "10", "--precision", "32"])
    assert metrics["inference"]["rpn_post_nms_top_n_test"] == 10 and metrics["inference"]["precision"] == "32"
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["inference"]["rpn_pre_nms_top_n_test"] == 10
    predict.main([ckpt, str(synthetic_data["root"] / "val"), "--out", str(tmp_path / "p"), "--no-draw",
                  "--proposals", "5", "--score", "0.0"])
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert written["inference"]["rpn_post_nms_top_n_test"] == 5
    # At most 5 proposals per image reach the box head: at most 5 x classes detections per image.
    assert all(len(r["detections"]) <= 5 * len(written["classes"]) for r in written["images"])


def test_linear_probe_then_fine_tune_holds_the_backbone_for_the_probe(synthetic_data, backbone_file, tmp_path):
    """LP-FT: during the probe steps the pretrained ResNet (weights and BN statistics) stays exactly as
    loaded while the heads train; after them it trains too (the smoke run takes 3 steps)."""
    from finetune.optim import linear_probe_factors

    groups = [{"name": "layer4"}, {"name": "stem.no_decay"}, {"name": "fpn"}, {"name": "head.no_decay"}]
    factors = linear_probe_factors(groups, lambda step: 0.5, probe_steps=3)
    assert [f(2) for f in factors] == [0.0, 0.0, 0.5, 0.5] and [f(3) for f in factors] == [0.5] * 4
    with pytest.raises(ValueError, match="linear_probe_steps"):
        linear_probe_factors(groups, lambda step: 1.0, probe_steps=-1)

    from safetensors.torch import load_file

    loaded = load_file(str(backbone_file))
    args = (f"backbone.checkpoint={backbone_file}", "backbone.arch=auto", "backbone.norm=bn",
            "backbone.trainable_layers=5", "trainer.max_epochs=1", "eval.plots=false", "resume=false")

    def body_and_head(run_dir: Path) -> tuple[dict, dict]:
        sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        body = {k.split("backbone.body.", 1)[1]: v for k, v in sd.items() if ".backbone.body." in k}
        head = {k: v for k, v in sd.items() if ".roi_heads." in k}
        return body, head

    probe = tmp_path / "probe"
    m = train(smoke_cfg(synthetic_data["root"], *args, "linear_probe_steps=100"), run_dir=probe)
    body, head = body_and_head(probe)
    assert m["global_step"] == 3 and set(body) <= set(loaded)
    assert all(torch.equal(body[k], loaded[k]) for k in body if body[k].is_floating_point()), "the probe moved it"
    after = tmp_path / "after"
    train(smoke_cfg(synthetic_data["root"], *args, "linear_probe_steps=1"), run_dir=after)
    body2, head2 = body_and_head(after)
    assert any(not torch.equal(body2[k], loaded[k]) for k in body2 if k.endswith("weight"))  # trained after step 1
    assert any(not torch.equal(body2[k], loaded[k]) for k in body2 if k.endswith("running_mean"))
    assert any(not torch.equal(head[k], head2[k]) for k in head)  # the heads trained in both


def test_bn_recalibration_takes_the_fine_tuning_images_statistics(synthetic_data, backbone_file, tmp_path):
    """backbone.recalibrate_bn: the first BatchNorm's running statistics become exactly those of conv1's
    outputs on the training images at the detector's resolution, frozen layers stay frozen, the affine
    weights do not move; in a run with a frozen backbone the checkpoint keeps the recalibrated ones."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from finetune.bn_recalibrate import recalibrate_bn
    from finetune.detectors import build_detector
    from pretrain.core.backbone.resnet import build_resnet

    torch.manual_seed(0)
    model = build_detector("fasterrcnn", build_resnet("resnet18", "frozen_bn"), "resnet18", 3, trainable_layers=0,
                           min_size=96, max_size=128)
    bn1 = model.backbone.body.bn1
    assert isinstance(bn1, FrozenBatchNorm2d)
    bn1.running_mean.fill_(5.0)
    bn1.running_var.fill_(100.0)
    weight = bn1.weight.clone()
    images = [torch.rand(3, 80, 100), torch.rand(3, 96, 96)]
    assert recalibrate_bn(model, [images, images], num_batches=1) == 1
    x = model.transform(images)[0].tensors
    out = model.backbone.body.conv1(x)
    torch.testing.assert_close(bn1.running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d) and torch.equal(bn1.weight, weight)
    with pytest.raises(ValueError, match=">= 1"):
        recalibrate_bn(model, [images], num_batches=0)

    from safetensors.torch import load_file

    loaded = load_file(str(backbone_file))
    args = (f"backbone.checkpoint={backbone_file}", "backbone.arch=auto", "freeze_backbone=true",
            "trainer.max_epochs=1", "eval.plots=false")
    for n, run in ((0, tmp_path / "kept"), (2, tmp_path / "recalibrated")):
        train(smoke_cfg(synthetic_data["root"], *args, f"backbone.recalibrate_bn={n}"), run_dir=run)
        sd = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        mean = sd["model.backbone.body.bn1.running_mean"]
        assert torch.equal(mean, loaded["bn1.running_mean"]) == (n == 0)
        assert torch.equal(sd["model.backbone.body.bn1.weight"], loaded["bn1.weight"])
