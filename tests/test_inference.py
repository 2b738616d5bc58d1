"""The inference fast path: the test-time proposal budget reaches the box head, and the precision is
the hardware's choice (or the one asked for). That evaluate / predict run with it and record it is
tested in tests/test_finetune_train_run.py, beside its trained run."""

from __future__ import annotations

import pytest
import torch
from test_finetune_model_detectors import _batch, _build

from finetune.inference import add_inference_args, prepare, set_test_budget


def rois_seen(model: torch.nn.Module, images: list[torch.Tensor]) -> list[int]:
    """How many proposals per image the RoI heads receive in eval mode."""
    seen: list[int] = []
    hook = model.roi_heads.register_forward_pre_hook(lambda m, a: seen.extend(len(p) for p in a[1]))
    with torch.no_grad():
        model(images)
    hook.remove()
    return seen


def test_proposal_budget_reaches_the_box_head() -> None:
    torch.manual_seed(0)
    model = _build("fasterrcnn", "frozen_bn", rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=150).eval()
    images, _ = _batch()
    assert max(rois_seen(model, images)) > 20  # the checkpoint's own budget lets many through
    assert set_test_budget(model, proposals=20) == {"rpn_pre_nms_top_n_test": 20, "rpn_post_nms_top_n_test": 20}
    assert max(rois_seen(model, images)) <= 20
    assert set_test_budget(model) == {"rpn_pre_nms_top_n_test": 20, "rpn_post_nms_top_n_test": 20}  # None keeps
    assert set_test_budget(model, proposals=20, pre_nms=100)["rpn_pre_nms_top_n_test"] == 100
    with pytest.raises(ValueError, match="at least 1"):
        set_test_budget(model, proposals=0)


def test_retinanet_budget_is_its_candidates_per_level() -> None:
    model = _build("retinanet", "frozen_bn")
    assert set_test_budget(model, proposals=50) == {"topk_candidates": 50}
    assert model.topk_candidates == 50


def test_precision_is_the_hardware_choice_or_the_one_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain.core.run import precision

    torch.manual_seed(0)
    model = _build("fasterrcnn", "frozen_bn")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: False)
    assert prepare(model, "cpu").precision == "32"  # a CPU without bf16 units: fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: True)
    setup = prepare(model, "cpu", proposals=30)
    assert setup.precision == "bf16-mixed" and setup.proposals["rpn_post_nms_top_n_test"] == 30
    assert not model.training and setup.as_dict()["rpn_post_nms_top_n_test"] == 30
    assert prepare(model, "cpu", "32").precision == "32"  # explicit wins
    with pytest.raises(ValueError, match="inference precision"):
        prepare(model, "cpu", "64")


def test_bf16_forward_returns_fp32_detections_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = _build("fasterrcnn", "frozen_bn", score_thresh=0.0)
    images, _ = _batch(1)
    ref = prepare(model, "cpu", "32")
    with torch.no_grad(), ref.autocast():
        want = model(images)[0]
    fast = prepare(model, "cpu", "bf16-mixed")
    with torch.no_grad(), fast.autocast():
        got = model(images)[0]
    assert got["boxes"].dtype == torch.float32 and got["scores"].dtype == torch.float32
    assert len(got["boxes"]) > 0
    # The top box of fp32 is found again in bf16, within a pixel or two (bf16 keeps ~3 significant digits).
    from torchvision.ops import box_iou

    assert box_iou(want["boxes"][:1], got["boxes"]).max() > 0.9


def test_cli_arguments() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_inference_args(p)
    a = p.parse_args(["--proposals", "100", "--precision", "32"])
    assert (a.proposals, a.pre_nms, a.precision) == (100, None, "32")
    assert p.parse_args([]).precision == "auto"


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
def test_heads_hand_on_fp32_under_bf16_autocast(name: str) -> None:
    """Box decoding and per-class NMS in bf16 snap boxes to a grid and merge classes' offset boxes;
    the heads' outputs are cast to fp32 so that neither happens (finetune.detectors.builders)."""
    torch.manual_seed(0)
    model = _build(name, "frozen_bn", score_thresh=0.0).eval()
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, args: object, out: object) -> None:
        parts = list(out.values()) if isinstance(out, dict) else list(out)  # type: ignore[call-overload]
        for p in parts:
            seen.extend(t.dtype for t in (p if isinstance(p, list) else [p]))

    parts = [model.rpn.head, model.roi_heads.box_predictor] if name == "fasterrcnn" else [model.head]
    for part in parts:  # hooks registered after the cast hook see what the rest of the model gets
        part.register_forward_hook(record)
    images, _ = _batch(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)[0]
    assert seen and set(seen) == {torch.float32}
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    with torch.no_grad():
        ref = model(images)[0]
    # Same boxes up to bf16's rounding in the layers before the heads: the top detection agrees closely.
    from torchvision.ops import box_iou

    assert box_iou(ref["boxes"][:1], out["boxes"]).max() > 0.9
