"""The semi stage's parts on real tensors: thresholds (fixed, GMM), focal RoI loss, views, health, CSD."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import clip_boxes_to_image

from finetune.detectors import build_detector
from finetune.semi.consistency import (
    ConsistencyLoss,
    consistency_terms,
    js_divergence_bernoulli,
    mirror_index,
    rampup_weight,
)
from finetune.semi.focal import FocalRoIHeads, soft_cross_entropy, softmax_focal_loss, use_focal_roi_heads
from finetune.semi.health import LossWatch, PseudoLabelHealth
from finetune.semi.soft import (
    background_probability,
    class_probabilities,
    head_outputs,
    soft_background,
    soft_classes,
    teacher_forward,
    to_frame,
    transform_and_features,
)
from finetune.semi.thresholds import (
    FixedThreshold,
    GMMThreshold,
    build_threshold,
    fit_gmm_1d,
    gmm_threshold,
    limit_per_image,
    max_pseudo_per_image,
    score_mass_k,
)
from finetune.semi.views import IDENTITY, flip_boxes, map_boxes, scale_view, strong_augment, unmap_boxes, weak_view
from finetune.transforms import RandomScaleJitter
from pretrain.core.backbone.resnet import build_resnet


def det(scores, labels, boxes=None):
    n = len(scores)
    b = torch.tensor(boxes, dtype=torch.float32) if boxes is not None else torch.tensor([[0., 0, 10, 10]] * n)
    return {"boxes": b.reshape(-1, 4), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------- thresholds
def test_em_recovers_a_known_mixture():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.2 + 0.05 * torch.randn(700, generator=g), 0.8 + 0.05 * torch.randn(300, generator=g)])
    w, mu, var = fit_gmm_1d(x)
    order = mu.argsort()
    torch.testing.assert_close(mu[order].float(), torch.tensor([0.2, 0.8]), atol=0.01, rtol=0)
    torch.testing.assert_close(w[order].float(), torch.tensor([0.7, 0.3]), atol=0.03, rtol=0)
    torch.testing.assert_close(var[order].sqrt().float(), torch.tensor([0.05, 0.05]), atol=0.01, rtol=0)


def test_gmm_threshold_lies_between_the_modes_and_follows_them():
    g = torch.Generator().manual_seed(1)
    low, high = 0.15 + 0.05 * torch.randn(80, generator=g), 0.85 + 0.05 * torch.randn(20, generator=g)
    t = gmm_threshold(torch.cat([low, high]))
    assert 0.3 < t < 0.95 and t >= high.min() - 1e-6
    moved = gmm_threshold(torch.cat([low, high - 0.3]))
    assert moved < t - 0.2


def test_gmm_threshold_falls_back_to_a_fixed_score_not_to_keeping_everything():
    # Fewer than 4 scores, identical scores: no fit, the fallback (not 0, which kept every detection).
    assert gmm_threshold(torch.tensor([0.1, 0.9, 0.5])) == 0.5
    assert gmm_threshold(torch.tensor([0.1, 0.9, 0.5]), fallback=0.3) == 0.3
    assert gmm_threshold(torch.full((10,), 0.4)) == 0.5
    th = GMMThreshold(num_classes=2)
    assert th.thresholds().tolist() == [0.5, 0.5]  # before any score
    th.update([det([0.9, 0.3], [1, 1])])  # k = int(1.2 + 0.5) + 1 = 2: both queued, 2 < 4
    assert th.queue_lengths() == [2, 0] and th.thresholds().tolist() == [0.5, 0.5]
    assert th.filter([det([0.9, 0.3], [1, 1])])[0]["scores"].tolist() == pytest.approx([0.9])
    low = build_threshold("gmm", 2, gmm_fallback=0.2)
    low.update([det([0.9, 0.3], [1, 1])])
    assert low.filter([det([0.9, 0.3], [1, 1])])[0]["scores"].tolist() == pytest.approx([0.9, 0.3])
    with pytest.raises(ValueError, match="gmm_fallback"):
        GMMThreshold(2, fallback=1.5)


def _em_step_by_hand(x: list[float], var0: float) -> tuple[list[float], list[float], list[float]]:
    """One EM step of a two-component 1-D mixture from means (min, max), weights 1/2, variances var0."""
    mu0 = [min(x), max(x)]
    resp = []
    for xi in x:
        p = [0.5 * math.exp(-0.5 * (xi - m) ** 2 / var0) / math.sqrt(2 * math.pi * var0) for m in mu0]
        resp.append([v / sum(p) for v in p])
    nk = [sum(r[j] for r in resp) for j in (0, 1)]
    mu = [sum(r[j] * xi for r, xi in zip(resp, x)) / nk[j] for j in (0, 1)]
    var = [sum(r[j] * (xi - mu[j]) ** 2 for r, xi in zip(resp, x)) / nk[j] + 1e-6 for j in (0, 1)]
    return [n / len(x) for n in nk], mu, var


def test_gmm_variances_start_at_one():
    x = [0.1, 0.15, 0.2, 0.5, 0.8, 0.9]
    w, mu, var = fit_gmm_1d(torch.tensor(x), iters=1)
    ew, emu, evar = _em_step_by_hand(x, 1.0)  # Consistent Teacher's precisions_init of 1
    torch.testing.assert_close(w, torch.tensor(ew, dtype=torch.float64))
    torch.testing.assert_close(mu, torch.tensor(emu, dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor(evar, dtype=torch.float64))
    # A start at the data's variance (the former one) gives another first step: the test tells them apart.
    _, mu_data, _ = _em_step_by_hand(x, float(torch.tensor(x).var(unbiased=False)))
    assert abs(mu_data[0] - emu[0]) > 1e-3


def test_gmm_fifo_topk_and_per_class_filter():
    th = GMMThreshold(num_classes=2, queue_size=100)
    # Class-agnostic per image: k = int(1.95 + 0.5) + 1 = 3, all three of class 1 (a per-class top-k
    # would queue 2 of class 1 and 1 of class 2; without the + 0.5, k would be 2).
    th.update([det([0.9, 0.7, 0.2, 0.1, 0.05], [1, 1, 1, 2, 2])])
    assert th.queue_lengths() == [3, 0]
    assert sorted(th.queues[0]) == pytest.approx([0.2, 0.7, 0.9])
    assert [score_mass_k(torch.tensor(v)) for v in ([0.9, 0.8, 0.1], [0.4], [0.1, 0.1], [])] == [3, 1, 1, 0]
    for _ in range(40):
        th.update([det([0.9, 0.8, 0.1], [1, 1, 1])])
    assert th.queue_lengths()[0] == 100  # FIFO keeps the last 100
    th._thr = torch.tensor([0.5, 0.95])
    out = th.filter([det([0.6, 0.4, 0.9], [1, 1, 2]), det([], [])])
    assert out[0]["scores"].tolist() == pytest.approx([0.6]) and out[0]["labels"].tolist() == [1]
    assert out[1]["boxes"].shape == (0, 4) and out[1]["labels"].dtype == torch.int64
    state = roundtrip(th.state_dict())
    again = GMMThreshold(2)
    again.load_state_dict(state)
    assert torch.equal(again.thresholds(), th.thresholds()) and again.queue_lengths() == th.queue_lengths()


def test_gmm_topk_bounds_the_kept_pseudo_labels():
    th = GMMThreshold(num_classes=2)
    th._thr = torch.zeros(2)  # every class threshold passes: only the per-image top-k bounds
    image = det([0.05, 0.9, 0.1, 0.7, 0.2], [2, 1, 2, 1, 1])  # sum 1.95: k = 3
    kept = th.filter([image])[0]
    assert sorted(kept["scores"].tolist()) == pytest.approx([0.2, 0.7, 0.9])
    assert kept["labels"].tolist() == [1, 1, 1] and kept["boxes"].shape == (3, 4)
    assert len(FixedThreshold(2, 0.0).filter([image])[0]["scores"]) == 5  # a fixed threshold has no top-k


def test_pseudo_nms_is_class_agnostic_and_the_cap_keeps_the_highest():
    # One object under two labels (colour twins), a second object, and a weak near-duplicate of it.
    image = det([0.8, 0.9, 0.3, 0.6], [2, 1, 1, 2],
                [[10, 10, 50, 50], [11, 10, 51, 50], [70, 70, 90, 90], [71, 71, 90, 90]])
    out = limit_per_image(image, nms_iou=0.5)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6]) and out["labels"].tolist() == [1, 2]
    assert out["boxes"].tolist() == [[11, 10, 51, 50], [71, 71, 90, 90]]
    assert limit_per_image(image, max_per_image=2)["scores"].tolist() == pytest.approx([0.9, 0.8])
    assert limit_per_image(image, nms_iou=0.99, max_per_image=3)["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert limit_per_image(image) is image
    # Through the thresholds, after the score test.
    th = FixedThreshold(2, 0.5, nms_iou=0.5, max_per_image=1)
    out = th.filter([image, det([], [])])
    assert out[0]["scores"].tolist() == pytest.approx([0.9]) and out[1]["boxes"].shape == (0, 4)
    gmm = build_threshold("gmm", 2, nms_iou=0.5)
    gmm._thr = torch.zeros(2)
    assert gmm.filter([image])[0]["labels"].tolist() == [1, 2]  # top-k 4 of 4 (sum 2.6), then NMS
    with pytest.raises(ValueError, match="pseudo_nms_iou"):
        FixedThreshold(2, 0.5, nms_iou=0.0)


def test_max_pseudo_per_image_auto_follows_the_labeled_set():
    assert max_pseudo_per_image("auto", 1.0, 2.3) == 3
    assert max_pseudo_per_image("auto", 1.0, 2.0) == 2
    assert max_pseudo_per_image("auto", 0.5, 2.3) == 2
    assert max_pseudo_per_image("auto", 1.0, 0.2) == 1  # never 0: an image keeps its best box
    assert max_pseudo_per_image(5) == 5 and max_pseudo_per_image(None) is None
    for bad in (0, -1, "many", True, 2.5):
        with pytest.raises(ValueError, match="max_pseudo_per_image"):
            max_pseudo_per_image(bad, 1.0, 2.0)
    with pytest.raises(ValueError, match="boxes per image"):
        max_pseudo_per_image("auto", 1.0, None)


def test_labeled_max_keeps_a_crowded_image_that_the_mean_cap_cuts():
    """A labeled set of 2 to 8 boxes per image (mean 4): an unlabeled image holding 8 confident objects
    keeps 4 of them under ``auto`` (the rest would train as background) and all 8 under ``labeled_max``."""
    from finetune.semi.thresholds import pseudo_label_filter

    assert max_pseudo_per_image("labeled_max", 1.0, 4.0, 8) == 8
    assert max_pseudo_per_image("labeled_max", 0.5, 4.0, 7) == 4
    with pytest.raises(ValueError, match="most boxes on one image"):
        max_pseudo_per_image("labeled_max", 1.0, 4.0, None)
    crowded = det([0.95 - 0.01 * i for i in range(8)], [1] * 8, [[20.0 * i, 0, 20 * i + 15, 15] for i in range(8)])
    settings = {"threshold": 0.5, "max_pseudo_per_image": "auto", "pseudo_nms_iou": 0.6}
    assert len(pseudo_label_filter(settings, 2, 4.0, 8).filter([crowded])[0]["boxes"]) == 4
    settings["max_pseudo_per_image"] = "labeled_max"
    assert len(pseudo_label_filter(settings, 2, 4.0, 8).filter([crowded])[0]["boxes"]) == 8
    assert pseudo_label_filter(settings, 2, 4.0, None).max_per_image is None  # a module that does not train


def test_set_thresholds_replaces_the_per_class_scores():
    """How semi.rpn_threshold follows a GMM: the RPN filter's scores become min(rpn, each class's)."""
    th = FixedThreshold(3, 0.3)
    th.set_thresholds(torch.tensor([0.6, 0.2, 0.45]).clamp(max=0.3))
    assert th.thresholds().tolist() == pytest.approx([0.3, 0.2, 0.3])
    kept = th.filter([det([0.25, 0.25, 0.35], [1, 2, 3])])[0]
    assert kept["labels"].tolist() == [2, 3]
    for bad in (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 1.5, 0.5])):
        with pytest.raises(ValueError, match="thresholds"):
            th.set_thresholds(bad)


def test_fixed_threshold_and_builder():
    th = build_threshold(0.7, 3)
    assert isinstance(th, FixedThreshold) and th.thresholds().tolist() == pytest.approx([0.7] * 3)
    assert isinstance(build_threshold("gmm", 3), GMMThreshold)
    with pytest.raises(ValueError, match="gmm"):
        build_threshold("median", 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_threshold(1.5, 3)


# ------------------------------------------------------------------------------------ focal
def test_softmax_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 3.0, 0.0, 1.0]])
    labels = torch.tensor([0, 3, 1])
    p = logits.softmax(1)[torch.arange(3), labels]
    expect = ((1 - p) ** 1.5 * -p.log()).mean()
    torch.testing.assert_close(softmax_focal_loss(logits, labels, 1.5), expect)
    torch.testing.assert_close(softmax_focal_loss(logits, labels, 0.0), F.cross_entropy(logits, labels))
    assert softmax_focal_loss(logits, labels, 1.5) < F.cross_entropy(logits, labels)


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 3.0, 0.0, 1.0]])
    labels = torch.tensor([0, 3, 1])
    # A one-hot target is torchvision's cross-entropy.
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    q = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.1, 0.9]])
    torch.testing.assert_close(soft_cross_entropy(logits, q), -(q * logits.log_softmax(1)).sum(1).mean())
    # Its optimum is the target itself: the gradient vanishes at p = q and pulls toward q elsewhere.
    q = torch.tensor([[0.9, 0.1], [0.97, 0.03]])
    at_q = q.log().requires_grad_(True)
    soft_cross_entropy(at_q, q).backward()
    assert float(at_q.grad.abs().max()) < 1e-6
    flat = torch.zeros(2, 2, requires_grad=True)  # p = (0.5, 0.5): the background logit must rise
    soft_cross_entropy(flat, q).backward()
    assert bool((flat.grad[:, 0] < 0).all())
    empty = torch.zeros(0, 4, requires_grad=True)
    assert float(soft_cross_entropy(empty, torch.zeros(0, 4)).detach()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(logits, torch.zeros(3, 3))


def tiny_frcnn(k=3):
    torch.manual_seed(0)
    return build_detector("fasterrcnn", build_resnet("resnet18", "bn"), "resnet18", k, min_size=64, max_size=64,
                          trainable_layers=5, representation_size=64)


def test_focal_roi_heads_replace_the_stock_loss(monkeypatch):
    model = tiny_frcnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_focal_roi_heads(model, 1.5)
    assert isinstance(model.roi_heads, FocalRoIHeads)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    captured = {}
    sampler = model.roi_heads.select_training_samples

    def grab_samples(*a, **kw):
        out = sampler(*a, **kw)
        captured["labels"] = torch.cat(out[2])
        return out

    monkeypatch.setattr(model.roi_heads, "select_training_samples", grab_samples)
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o[0]))
    import torchvision.models.detection.roi_heads as rh

    def stock(*a, **kw):
        raise AssertionError("torchvision's fastrcnn_loss must not be called")

    monkeypatch.setattr(rh, "fastrcnn_loss", stock)
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # a negative image
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    focal = softmax_focal_loss(captured["logits"], captured["labels"], 1.5)
    torch.testing.assert_close(losses["loss_classifier"], focal)
    assert not torch.isclose(losses["loss_classifier"], F.cross_entropy(captured["logits"], captured["labels"]))
    sum(losses.values()).backward()



def test_focal_roi_heads_with_no_proposal_and_no_target():
    """A diverged RPN can leave no proposal at all, and an image without pseudo-boxes adds no
    ground-truth proposal: zero RoIs give zero losses, still attached to the graph (found in a
    SIGKILL/resume test whose smoke run diverged)."""
    model = tiny_frcnn()
    use_focal_roi_heads(model, 1.5)
    model.train()
    heads = model.roi_heads
    features = {name: torch.rand(2, 256, 16 // 2**i, 16 // 2**i, requires_grad=True)
                for i, name in enumerate(("0", "1", "2", "3"))}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    _, losses = heads(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64), (64, 64)], [empty, empty])
    assert {k: float(v) for k, v in losses.items()} == {"loss_classifier": 0.0, "loss_box_reg": 0.0}
    sum(losses.values()).backward()

# ------------------------------------------------------------------------------ soft teacher
def test_teacher_forward_returns_the_teacher_call_and_its_features():
    model = tiny_frcnn().eval()
    model.roi_heads.score_thresh = 0.0  # a random-init head scores low: keep its boxes to compare
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 96)]
    with torch.no_grad():
        expect = model(images)
    tpass = teacher_forward(model, images)
    assert sum(len(d["boxes"]) for d in expect) > 0
    for got, want in zip(tpass.detections, expect):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert tpass.image_sizes == [(64, 64), (32, 64)]  # resized so that the long side is max_size 64
    assert tpass.features["0"].shape[0] == 2
    with pytest.raises(ValueError, match="eval mode"):
        teacher_forward(model.train(), images)


def test_teacher_flip_averages_the_head_over_the_view_and_its_mirror():
    """semi.teacher_flip: the RoI head's outputs for a box are the mean of the view's and of the mirror
    image's for the mirrored box (deltas mirrored back), so the ensemble of an image and of its mirror
    agree up to the mirror (an image narrower than its padded batch mirrors in its own width); the
    detections are decoded from that mean: each is a proposal's box under the mean deltas of its
    class, scored by the mean probability of its class."""
    model = tiny_frcnn().eval()
    model.roi_heads.score_thresh = 0.0
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 40)]
    mirrors = [im.flip(-1) for im in images]
    both, both_m = teacher_forward(model, images, flip=True), teacher_forward(model, mirrors, flip=True)
    plain, plain_m = teacher_forward(model, images), teacher_forward(model, mirrors)
    assert both.mirrored_features is not None and plain.mirrored_features is None
    assert both.image_sizes == [(64, 64), (64, 40)]  # the second padded to the batch's 64
    rois = [torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50]]), torch.tensor([[0.0, 0, 20, 32], [18, 2, 40, 30]])]
    mirrored = [flip_boxes(r, w) for r, (_, w) in zip(rois, both.image_sizes)]
    probs, deltas = head_outputs(model, both, rois)
    probs_m, deltas_m = head_outputs(model, both_m, mirrored)
    torch.testing.assert_close(probs_m, probs)
    dx = torch.tensor([-1.0, 1, 1, 1]).repeat(deltas.shape[1] // 4)
    torch.testing.assert_close(deltas_m, deltas * dx)
    assert float(deltas[:, 0::4].abs().min()) > 0  # dx really mirrored, not zero
    alone, alone_m = head_outputs(model, plain, rois)[0], head_outputs(model, plain_m, mirrored)[0]
    torch.testing.assert_close(probs, (alone + alone_m) / 2)
    assert not torch.allclose(probs, alone)
    torch.testing.assert_close(class_probabilities(model, both, rois, both.image_sizes), probs)

    image = images[:1]  # 64 x 64: the teacher's frame is the image's
    dets = teacher_forward(model, image, flip=True).detections[0]
    batch, features, _ = transform_and_features(model, image)
    proposals = model.rpn(batch, features)[0][0].detach()
    one, one_m = teacher_forward(model, image), teacher_forward(model, [image[0].flip(-1)])
    p, d = head_outputs(model, one, [proposals])
    p_m, d_m = head_outputs(model, one_m, [flip_boxes(proposals, 64)])
    mean_p, mean_d = (p + p_m) / 2, (d + d_m * dx) / 2
    decoded = clip_boxes_to_image(model.roi_heads.box_coder.decode(mean_d, [proposals]), (64, 64))  # (N, C, 4)
    assert len(dets["boxes"]) > 0
    for box, label, score in zip(dets["boxes"], dets["labels"], dets["scores"]):
        at = int((decoded[:, label] - box).abs().sum(1).argmin())
        torch.testing.assert_close(decoded[at, label], box)
        torch.testing.assert_close(score, mean_p[at, label], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(decoded[:, 1], proposals)  # the deltas really move the boxes


def test_extra_teachers_join_the_ensemble_each_in_its_own_frame():
    """semi.extra_teachers: another detector's RoI head scores the teacher's boxes (moved into its own
    resized frame) and every view of every model weighs the same: with and without the mirror, the
    outputs are the mean of the single models' own outputs; the detections are decoded from that mean."""
    teacher = tiny_frcnn().eval()
    torch.manual_seed(5)
    other = build_detector("fasterrcnn", build_resnet("resnet18", "bn"), "resnet18", 3, min_size=96, max_size=96,
                           trainable_layers=5, representation_size=64).eval()  # another init, another frame
    torch.manual_seed(2)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 40)]
    rois = [torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50]]), torch.tensor([[0.0, 0, 20, 32], [18, 2, 40, 30]])]
    alone = teacher_forward(teacher, images)
    own = teacher_forward(other, images)
    assert own.image_sizes == [(96, 96), (96, 60)] != alone.image_sizes
    in_other = to_frame(rois, alone.image_sizes, own.image_sizes)
    p_t, d_t = head_outputs(teacher, alone, rois)
    p_o, d_o = head_outputs(other, own, in_other)
    both = teacher_forward(teacher, images, extra=[other])
    assert both.extra is not None and len(both.extra) == 1 and both.mirrored_features is None
    p, d = head_outputs(teacher, both, rois)
    torch.testing.assert_close(p, (p_t + p_o) / 2)
    torch.testing.assert_close(d, (d_t + d_o) / 2)
    assert not torch.allclose(p, p_t) and not torch.allclose(p, p_o)
    flip_t = head_outputs(teacher, teacher_forward(teacher, images, flip=True), rois)[0]
    flip_o = head_outputs(other, teacher_forward(other, images, flip=True), in_other)[0]
    four = head_outputs(teacher, teacher_forward(teacher, images, flip=True, extra=[other]), rois)[0]
    torch.testing.assert_close(four, (flip_t + flip_o) / 2)  # four views, each a quarter
    torch.testing.assert_close(class_probabilities(teacher, both, rois, both.image_sizes), p)
    # The detections: the teacher's proposals decoded under the mean, scored by the mean.
    teacher.roi_heads.score_thresh = 0.0
    image = images[:1]
    dets = teacher_forward(teacher, image, extra=[other]).detections[0]
    batch, features, _ = transform_and_features(teacher, image)
    proposals = teacher.rpn(batch, features)[0][0].detach()
    mean_p, mean_d = head_outputs(teacher, teacher_forward(teacher, image, extra=[other]), [proposals])
    decoded = clip_boxes_to_image(teacher.roi_heads.box_coder.decode(mean_d, [proposals]), (64, 64))
    assert len(dets["boxes"]) > 0
    for box, label, score in zip(dets["boxes"], dets["labels"], dets["scores"]):
        at = int((decoded[:, label] - box).abs().sum(1).argmin())
        torch.testing.assert_close(decoded[at, label], box)
        torch.testing.assert_close(score, mean_p[at, label], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        teacher_forward(teacher, images, extra=[other.train()])


def test_two_target_losses_route_each_box_set_to_its_stage():
    """semi.rpn_threshold's forward: the RPN's losses are those of a plain forward on the RPN's boxes,
    the RoI head's those of a plain forward on the RoI boxes, and one set for both is the plain forward."""
    from finetune.semi.teacher_student import two_target_losses

    model = tiny_frcnn(3).train()
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 100_000  # every proposal: no sampling order
    model.transform.min_size = (40, 48, 56, 64)  # multi-scale training: one draw must size both box sets
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 96)]
    roi = [{"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    rpn = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [34, 30, 60, 60]]), "labels": torch.tensor([1, 2])},
           {"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.tensor([3])}]

    def run(fn):
        torch.manual_seed(0)
        return {k: float(v.detach()) for k, v in fn().items()}

    split = run(lambda: two_target_losses(model, images, rpn, roi))
    on_rpn, on_roi = run(lambda: model(images, rpn)), run(lambda: model(images, roi))
    rpn_keys, roi_keys = ("loss_objectness", "loss_rpn_box_reg"), ("loss_classifier", "loss_box_reg")
    assert {k: split[k] for k in rpn_keys} == pytest.approx({k: on_rpn[k] for k in rpn_keys})
    assert {k: split[k] for k in roi_keys} == pytest.approx({k: on_roi[k] for k in roi_keys}, rel=1e-5)
    assert split["loss_objectness"] != pytest.approx(on_roi["loss_objectness"])  # the extra boxes reached the RPN
    assert run(lambda: two_target_losses(model, images, roi, roi)) == pytest.approx(on_roi, rel=1e-5)
    for seed in range(4):  # every size drawn: the RoI losses stay a plain forward's on the same draw
        torch.manual_seed(seed)
        got = two_target_losses(model, images, rpn, roi)
        torch.manual_seed(seed)
        want = model(images, roi)
        assert float(got["loss_classifier"]) == pytest.approx(float(want["loss_classifier"]), rel=1e-5)


def test_to_frame_by_hand():
    boxes = [torch.tensor([[10.0, 20, 30, 40]]), torch.zeros(0, 4)]
    out = to_frame(boxes, [(100, 200), (50, 50)], [(50, 100), (100, 100)])
    assert out[0].tolist() == [[5.0, 10, 15, 20]] and out[1].shape == (0, 4)
    # Height and width scale apart: x by the width ratio (50/200), y by the height ratio (50/100).
    assert to_frame(boxes[:1], [(100, 200)], [(50, 50)])[0].tolist() == [[2.5, 10, 7.5, 20]]
    with pytest.raises(ValueError, match="box sets"):
        to_frame(boxes, [(100, 200)], [(50, 50)])


def test_background_probability_follows_the_boxes_across_resizes():
    teacher = tiny_frcnn().eval()
    images = [torch.rand(3, 64, 64)]
    tpass = teacher_forward(teacher, images)
    boxes = torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50], [0, 0, 64, 64]])
    own = background_probability(teacher, tpass, [boxes], [(64, 64)])
    # The same boxes on a student image twice the size name the same regions of the teacher's view.
    doubled = background_probability(teacher, tpass, [boxes * 2], [(128, 128)])
    torch.testing.assert_close(doubled, own)
    assert own.shape == (3,) and bool(((own > 0) & (own < 1)).all())
    assert len(set(own.tolist())) == 3  # three regions, three probabilities: the boxes are really pooled
    with torch.no_grad():
        teacher.roi_heads.box_predictor.cls_score.bias[0] = 30.0  # the teacher is sure it is background
    torch.testing.assert_close(background_probability(teacher, tpass, [boxes], [(64, 64)]), torch.ones(3))


