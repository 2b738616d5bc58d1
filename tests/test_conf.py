"""The Hydra presets of both stages compose into what they say, for every option they apply to."""

from __future__ import annotations

import inspect

import pytest
from conftest import compose_config
from omegaconf import OmegaConf
from torchvision.models.detection import FasterRCNN, RetinaNet

from finetune.detectors.builders import OPTIONS
from finetune.module import build_model


def composed(stage: str, *overrides: str) -> dict:
    cfg = compose_config(stage, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@pytest.mark.parametrize("experiment", [[], ["experiment=smoke"], ["experiment=demo"]])
def test_both_stages_read_one_synthetic_set(experiment):
    # conf/shared/synthetic/ is the one source: a pipeline's fine-tuning finds the folder its
    # pretraining generated, with the same settings, instead of regenerating it.
    pre = composed("pretrain", *experiment)["data"]
    fine = composed("finetune", *experiment)["data"]
    assert fine["root"] == pre["synthetic_dir"]
    assert fine["synthetic"] == pre["synthetic"]
    tiny, demo = experiment == ["experiment=smoke"], experiment == ["experiment=demo"]
    assert pre["synthetic_dir"] == ("data/synthetic_smoke" if tiny else "data/synthetic_demo" if demo
                                    else "data/synthetic")
    assert pre["synthetic"]["num_unlabeled"] == (32 if tiny else 1000)
    # The demo's regime: few labeled images, many unlabeled, no small objects at 128 px.
    assert pre["synthetic"]["num_train"] == (8 if tiny else 100 if demo else 300)
    assert pre["synthetic"].get("scales", ["small", "medium", "large"]) == (
        ["medium", "large"] if demo else ["small", "medium", "large"])


def test_backbone_depth_is_one_override_in_both_stages():
    assert composed("pretrain")["backbone"]["arch"] == "resnet18"
    assert composed("finetune")["backbone"]["arch"] == "auto"  # from the checkpoint
    for stage in ("pretrain", "finetune"):
        assert composed(stage, "backbone.arch=resnet50")["backbone"]["arch"] == "resnet50"
        assert composed(stage, "experiment=smoke")["backbone"]["arch"] == "resnet18"


@pytest.mark.parametrize("experiment", ["smoke", "demo"])
@pytest.mark.parametrize("detector", ["fasterrcnn", "retinanet"])
def test_presets_give_each_detector_only_its_own_arguments(experiment, detector):
    # The demo's Faster R-CNN is the CPU-sized one its preset selects (detector=fasterrcnn would be torchvision's).
    choice = "fasterrcnn_cpu" if (experiment, detector) == ("demo", "fasterrcnn") else detector
    cfg = composed("finetune", f"experiment={experiment}", f"detector={choice}")
    assert "smoke_detector_kwargs" not in cfg
    # torchvision's RetinaNet passes unknown arguments to its transform, which drops them silently:
    # a Faster R-CNN setting in a RetinaNet run would look applied and do nothing.
    cls = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet}[detector]
    accepted = set(inspect.signature(cls).parameters) | set(OPTIONS)
    assert set(cfg["detector"]["kwargs"]) <= accepted
    info = {"arch": "resnet18", "image_mean": (0.5, 0.5, 0.5), "image_std": (0.25, 0.25, 0.25)}
    model = build_model(cfg, 3, info)
    if detector == "retinanet":
        assert model.topk_candidates == (200 if experiment == "smoke" else 1000)
    else:
        rpn_test = {"smoke": 100, "demo": 150}[experiment]
        assert model.rpn._post_nms_top_n["testing"] == rpn_test


def test_demo_detector_is_the_narrow_one_and_builds():
    # make demo's CPU-sized Faster R-CNN (conf/finetune/detector/fasterrcnn_cpu.yaml):
    # its 128-channel FPN and 256-wide head must reach the model that build_model makes.
    from finetune.module import build_model

    cfg = composed("finetune", "experiment=demo")
    assert cfg["detector"]["kwargs"]["fpn_channels"] == 128
    info = {"arch": "resnet18", "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    model = build_model(cfg, num_classes=5, backbone_info=info)
    assert model.backbone.out_channels == 128
    assert model.roi_heads.box_head.fc6.in_features == 128 * 7 * 7
    assert model.roi_heads.box_head.fc7.out_features == 256
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
