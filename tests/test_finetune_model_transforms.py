"""Detection transforms keep boxes, labels and per-box fields consistent with the image."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from finetune.transforms import RandomScaleJitter, build_transforms

H, W = 60, 100


def _sample(boxes: list[list[float]] | None = None) -> tuple[tv_tensors.Image, dict]:
    boxes = boxes or [[10.0, 20.0, 30.0, 40.0]]
    n = len(boxes)
    image = tv_tensors.Image(torch.rand(3, H, W))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(H, W)),
        "labels": torch.arange(1, n + 1),
        "image_id": 7,
        "area": torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }
    return image, target


def test_hflip_mirrors_box_and_image() -> None:
    image, target = _sample()
    out_img, out = build_transforms(True, hflip=1.0)(image, target)
    assert out["boxes"].tolist() == [[W - 30.0, 20.0, W - 10.0, 40.0]]
    assert torch.equal(out_img, image.flip(-1))
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes) and out["image_id"] == 7
    assert torch.equal(out["labels"], target["labels"])


def test_vflip_mirrors_box() -> None:
    image, target = _sample()
    out_img, out = build_transforms(True, hflip=0.0, vflip=1.0)(image, target)
    assert out["boxes"].tolist() == [[10.0, H - 40.0, 30.0, H - 20.0]]
    assert torch.equal(out_img, image.flip(-2))


def test_plain_tensor_boxes_are_wrapped_and_follow_the_flip() -> None:
    image, target = _sample()
    target["boxes"] = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    _, out = build_transforms(True, hflip=1.0)(image, target)
    assert out["boxes"].tolist() == [[W - 30.0, 20.0, W - 10.0, 40.0]]


def test_degenerate_boxes_are_sanitized_with_their_fields() -> None:
    image, target = _sample([[10.0, 20.0, 30.0, 40.0], [50.0, 5.0, 50.0, 25.0], [90.0, 10.0, 130.0, 30.0]])
    _, out = build_transforms(True, hflip=0.0)(image, target)
    # The zero-width box goes with its label/area/iscrowd; the one crossing the border is clamped.
    assert out["boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0], [90.0, 10.0, 100.0, 30.0]]
    assert out["labels"].tolist() == [1, 3]
    assert out["area"].shape == out["iscrowd"].shape == (2,)


def test_scale_jitter_zoom_out_keeps_canvas_and_halves_boxes() -> None:
    torch.manual_seed(0)
    image, target = _sample([[20.0, 10.0, 60.0, 50.0]])
    for _ in range(5):
        out_img, out = build_transforms(True, hflip=0.0, scale_jitter=(0.5, 0.5))(image, target)
        assert out_img.shape == (3, H, W)
        x0, y0, x1, y1 = out["boxes"][0].tolist()
        assert (x1 - x0, y1 - y0) == pytest.approx((20.0, 20.0))
        assert 0 <= x0 and x1 <= W and 0 <= y0 and y1 <= H
        assert out["boxes"].canvas_size == (H, W)


def test_scale_jitter_zoom_in_crops_and_sanitizes() -> None:
    image, target = _sample([[0.0, 0.0, 10.0, 10.0], [40.0, 20.0, 60.0, 40.0]])
    sizes = set()
    for _ in range(10):
        out_img, out = build_transforms(True, hflip=0.0, scale_jitter=(2.0, 2.0))(image, target)
        assert out_img.shape == (3, H, W)
        b = out["boxes"]
        assert len(b) == len(out["labels"]) == len(out["area"])
        assert torch.all(b[:, 2:] > b[:, :2]) and torch.all(b[:, 2] <= W) and torch.all(b[:, 3] <= H)
        sizes.update(round(float(w)) for w in b[:, 2] - b[:, 0])
    assert max(sizes) <= 40  # boxes at most doubled


def test_photometric_augmentations_leave_boxes_alone() -> None:
    torch.manual_seed(0)
    image, target = _sample()
    out_img, out = build_transforms(True, hflip=0.0, color_jitter=0.5, noise_std=0.05)(image, target)
    assert torch.equal(out["boxes"], target["boxes"])
    assert out_img.dtype == torch.float32 and out_img.min() >= 0 and out_img.max() <= 1
    assert not torch.equal(out_img, image)


def test_eval_transform_is_identity_and_fixes_dtype() -> None:
    image, target = _sample()
    out_img, out = build_transforms(False)(image, target)
    assert torch.equal(out_img, image) and torch.equal(out["boxes"], target["boxes"])
    uint8 = tv_tensors.Image((image * 255).to(torch.uint8))
    out_img, _ = build_transforms(False)(uint8, target)
    assert out_img.dtype == torch.float32 and out_img.max() <= 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="probability"):
        build_transforms(True, hflip=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        build_transforms(True, noise_std=-0.1)
    with pytest.raises(ValueError, match="0 < min <= max"):
        RandomScaleJitter((2.0, 1.0))


def test_strong_copy_trains_each_labeled_image_twice_with_the_same_boxes() -> None:
    """augment.strong_copy: the step's images are followed by their strong views (changed pixels, same
    size, values in [0, 1]) with the same targets; the same step draws the same views (a resumed run
    repeats them), another step other ones; off, the batch is as it was."""
    from types import SimpleNamespace

    from finetune.module import DetectionModule

    torch.manual_seed(0)
    images = [torch.rand(3, 40, 60), torch.rand(3, 32, 32)]
    targets = [{"boxes": torch.tensor([[1.0, 2, 20, 30]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]

    def copies(step: int, on: bool = True):
        stub = SimpleNamespace(cfg={"augment": {"strong_copy": on}, "seed": 3}, global_step=step, global_rank=0)
        return DetectionModule.with_strong_copies(stub, images, targets)  # type: ignore[arg-type]

    out, tg = copies(5)
    assert len(out) == 4 and out[:2] == images and tg == [*targets, *targets]
    for im, strong in zip(images, out[2:]):
        assert strong.shape == im.shape and not torch.equal(strong, im)
        assert float(strong.min()) >= 0.0 and float(strong.max()) <= 1.0
    again, _ = copies(5)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    other, _ = copies(6)
    assert not all(torch.equal(a, b) for a, b in zip(out[2:], other[2:]))
    plain, tg_plain = copies(5, on=False)
    assert plain == images and tg_plain == targets