def _captured_student(monkeypatch):
    """A training-mode Faster R-CNN student at 128 px with a cross-entropy focal head (gamma 0) that
    records its sampled proposals and labels, the image shapes and the class logits of its RoI pass;
    with two images (64 and 48 px high) and one target box each."""
    torch.manual_seed(1)
    student = build_detector("fasterrcnn", build_resnet("resnet18", "bn"), "resnet18", 3, min_size=128,
                             max_size=128, trainable_layers=5, representation_size=64)
    use_focal_roi_heads(student, 0.0)  # cross-entropy: the expected losses are easy to state
    captured = {}
    sampler = student.roi_heads.select_training_samples

    def grab_samples(*a, **kw):
        out = sampler(*a, **kw)
        captured["proposals"] = [p.detach().clone() for p in out[0]]
        captured["labels"] = torch.cat(out[2])
        return out

    monkeypatch.setattr(student.roi_heads, "select_training_samples", grab_samples)
    student.roi_heads.register_forward_pre_hook(lambda m, args: captured.__setitem__("shapes", list(args[2])))
    student.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o[0]))
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[30.0, 10, 60, 40]]), "labels": torch.tensor([1])}]
    student.train()
    return student, captured, images, targets


@pytest.mark.parametrize("teacher_bias", [None, 30.0, -30.0])
def test_soft_background_weights_background_rois_by_the_teacher(monkeypatch, teacher_bias):
    # The student resizes to 128 px, the teacher to 64: its proposals must be mapped to be scored.
    student, captured, images, targets = _captured_student(monkeypatch)
    teacher = tiny_frcnn().eval()
    if teacher_bias is not None:
        with torch.no_grad():
            teacher.roi_heads.box_predictor.cls_score.bias[0] = teacher_bias
    tpass = teacher_forward(teacher, images)
    with soft_background(student, teacher, tpass):
        losses = student(images, targets)
    assert student.roi_heads.background_weights is None  # only for that pass
    assert captured["shapes"] == [(128, 128), (96, 128)] and tpass.image_sizes == [(64, 64), (48, 64)]
    ce = F.cross_entropy(captured["logits"], captured["labels"], reduction="none")
    fg = captured["labels"] > 0
    assert 0 < int(fg.sum()) < len(fg)
    if teacher_bias is None:  # the teacher's own probabilities for the proposals, mapped to its frame
        p_bg = background_probability(teacher, tpass, captured["proposals"], captured["shapes"])
        assert float(p_bg.std()) > 1e-3
        w = torch.where(fg, torch.ones_like(p_bg), p_bg)
        torch.testing.assert_close(losses["loss_classifier"], (w * ce).sum() / w.sum().clamp(min=1))
        assert not torch.isclose(losses["loss_classifier"], ce.mean())
    elif teacher_bias > 0:  # background probability 1: every RoI weighs 1, the plain mean
        torch.testing.assert_close(losses["loss_classifier"], ce.mean())
    else:  # probability ~0: background RoIs drop out, the mean over the foreground RoIs (sum / max(n, 1))
        torch.testing.assert_close(losses["loss_classifier"], ce[fg].sum() / max(1.0, float(fg.sum())))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(TypeError, match="FocalRoIHeads"), soft_background(tiny_frcnn(), teacher, tpass):
        pass


@pytest.mark.parametrize("on", ["background", "all"])
def test_soft_classes_train_rois_against_the_teachers_distribution(monkeypatch, on):
    student, captured, images, targets = _captured_student(monkeypatch)
    teacher = tiny_frcnn().eval()
    tpass = teacher_forward(teacher, images)
    with soft_classes(student, teacher, tpass, on):
        losses = student(images, targets)
    assert student.roi_heads.soft_targets is None  # only for that pass
    labels, logits = captured["labels"], captured["logits"]
    fg = labels > 0
    assert 0 < int(fg.sum()) < len(fg)
    # The teacher's distribution for each sampled RoI, its box mapped to the teacher's frame.
    q = class_probabilities(teacher, tpass, captured["proposals"], captured["shapes"])
    assert q.shape == (len(labels), 4) and float(q[:, 1:].sum(1).std()) > 1e-4
    torch.testing.assert_close(q.sum(1), torch.ones(len(labels)))
    want = q if on == "all" else torch.where(fg[:, None], F.one_hot(labels, 4).float(), q)
    log_p = logits.float().log_softmax(1)
    torch.testing.assert_close(losses["loss_classifier"], -(want * log_p).sum(1).mean())
    assert not torch.isclose(losses["loss_classifier"], F.cross_entropy(logits.float(), labels))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="'background' or 'all'"), soft_classes(student, teacher, tpass, "fg"):
        pass
    with pytest.raises(TypeError, match="FocalRoIHeads"), soft_classes(tiny_frcnn(), teacher, tpass):
        pass


# ------------------------------------------------------------------------------------ views
def test_views_keep_geometry_and_flip_boxes():
    img = torch.zeros(3, 48, 64)
    img[:, 10:20, 30:50] = 1.0
    g = torch.Generator().manual_seed(0)
    s1, s2 = strong_augment(img, g.manual_seed(3)), strong_augment(img, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == img.shape and 0 <= s1.min() and s1.max() <= 1
    box = torch.tensor([[30.0, 10, 50, 20]])
    flipped = weak_view(img, True)
    ys, xs = torch.where(flipped[0] > 0.5)
    tight = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    assert flip_boxes(box, 64).tolist() == [tight]
    assert torch.equal(flip_boxes(flip_boxes(box, 64), 64), box)
    # Photometric only: whatever it does, the strong view's square edges stay where they were in
    # the rows nothing erased (the square's column profile keeps its jump at x=30 and x=50).
    changed = 0
    for seed in range(20):
        s = strong_augment(img, torch.Generator().manual_seed(seed))
        changed += int(not torch.equal(s, img))
        row = s[:, 15].mean(0)
        inside, outside = row[32:48], torch.cat([row[:28], row[52:]])
        if (inside.std() < 1e-3) and (outside.std() < 1e-3):  # this row was not erased or blurred
            assert abs(float(inside.mean() - outside.mean())) > 0.05
    assert changed >= 18


def test_scale_view_moves_the_image_and_its_boxes_together():
    img = torch.zeros(3, 60, 80)
    img[:, 20:40, 30:50] = 1.0
    box = torch.tensor([[30.0, 20, 50, 40]])
    zoomed_in = zoomed_out = 0
    for seed in range(30):
        torch.manual_seed(seed)
        view, affine = scale_view(img, RandomScaleJitter((0.5, 1.5)))
        assert view.shape == img.shape and affine.shape == (4,)
        sx, sy = float(affine[0]), float(affine[1])
        assert 0.49 <= sx <= 1.51 and abs(sx - sy) < 0.05
        zoomed_in += sx > 1.05
        zoomed_out += sx < 0.95
        mapped, labels = map_boxes(box, torch.tensor([3]), affine, (60, 80))
        if mapped.shape[0] == 0:  # the square fell outside the crop
            assert float(view.max()) < 0.5
            continue
        assert labels.tolist() == [3]
        x1, y1, x2, y2 = (float(v) for v in mapped[0])
        assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 60
        # The square is under its mapped box and nowhere outside it (bilinear edges aside).
        inner = view[:, math.ceil(y1) + 1:int(y2) - 1, math.ceil(x1) + 1:int(x2) - 1]
        if inner.numel():
            assert float(inner.min()) > 0.9
        outside = view.clone()
        outside[:, max(0, int(y1) - 1):math.ceil(y2) + 1, max(0, int(x1) - 1):math.ceil(x2) + 1] = 0
        assert float(outside.max()) < 0.05
        torch.testing.assert_close(unmap_boxes(box * affine[:2].repeat(2) + affine[2:].repeat(2), affine), box)
    assert zoomed_in >= 5 and zoomed_out >= 5
    # A range of (1, 1) is the image itself.
    same, affine = scale_view(img, RandomScaleJitter((1.0, 1.0)))
    assert torch.equal(same, img) and affine.tolist() == list(IDENTITY)
    # Clipped to the view; a box left under 1 px (outside the crop) is dropped with its label.
    boxes = torch.tensor([[10.0, 10, 30, 30], [70, 50, 90, 70], [100, 100, 120, 120]])
    out, labels = map_boxes(boxes, torch.tensor([1, 2, 3]), torch.tensor([1.0, 1.0, -5.0, 0.0]), (60, 80))
    assert out.tolist() == [[5.0, 10, 25, 30], [65, 50, 80, 60]] and labels.tolist() == [1, 2]


def test_class_probabilities_follow_the_boxes_through_a_zoomed_strong_view():
    teacher = tiny_frcnn().eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    tpass = teacher_forward(teacher, images)
    weak_boxes = [torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50]]), torch.tensor([[8.0, 6, 40, 40]])]
    want = class_probabilities(teacher, tpass, weak_boxes, [(64, 64), (48, 64)])
    # Strong views zoomed 2x (shifted) and 0.5x (padded), then resized by the student to twice their size.
    affines = [torch.tensor([2.0, 2.0, -10.0, -6.0]), torch.tensor([0.5, 0.5, 7.0, 3.0])]
    strong_boxes = [b * a[:2].repeat(2) + a[2:].repeat(2) for b, a in zip(weak_boxes, affines)]
    student_sizes = [(128, 128), (96, 128)]
    tpass.strong_affines = affines
    got = class_probabilities(teacher, tpass, [b * 2 for b in strong_boxes], student_sizes)
    torch.testing.assert_close(got, want)
    # Zoomed out 0.5x at offset (7, 3), the second view shows the image in [7, 39] x [3, 27]: a RoI
    # on the padding (and one mostly on it) is background to the teacher, one-hot; one inside is not.
    pad = torch.tensor([[40.0, 30, 60, 46], [30.0, 20, 50, 40], [10.0, 5, 30, 20]])
    probs = class_probabilities(teacher, tpass, [torch.zeros(0, 4), pad * 2], student_sizes)
    assert probs[:2].tolist() == [[1.0, 0.0, 0.0, 0.0]] * 2 and float(probs[2, 0]) < 1.0
    tpass.strong_affines = None  # read as the same geometry: other boxes, other probabilities
    assert not torch.allclose(class_probabilities(teacher, tpass, [b * 2 for b in strong_boxes], student_sizes), want)


def test_strong_view_survives_grayscale_without_erasing():
    # RandomGrayscale returns one channel expanded to three; with no erasing pass after it the
    # view used to reach an in-place clamp and fail ("more than one element ... refers to a single
    # memory location"), killing the demo's semi arm in a DataLoader worker.
    img = torch.rand(3, 8, 8)
    gray_untouched = 0
    for seed in range(300):
        s = strong_augment(img, torch.Generator().manual_seed(seed))
        assert s.shape == img.shape and 0 <= float(s.min()) and float(s.max()) <= 1
        gray_untouched += int(torch.equal(s[0], s[1]) and torch.equal(s[1], s[2]))
    assert gray_untouched >= 1


def _erased_fraction(view: torch.Tensor) -> float:
    """Of a view of a constant image (colour jitter and grayscale keep it constant): the fraction of
    pixels that differ from its most common colour, i.e. that an erasing pass filled."""
    background = view.flatten(1).mode(1).values.reshape(-1, 1, 1)
    return float((view != background).any(0).float().mean())


def test_soft_teacher_view_erases_one_to_four_small_squares():
    img = torch.full((3, 60, 80), 0.5)
    erased = []
    for seed in range(60):
        s = strong_augment(img, torch.Generator().manual_seed(seed), view="soft_teacher")
        assert s.shape == img.shape and 0 <= float(s.min()) and float(s.max()) <= 1
        assert torch.equal(s, strong_augment(img, torch.Generator().manual_seed(seed), view="soft_teacher"))
        erased.append(_erased_fraction(s))
    # at most 4 squares of side < 0.2 x 60 = 12 px, and some erasing in most views
    assert max(erased) <= 4 * 11 * 11 / (60 * 80)
    assert sum(e > 0 for e in erased) >= 45
    # Unbiased Teacher's view erases several times more of the image (5-20% per pass, up to 3 passes)
    ut = [_erased_fraction(strong_augment(img, torch.Generator().manual_seed(k))) for k in range(60)]
    assert sum(erased) < sum(ut) / 3, (sum(erased), sum(ut))
    with pytest.raises(ValueError, match="strong view 'heavy'"):
        strong_augment(img, view="heavy")


def test_erase_view_greys_small_squares_and_keeps_every_other_colour():
    img = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    erased = 0
    for seed in range(40):
        s = strong_augment(img, torch.Generator().manual_seed(seed), view="erase")
        changed = (s != img).any(0)
        # every changed pixel is Soft Teacher's grey, every other pixel is the input's own colour
        assert torch.all(s[:, changed] == 125 / 255)
        assert torch.equal(s[:, ~changed], img[:, ~changed])
        assert float(changed.float().mean()) <= 4 * 11 * 11 / (60 * 80)
        erased += bool(changed.any())
    assert erased >= 30
    # the soft_teacher view changes colours outside its squares too (its jitter, p 0.8)
    recoloured = [float(((strong_augment(img, torch.Generator().manual_seed(k), view="soft_teacher") - img).abs()
                         > 1e-3).float().mean()) for k in range(10)]
    assert sum(r > 0.5 for r in recoloured) >= 5


# ----------------------------------------------------------------------------------- health
def test_health_precision_recall_by_hand():
    h = PseudoLabelHealth(2, ["a", "b"])
    pseudo = [det([0.9, 0.8, 0.7], [1, 1, 2], [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
              det([], [])]
    gt = [{"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}, None]
    h.update(pseudo, gt)
    s = h.summary(torch.tensor([0.5, 0.6]), labeled_boxes_per_image=2.0)
    a, b = s["per_class"]["a"], s["per_class"]["b"]
    assert (a["tp"], a["fp"], a["fn"]) == (1, 1, 0)  # the duplicate of one box is a false positive
    assert (b["tp"], b["fp"], b["fn"]) == (0, 1, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["pseudo_boxes_per_image"] == 1.5 and s["pseudo_to_labeled_ratio"] == 0.75
    assert s["images_without_pseudo"] == 0.5 and b["threshold"] == pytest.approx(0.6)
    none = PseudoLabelHealth(2, ["a", "b"])
    none.update(pseudo)
    assert none.summary()["precision"] is None
    # Two halves merged equal the whole; the state survives a weights_only round trip.
    h1, h2 = PseudoLabelHealth(2, ["a", "b"]), PseudoLabelHealth(2, ["a", "b"])
    h1.update(pseudo[:1], gt[:1])
    h2.update(pseudo[1:], gt[1:])
    h1.merge(roundtrip(h2.state_dict()))
    assert h1.summary() == h.summary()


def test_loss_watch_fires_once_per_episode():
    w = LossWatch(patience=3, ratio=100.0)
    msgs = [w.update(i, 0, 1.0, 0.0) for i in range(6)]
    assert [len(m) for m in msgs] == [0, 0, 1, 0, 0, 0] and "no pseudo-box" in msgs[2][0]
    assert w.update(6, 5, 1.0, 0.5) == []  # healthy clears it
    assert any("over 100x" in m for m in w.update(7, 5, 0.01, 5.0))
    assert w.counts() == {"no_pseudo_boxes": 1, "unsup_loss_zero": 0, "unsup_loss_exploding": 1}


# ------------------------------------------------------------------------------ consistency
def test_mirror_index_by_hand():
    m = mirror_index([(2, 3), (1, 2)], num_anchors=2)
    # level 0: (y, x, a) -> (y, 2 - x, a); index = (y * 3 + x) * 2 + a
    assert m[(0 * 3 + 0) * 2 + 1] == (0 * 3 + 2) * 2 + 1
    assert m[(1 * 3 + 1) * 2 + 0] == (1 * 3 + 1) * 2 + 0  # the middle column maps to itself
    assert m[12 + 0] == 12 + 2 and m[12 + 3] == 12 + 1  # level 1 offset 12: x 0 <-> 1
    assert torch.equal(m[m], torch.arange(len(m)))  # an involution


def test_consistency_terms_zero_for_matching_views_positive_otherwise():
    grid, a = [(2, 4)], 3
    m = mirror_index(grid, a)
    g = torch.Generator().manual_seed(0)
    cls_a = torch.randn(2, 24, 4, generator=g) + 2
    box_a = torch.randn(2, 24, 4, generator=g)
    box_b = box_a[:, m].clone()
    box_b[..., 0] = -box_b[..., 0]  # a mirrored prediction negates dx
    js, mse = consistency_terms(cls_a, cls_a[:, m], box_a, box_b, m, 0.5)
    assert float(js) == pytest.approx(0.0, abs=1e-6) and float(mse) == pytest.approx(0.0, abs=1e-10)
    js2, mse2 = consistency_terms(cls_a, cls_a, box_a, box_a, m, 0.5)  # not mirrored: disagree
    assert js2 > 1e-3 and mse2 > 1e-3
    assert float(js_divergence_bernoulli(torch.tensor(0.3), torch.tensor(0.3))) == pytest.approx(0, abs=1e-7)
    z1, z2 = consistency_terms(cls_a - 20, cls_a, box_a, box_a, m, 0.5)  # all background: eliminated
    assert float(z1) == 0.0 and float(z2) == 0.0 and z1.requires_grad is cls_a.requires_grad
    assert rampup_weight(0, 100) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert rampup_weight(50, 100) == pytest.approx(torch.exp(torch.tensor(-1.25)).item())
    assert rampup_weight(100, 100) == 1.0 and rampup_weight(3, 0) == 1.0


@pytest.mark.parametrize("name", ["retinanet", "fasterrcnn"])
def test_consistency_on_real_detectors_has_gradients(name):
    torch.manual_seed(0)
    model = build_detector(name, build_resnet("resnet18", "bn"), "resnet18", 3, min_size=64, max_size=64,
                           trainable_layers=5)
    model.train()
    loss = ConsistencyLoss(noise_std=0.1, background_threshold=0.0)
    out = loss(model, [torch.rand(3, 64, 64), torch.rand(3, 64, 64)], step=10)
    total = out["consistency_cls"] + out["consistency_box"]
    assert torch.isfinite(total) and out["consistency_cls"] > 0 and out["consistency_box"] > 0
    total.backward()
    head = model.head if name == "retinanet" else model.rpn.head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert model.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_strong_view_pass_leaves_bn_running_statistics_alone():
    """The student's pass over strong views normalises with batch statistics but must not move the running
    ones that validation and the teacher use; the supervised pass (outside the context) still does."""
    from finetune.semi.teacher_student import running_stats_frozen

    torch.manual_seed(0)
    model = build_detector("fasterrcnn", build_resnet("resnet18", "bn"), "resnet18", 3, trainable_layers=5,
                           min_size=96, max_size=96, fpn_channels=32, representation_size=32,
                           rpn_post_nms_top_n_train=32, box_batch_size_per_image=16).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    momenta = [m.momentum for m in bns]
    images = [torch.rand(3, 96, 96) * 0.3 for _ in range(2)]  # darker than the stats' start: they must move
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 2

    def stats():
        return [torch.cat([m.running_mean, m.running_var]).clone() for m in bns]

    before = stats()
    with running_stats_frozen(model):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.equal(a, b) for a, b in zip(before, stats()))
    assert [m.momentum for m in bns] == momenta  # restored
    with pytest.raises(RuntimeError), running_stats_frozen(model):
        raise RuntimeError("a failing step")
    assert [m.momentum for m in bns] == momenta  # restored on errors too
    model(images, targets)
    assert not all(torch.equal(a, b) for a, b in zip(before, stats()))  # outside it, BN learns as usual


# ---------------------------------------------------------------------------- empty weight
class _Step:
    """What a teacher-student mode sees of the Lightning module: real student, teacher and threshold."""

    def __init__(self, model, threshold):
        from finetune.semi.ema import make_teacher

        self.model, self.teacher = model, make_teacher(model)
        self.device, self.global_step = torch.device("cpu"), 0
        self.threshold = threshold

    def pseudo_labels(self, detections, ground_truth=None):
        self.threshold.update(detections)
        return self.threshold.filter(detections)


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
def test_empty_weight_scales_both_detectors_when_most_images_lack_pseudo_boxes(name):
    from finetune.semi.mean_teacher import MeanTeacher
    from finetune.semi.unbiased_teacher import UnbiasedTeacher

    torch.manual_seed(0)
    small = ({"representation_size": 32, "rpn_post_nms_top_n_train": 32, "box_batch_size_per_image": 16}
             if name == "fasterrcnn" else {})
    model = build_detector(name, build_resnet("resnet18", "bn"), "resnet18", 3, min_size=64, max_size=64,
                           trainable_layers=5, fpn_channels=32, detections_per_img=10, **small).train()
    cls = UnbiasedTeacher if name == "fasterrcnn" else MeanTeacher
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    unlabeled = {"weak": images, "strong": images}

    def run(weight, threshold):
        step = _Step(model, FixedThreshold(3, threshold))
        if name == "fasterrcnn":
            step.teacher.roi_heads.score_thresh = 0.0  # a random teacher scores low: keep its boxes
        else:
            step.teacher.score_thresh = 0.0
        mode = cls({"empty_weight": weight, "unsup_box_loss": name == "retinanet"})
        mode.setup(step)
        torch.manual_seed(0)  # the same RPN / RoI sampling in every call
        return mode.loss(step, unlabeled)

    full, scaled, dropped = run(1.0, 1.0), run(0.01, 1.0), run(0.0, 1.0)  # threshold 1: no pseudo-box
    assert full.num_pseudo == 0 and full.empty_scaled and scaled.empty_scaled
    assert float(full.loss) > 0
    torch.testing.assert_close(scaled.loss, 0.01 * full.loss)
    assert float(dropped.loss) == 0.0 and dropped.loss.requires_grad
    dropped.loss.backward()  # a dropped batch still backpropagates (DDP needs every parameter used)
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.parameters())
    kept_full, kept_damped = run(1.0, 0.0), run(0.01, 0.0)  # every image has pseudo-boxes: no scaling
    assert kept_full.num_pseudo > 0 and kept_full.empty_scaled is False
    torch.testing.assert_close(kept_damped.loss, kept_full.loss)
    # The old RetinaNet-only key is still read.
    old = cls({"empty_batch_weight": 0.05})
    old.setup(_Step(model, FixedThreshold(3, 1.0)))
    assert old.empty_weight == 0.05


# --------------------------------------------------------------------------------- deploy
def test_deployed_by_rule():
    from finetune.semi.module import deployed_by

    assert [deployed_by(r, 0.3, 0.2) for r in ("teacher", "student", "best")] == ["teacher", "student", "student"]
    assert [deployed_by(r, 0.2, 0.3) for r in ("teacher", "student", "best")] == ["teacher", "student", "teacher"]
    assert deployed_by("best", 0.2, 0.2) == "teacher"  # a tie keeps the teacher
    assert deployed_by("best", 0.2, None) == deployed_by("teacher", 0.2, None) == "student"  # no teacher yet
    with pytest.raises(ValueError, match="semi.deploy"):
        deployed_by("ensemble", 0.2, 0.3)


def test_consistency_passes_leave_bn_running_statistics_alone():
    """The consistency mode's perturbed and flipped passes over unlabeled images normalise with batch
    statistics like the strong-view pass, and leave the running ones as they were."""
    from types import SimpleNamespace

    from finetune.semi.consistency import Consistency

    torch.manual_seed(0)
    model = build_detector("fasterrcnn", build_resnet("resnet18", "bn"), "resnet18", 3, trainable_layers=5,
                           min_size=96, max_size=96, fpn_channels=32, representation_size=32).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [torch.cat([m.running_mean, m.running_var]).clone() for m in bns]
    step = SimpleNamespace(model=model, device=torch.device("cpu"), global_step=5)
    out = Consistency({"consistency": {"rampup_steps": 0}}).loss(step, {"weak": [torch.rand(3, 96, 96) * 0.3] * 2})
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert all(torch.equal(a, torch.cat([m.running_mean, m.running_var])) for a, m in zip(before, bns))


def test_semi_phase_in_a_decaying_schedule_warns_with_its_mean_lr(caplog):
    """Burn-in inside one cosine run leaves the semi phase the low-LR tail: the module says so, with
    the mean factor; a constant schedule, or a run without a semi phase in it, does not warn."""
    from types import SimpleNamespace

    from finetune.semi.module import SemiDetectionModule

    def mean_lr(name: str, burn_in: int) -> float | None:
        stub = SimpleNamespace(trainer=SimpleNamespace(estimated_stepping_batches=300),
                               resolve_burn_in=lambda: burn_in, cfg={"scheduler": {"name": name, "warmup_steps": 20}})
        return SemiDetectionModule.warn_semi_lr_tail(stub)  # type: ignore[arg-type]

    with caplog.at_level("WARNING"):
        cosine = mean_lr("cosine", 150)
    assert cosine == pytest.approx(0.2066, abs=1e-3)
    assert "runs at a mean 0.21 of the peak LR under scheduler=cosine" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert mean_lr("constant", 150) == 1.0 and mean_lr("cosine", 0) is None
    assert caplog.text == ""


def test_retinanet_pseudo_losses_over_the_batchs_foreground_anchors():
    """batch_normalised: a RetinaNet's classification and box losses are the batch's sums over the
    batch's foreground anchors (an image with one box no longer weighs as much as one with five);
    outside the block, torchvision's per-image normalisation is back. Checked against sums computed
    here from the head's own outputs and anchor matches."""
    from torchvision.ops import sigmoid_focal_loss

    from finetune.semi.dense_norm import batch_normalised

    torch.manual_seed(0)
    model = build_detector("retinanet", build_resnet("resnet18", "bn"), "resnet18", 3, min_size=64, max_size=64,
                           trainable_layers=5).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[2.0, 2, 20, 20], [30, 30, 60, 60], [5, 35, 25, 62], [35, 5, 62, 28],
                                       [20, 20, 44, 44]]), "labels": torch.tensor([1, 2, 3, 1, 2])}]
    seen = {}
    real = model.head.compute_loss

    def spy(tg, outputs, anchors, matched):
        seen.update(outputs=outputs, matched=matched, anchors=anchors)
        return real(tg, outputs, anchors, matched)

    model.head.compute_loss = spy
    torch.manual_seed(1)
    with torch.no_grad(), batch_normalised(model) as applied:
        batch = model(images, targets)
    assert applied
    sums, fgs = [], []
    for t, logits, m in zip(targets, seen["outputs"]["cls_logits"], seen["matched"]):
        fg = m >= 0
        onehot = torch.zeros_like(logits)
        onehot[fg, t["labels"][m[fg]] - 1] = 1.0  # KClassRetinaNet trains labels 1..K as outputs 0..K-1
        valid = m != -2
        sums.append(sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum"))
        fgs.append(int(fg.sum()))
    assert fgs[0] < fgs[1]
    torch.testing.assert_close(batch["classification"], (sums[0] + sums[1]) / sum(fgs))
    # The box term at the head's own smooth-L1 beta, over the batch's foreground anchors.
    from torchvision.models.detection._utils import _box_loss

    head = model.head.regression_head
    box = [_box_loss(head._loss_type, head.box_coder, anc[m >= 0], t["boxes"][m[m >= 0]], reg[m >= 0],
                     cnf={"beta": head.beta} if hasattr(head, "beta") else None)
           for t, reg, anc, m in zip(targets, seen["outputs"]["bbox_regression"], seen["anchors"], seen["matched"])]
    torch.testing.assert_close(batch["bbox_regression"], (box[0] + box[1]) / sum(fgs))
    torch.manual_seed(1)
    with torch.no_grad():
        per_image = model(images, targets)  # torchvision's again
    torch.testing.assert_close(per_image["classification"], (sums[0] / fgs[0] + sums[1] / fgs[1]) / 2)
    torch.testing.assert_close(per_image["bbox_regression"], (box[0] / fgs[0] + box[1] / fgs[1]) / 2)
    with batch_normalised(tiny_frcnn()) as applied:
        assert not applied  # other detectors keep their losses
