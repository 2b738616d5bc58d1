"""Semi-supervised runs end to end on the tiny synthetic set: every mode, health in metrics.json, resume."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import finetune_smoke_cfg

from finetune.checkpoint import load_detection_checkpoint
from finetune.run import run as train
from finetune.semi.data import UnlabeledDetectionImages

smoke_cfg = finetune_smoke_cfg

# A threshold of 0 keeps every teacher detection: a few-step teacher scores below 0.7, and the
# health figures (precision/recall against the hidden ground truth) need pseudo-boxes to mean anything.
FAST = ("semi.burn_in=1", "semi.ema_decay=0.5", "semi.threshold=0.0", "detector.detections_per_img=20",
        "trainer.max_epochs=1")


def _teacher(state: dict) -> dict:
    return {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}


def _student(state: dict) -> dict:
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def unbiased_run(synthetic_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ut")
    train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", *FAST), run_dir=run_dir)
    return run_dir


def test_unbiased_teacher_run_reports_pseudo_label_health(unbiased_run, synthetic_data):
    m = json.loads((unbiased_run / "metrics.json").read_text())
    semi = m["semi"]
    assert semi["mode"] == "unbiased_teacher" and semi["deployed"] == "teacher"
    health = semi["pseudo_labels"]
    # The synthetic unlabeled.json carries hidden ground truth: precision/recall are real numbers.
    assert health["pseudo_boxes_per_image"] > 0
    assert 0.0 <= health["precision"] <= 1.0 and 0.0 <= health["recall"] <= 1.0
    assert set(health["per_class"]) == set(m["classes"])
    labeled = json.loads(Path(synthetic_data["train_json"]).read_text())
    assert health["labeled_boxes_per_image"] == pytest.approx(len(labeled["annotations"]) / len(labeled["images"]))
    entry = m["history"][-1]
    assert entry["val_teacher_AP"] is not None and entry["val_student_AP"] is not None
    assert entry["unsup_loss"] is not None and entry["unsup_loss"] > 0
    # The RoI classifier trains with the focal loss: the run's module has a FocalRoIHeads at gamma 1.5.
    from finetune.semi.focal import FocalRoIHeads
    from finetune.semi.module import SemiDetectionModule
    ckpt = torch.load(unbiased_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["semi"]["teacher_started"] and ckpt["semi"]["deploy"] == "teacher"
    hp = ckpt["hyper_parameters"]
    rebuilt = SemiDetectionModule(cfg=hp["cfg"], label_map=hp["label_map"], backbone_info=hp["backbone_info"])
    assert isinstance(rebuilt.model.roi_heads, FocalRoIHeads) and rebuilt.model.roi_heads.focal_gamma == 1.5
    # The teacher is an EMA of the student, so after EMA steps at decay 0.5 it differs from it.
    t, s = _teacher(ckpt["state_dict"]), _student(ckpt["state_dict"])
    assert t.keys() == s.keys()
    assert any(not torch.equal(t[k], s[k]) for k in t if t[k].is_floating_point())


def test_evaluate_and_predict_load_teacher_or_student(unbiased_run):
    ckpt = unbiased_run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    teacher = load_detection_checkpoint(ckpt)  # auto: the deployed teacher
    assert teacher.deployed_weights == "teacher"
    for k, v in _teacher(state).items():
        assert torch.equal(teacher.model.state_dict()[k], v), k
    student = load_detection_checkpoint(ckpt, weights="student")
    for k, v in _student(state).items():
        assert torch.equal(student.model.state_dict()[k], v), k


@pytest.mark.slow  # the SIGKILL and deterministic-resume tests cover it too
def test_resume_keeps_the_teacher(synthetic_data, tmp_path):
    # ema_decay=1: the teacher never moves after burn-in, so after a resume it must still be the
    # first run's teacher. Without restoring it, the resumed run would copy the student anew.
    args = ("semi=unbiased_teacher", "semi.burn_in=1", "semi.ema_decay=1.0", "semi.threshold=gmm")
    train(smoke_cfg(synthetic_data["root"], *args, "trainer.max_epochs=1"), run_dir=tmp_path)
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    train(smoke_cfg(synthetic_data["root"], *args, "trainer.max_epochs=2"), run_dir=tmp_path)
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] > first["global_step"]
    t1, t2, s2 = _teacher(first["state_dict"]), _teacher(second["state_dict"]), _student(second["state_dict"])
    assert all(torch.equal(t1[k], t2[k]) for k in t1 if t1[k].is_floating_point())
    assert any(not torch.equal(t2[k], s2[k]) for k in t2 if t2[k].is_floating_point())
    # The GMM thresholds' FIFOs came back too and kept filling.
    q1 = first["semi"]["threshold"]
    q2 = second["semi"]["threshold"]
    assert json.dumps(q1, default=str) != json.dumps(q2, default=str)


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def _record_ema(monkeypatch) -> list[float]:
    """The decays of the teacher's real EMA updates, in order."""
    import finetune.semi.module as semi_module

    decays: list[float] = []
    real = semi_module.ema_update

    def recording(teacher, student, decay):  # type: ignore[no-untyped-def]
        decays.append(decay)
        return real(teacher, student, decay)

    monkeypatch.setattr(semi_module, "ema_update", recording)
    return decays


def test_mean_teacher_retinanet_gmm_run(synthetic_data, tmp_path, monkeypatch):
    # 6 steps, burn-in 1: 5 semi steps; a time constant of 0.4 of them is 2 steps, decay 1 - 1/2.
    decays = _record_ema(monkeypatch)
    m = train(smoke_cfg(synthetic_data["root"], "semi=mean_teacher", "detector=retinanet", "detector.box_loss=giou",
                        "semi.threshold=gmm", "semi.burn_in=1", "semi.ema_decay=0.9", "semi.ema_time_constant=0.4",
                        "detector.detections_per_img=20", "trainer.max_epochs=2", "eval.plots=false"),
              run_dir=tmp_path)
    semi = m["semi"]
    assert semi["mode"] == "mean_teacher" and semi["settings"]["threshold"] == "gmm"
    per_class = semi["pseudo_labels"]["per_class"]
    assert all("threshold" in c for c in per_class.values())  # per-class GMM thresholds, not only a mean
    assert decays == [pytest.approx(0.5)] * 5  # semi.ema_decay=0.9 is not used
    assert _column(_csv_rows(tmp_path), "semi/ema_decay") == pytest.approx([0.5] * 5)
    assert semi["ema"]["decay_per_step"] == pytest.approx(0.5) and semi["ema"]["updates"] == 5
    best = torch.load(m["best_checkpoint"], weights_only=True)
    assert semi["deployed"] == best["weight_sets"]["deploy"] == "teacher"


def test_empty_weight_zero_and_deploy_best_run(synthetic_data, tmp_path):
    """The acceptance run `semi=unbiased_teacher semi.empty_weight=0 semi.deploy=best`, at threshold 1
    (no pseudo-box): every semi step's unsupervised loss is dropped, on Faster R-CNN too, and the
    deployed model is the one the rule picks from the validations' APs, in history, checkpoints
    and metrics.json alike."""
    from finetune.semi.module import deployed_by

    m = train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.empty_weight=0", "semi.deploy=best",
                        "semi.burn_in=1", "semi.ema_decay=0.5", "semi.threshold=1.0", "trainer.max_epochs=1",
                        "eval.plots=false"), run_dir=tmp_path)
    rows = _csv_rows(tmp_path)
    unsup = [float(r["train/unsup_loss"]) for r in rows if r.get("train/unsup_loss") and int(r["step"]) >= 1]
    assert unsup == [0.0, 0.0]  # the two semi steps
    assert _column(rows, "semi/empty_scaled") == [1.0]
    semi = m["semi"]
    assert semi["empty_scaled"] == 1.0 and semi["deploy"] == "best"
    assert semi["warnings"]["unsup_loss_zero"] == 0  # a dropped loss is not a dead one
    for h in m["history"]:
        assert h["deployed"] == deployed_by("best", h["val_student_AP"], h["val_teacher_AP"])
    best = torch.load(m["best_checkpoint"], weights_only=True)
    assert semi["deployed"] == best["weight_sets"]["deploy"] == best["semi"]["deploy"] == m["history"][-1]["deployed"]


def test_deploy_student_ema_ramp_pseudo_cap_and_first_step_health(synthetic_data, tmp_path, monkeypatch):
    decays = _record_ema(monkeypatch)
    m = train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.burn_in=1", "semi.ema_decay=0.7",
                        "semi.ema_ramp=true", "semi.threshold=0.0", "semi.max_pseudo_per_image=1",
                        "semi.pseudo_nms_iou=0.5", "semi.deploy=student", "detector.detections_per_img=20",
                        "trainer.max_epochs=2", "eval.plots=false"), run_dir=tmp_path)
    # Soft Teacher's ramp: min(0.7, 1 - 1/(t + 1)) at the t-th update since the teacher started.
    ramp = [0.0, 0.5, 2 / 3, 0.7, 0.7]
    assert decays == pytest.approx(ramp)
    rows = _csv_rows(tmp_path)
    assert _column(rows, "semi/ema_decay") == pytest.approx(ramp)
    semi = m["semi"]
    assert semi["ema"] == {"decay_per_step": 0.7, "last_update_decay": pytest.approx(0.7), "ramp": True, "updates": 5}
    # At most one pseudo-box per image (threshold 0 keeps up to 20 otherwise).
    per_step = _column(rows, "semi/pseudo_boxes_per_image")
    assert per_step and max(per_step) <= 1.0 and max(per_step) > 0
    assert 0 < semi["pseudo_labels"]["pseudo_boxes_per_image"] <= 1.0
    # The health of the semi phase's first step, logged at that step (before any validation).
    first = [r for r in rows if r.get("semi/images") and not r.get("val/AP")]
    assert [int(r["step"]) for r in first] == [1] and float(first[0]["semi/pseudo_boxes_per_image"]) == 1.0
    assert semi["pseudo_labels_first_step"]["images"] == 2 and semi["pseudo_labels_first_step"]["precision"] is not None
    # The student is deployed although a teacher exists.
    assert semi["deploy"] == "student" and semi["deployed"] == "student"
    assert all(h["deployed"] == "student" and h["val_teacher_AP"] is not None for h in m["history"])
    assert _column(rows, "val/AP") == _column(rows, "val/student_AP")
    assert _column(rows, "val/teacher_deployed") == [0, 0]
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["weight_sets"]["deploy"] == "student" and "teacher" in ckpt["weight_sets"]["prefixes"]
    assert load_detection_checkpoint(last).deployed_weights == "student"


@pytest.mark.slow  # 9 steps and 3 validations, ~20-40 s
def test_deploy_best_deploys_the_student_when_it_scores_higher(synthetic_data, tmp_path):
    """A teacher frozen at the initial weights (decay 1, no burn-in) against a student trained on the
    labels only (threshold 1, unsupervised loss dropped): once the student scores, best deploys it, and
    best.ckpt, whose val/AP is the deployed model's, names it."""
    from finetune.semi.module import deployed_by

    m = train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.burn_in=0", "semi.ema_decay=1.0",
                        "semi.threshold=1.0", "semi.empty_weight=0", "semi.deploy=best", "trainer.max_epochs=3",
                        "eval.plots=false"), run_dir=tmp_path)
    history = m["history"]
    assert all(h["deployed"] == deployed_by("best", h["val_student_AP"], h["val_teacher_AP"]) for h in history)
    won = [h for h in history if h["val_student_AP"] > h["val_teacher_AP"]]
    assert won, f"the student never beat the initial weights: {[h['val_student_AP'] for h in history]}"
    assert all(h["deployed"] == "student" and h["val_AP"] == h["val_student_AP"] for h in won)
    best = torch.load(m["best_checkpoint"], weights_only=True)
    assert best["weight_sets"]["deploy"] == m["semi"]["deployed"] == "student"


def test_semi_options_refuse_bad_values(synthetic_data, caplog):
    from finetune.semi.plan import check_config, check_unused

    root = synthetic_data["root"]
    bad = {"semi.empty_weight=-0.5": "empty_weight", "semi.pseudo_nms_iou=0": "pseudo_nms_iou",
           "semi.pseudo_nms_iou=1.5": "pseudo_nms_iou", "semi.max_pseudo_per_image=0": "max_pseudo_per_image",
           "semi.max_pseudo_per_image=many": "max_pseudo_per_image", "semi.max_pseudo_factor=0": "max_pseudo_factor",
           "semi.gmm_fallback=1.5": "gmm_fallback", "semi.ema_time_constant=0": "ema_time_constant",
           "semi.ema_time_constant=1.5": "ema_time_constant", "semi.deploy=ensemble": "semi.deploy",
           "semi.ema_ramp=sometimes": "ema_ramp", "semi.strong_view=heavy": "strong_view",
           "semi.rpn_threshold=1.5": "rpn_threshold", "semi.rpn_threshold=0.8": "rpn_threshold"}  # > threshold 0.7
    for override, key in bad.items():
        with pytest.raises((ValueError, TypeError), match=key):
            check_config(smoke_cfg(root, "semi=unbiased_teacher", override))
    check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.max_pseudo_per_image=labeled_max"))
    check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.max_pseudo_per_image=auto", "semi.pseudo_nms_iou=0.6",
                           "semi.ema_time_constant=1", "semi.ema_ramp=true", "semi.deploy=best", "semi.empty_weight=0"))
    # Teacher options without a teacher would do nothing: refused.
    with pytest.raises(ValueError, match="pseudo_nms_iou"):
        check_config(smoke_cfg(root, "semi=consistency", "detector=retinanet", "semi.pseudo_nms_iou=0.5"))
    with pytest.raises(ValueError, match="ema_ramp"):
        check_unused(smoke_cfg(root, "semi.ema_ramp=true"))
    with pytest.raises(ValueError, match="rpn_threshold"):  # RetinaNet has no RPN
        check_config(smoke_cfg(root, "semi=mean_teacher", "detector=retinanet", "semi.rpn_threshold=0.3"))
    with pytest.raises(ValueError, match="rpn_threshold"):
        check_unused(smoke_cfg(root, "semi.rpn_threshold=0.3"))
    with pytest.raises(ValueError, match="strong_view"):  # no mode of semi=none builds a strong view
        check_unused(smoke_cfg(root, "semi.strong_view=soft_teacher"))
    # The old key is read, with a deprecation warning.
    with caplog.at_level("WARNING"):
        check_config(smoke_cfg(root, "semi=mean_teacher", "detector=retinanet", "semi.empty_batch_weight=0.05"))
    assert "semi.empty_batch_weight is deprecated" in caplog.text


def test_soft_background_run_weights_the_pseudo_labeled_rois(synthetic_data, tmp_path, monkeypatch):
    from finetune.semi import focal, soft

    scored, weighted = [], []
    real_probability, real_loss = soft.background_probability, focal.softmax_focal_loss

    def spy_probability(teacher, tpass, boxes, sizes):
        scored.append(real_probability(teacher, tpass, boxes, sizes))
        return scored[-1]

    def spy_loss(logits, labels, gamma=1.5, weights=None):
        if weights is not None:
            weighted.append((labels.clone(), weights.clone()))
        return real_loss(logits, labels, gamma, weights)

    monkeypatch.setattr(soft, "background_probability", spy_probability)
    monkeypatch.setattr(focal, "softmax_focal_loss", spy_loss)
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.soft_background=true", *FAST)
    m = train(cfg, run_dir=tmp_path)
    assert m["semi"]["settings"]["soft_background"] is True
    # Every student step after burn-in scored its sampled RoIs with the teacher and weighted its
    # pseudo-labeled RoI loss with them (background RoIs: the teacher's probability, foreground: 1);
    # the labeled pass and the burn-in steps were never weighted.
    burn_in = int(cfg.semi.burn_in)
    assert len(scored) == len(weighted) == m["global_step"] - burn_in > 0
    for p_bg, (labels, w) in zip(scored, weighted):
        torch.testing.assert_close(w, torch.where(labels > 0, torch.ones_like(p_bg), p_bg))
    probs = torch.cat(scored)
    assert bool(((probs >= 0) & (probs <= 1)).all()) and float(probs.min()) < float(probs.max())
    assert m["history"][-1]["unsup_loss"] > 0
    with pytest.raises(ValueError, match="soft_background"):
        train(smoke_cfg(synthetic_data["root"], "semi=mean_teacher", "detector=retinanet",
                        "semi.soft_background=true", *FAST), run_dir=tmp_path / "retina")
    with pytest.raises(ValueError, match="soft_background"):
        train(smoke_cfg(synthetic_data["root"], "semi.soft_background=true"), run_dir=tmp_path / "none")


def test_rpn_threshold_gives_the_rpn_its_own_pseudo_boxes(synthetic_data, tmp_path, monkeypatch):
    """semi.rpn_threshold below semi.threshold: every semi step trains the RPN on the teacher's boxes
    above the lower score, any class, and the RoI head on those above semi.threshold only."""
    from finetune.semi import teacher_student

    counts = []
    real = teacher_student.two_target_losses

    def spy(model, images, rpn_targets, roi_targets):
        counts.append(([len(t["boxes"]) for t in rpn_targets], [len(t["boxes"]) for t in roi_targets]))
        return real(model, images, rpn_targets, roi_targets)

    monkeypatch.setattr(teacher_student, "two_target_losses", spy)
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", *FAST, "semi.threshold=0.9",
                    "semi.rpn_threshold=0.0", "semi.max_pseudo_per_image=labeled_max")
    m = train(cfg, run_dir=tmp_path)
    assert m["semi"]["settings"]["rpn_threshold"] == 0.0
    # labeled_max: the cap is the most boxes on one labeled image, for both box sets.
    labeled = json.loads(Path(m["train_ann_file"]).read_text())
    most = max(Counter(a["image_id"] for a in labeled["annotations"]).values())
    assert m["semi"]["labeled_max_boxes"] == m["semi"]["pseudo_cap_per_image"] == most
    assert max(n for rpn, roi in counts for n in rpn + roi) <= most
    assert len(counts) == m["global_step"] - int(cfg.semi.burn_in) > 0
    assert all(r >= o for rpn, roi in counts for r, o in zip(rpn, roi))
    assert sum(map(sum, (c[0] for c in counts))) > sum(map(sum, (c[1] for c in counts)))
    logged = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))
    assert any(row.get("semi/rpn_pseudo_boxes_per_image") for row in logged)


def test_soft_classes_run_trains_pseudo_labeled_rois_on_the_teachers_distribution(synthetic_data, tmp_path,
                                                                                  monkeypatch):
    """semi.soft_classes=background at threshold 1 (no RoI pseudo-box) with the RPN's own boxes at 0:
    every semi step scores the student's sampled RoIs with the teacher and trains them on its class
    distribution, and a batch counts as having pseudo-objects by its RPN boxes, so empty_weight=0
    does not drop it, nor does the "no pseudo-box" warning fire; without the RPN's boxes the same
    batches are empty, dropped and warned about. Refused with
    soft_background, without RoI heads, without a teacher, and at an unknown value."""
    from finetune.semi import soft
    from finetune.semi.plan import check_config, check_unused

    scored = []
    real = soft.class_probabilities

    def spy(teacher, tpass, boxes, sizes):
        scored.append(real(teacher, tpass, boxes, sizes))
        return scored[-1]

    monkeypatch.setattr(soft, "class_probabilities", spy)
    base = ("semi=unbiased_teacher", "semi.soft_classes=background", "semi.roi_focal_gamma=null",
            "semi.threshold=1.0", "semi.empty_weight=0",
            "semi.burn_in=1", "semi.ema_decay=0.5", "trainer.max_epochs=1", "eval.plots=false",
            "semi.warn_patience=1")
    m = train(smoke_cfg(synthetic_data["root"], *base, "semi.rpn_threshold=0.0"), run_dir=tmp_path / "rpn")
    assert m["semi"]["settings"]["soft_classes"] == "background"
    assert m["semi"]["warnings"]["no_pseudo_boxes"] == 0
    semi_steps = m["global_step"] - 1
    assert semi_steps > 0 and len(scored) == semi_steps
    probs = torch.cat(scored)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert probs.shape[1] == m["num_classes"] + 1 and float(probs[:, 1:].max()) > 0.01
    rows = _csv_rows(tmp_path / "rpn")
    assert all(v > 0 for v in _column(rows, "train/unsup_loss")[1:]) and _column(rows, "semi/empty_scaled") == [0.0]
    assert _column(rows, "semi/images_with_pseudo") and max(_column(rows, "semi/images_with_pseudo")) == 0.0

    m = train(smoke_cfg(synthetic_data["root"], *base), run_dir=tmp_path / "plain")
    assert m["semi"]["warnings"]["no_pseudo_boxes"] == 1
    rows = _csv_rows(tmp_path / "plain")
    assert _column(rows, "train/unsup_loss")[1:] == [0.0] * semi_steps and _column(rows, "semi/empty_scaled") == [1.0]

    root = synthetic_data["root"]
    with pytest.raises(ValueError, match="soft_background=false"):
        check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.soft_classes=all", "semi.soft_background=true",
                               "semi.roi_focal_gamma=null"))
    with pytest.raises(ValueError, match="roi_focal_gamma=null"):  # unbiased_teacher's gamma 1.5
        check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.soft_classes=all"))
    with pytest.raises(ValueError, match="soft_classes"):
        check_config(smoke_cfg(root, "semi=mean_teacher", "detector=retinanet", "semi.soft_classes=all"))
    with pytest.raises(ValueError, match="'background'"):
        check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.soft_classes=foreground",
                               "semi.roi_focal_gamma=null"))
    with pytest.raises(ValueError, match="soft_classes"):
        check_unused(smoke_cfg(root, "semi.soft_classes=background"))


def test_teacher_flip_run_pseudo_labels_from_the_view_and_its_mirror(synthetic_data, tmp_path, monkeypatch):
    """semi.teacher_flip=true: every semi step's pseudo-labels come from the teacher's RoI head averaged
    over each weak view and its mirror image (its mirrored features are there); the setting is
    recorded. Refused for a detector without RoI heads, at a non-boolean value and without a teacher."""
    from finetune.detectors import roi_ensemble
    from finetune.semi.plan import check_config, check_unused

    calls = []
    real = roi_ensemble.head_outputs

    def spy(teacher, tpass, rois):
        calls.append((tpass.mirrored_features is not None, sum(len(r) for r in rois)))
        return real(teacher, tpass, rois)

    monkeypatch.setattr(roi_ensemble, "head_outputs", spy)
    m = train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.teacher_flip=true", "semi.burn_in=1",
                        "semi.ema_decay=0.5", "trainer.max_epochs=1", "eval.plots=false"), run_dir=tmp_path)
    assert m["semi"]["settings"]["teacher_flip"] is True
    semi_steps = m["global_step"] - 1
    assert semi_steps > 0 and len(calls) == semi_steps  # one ensemble per step (no soft targets asked)
    assert all(mirrored and n > 0 for mirrored, n in calls)
    root = synthetic_data["root"]
    with pytest.raises(ValueError, match="teacher_flip"):
        check_config(smoke_cfg(root, "semi=mean_teacher", "detector=retinanet", "semi.teacher_flip=true"))
    with pytest.raises(TypeError, match="true or false"):
        check_config(smoke_cfg(root, "semi=unbiased_teacher", "semi.teacher_flip=yes"))
    with pytest.raises(ValueError, match="teacher_flip"):
        check_unused(smoke_cfg(root, "semi.teacher_flip=true"))


def test_extra_teachers_run_scores_each_step_with_the_other_detectors(synthetic_data, tmp_path, monkeypatch):
    """semi.extra_teachers=[run dir]: the other run's detector is loaded frozen and every semi step's
    ensemble includes it (with the mirror too); its weights stay untouched and out of the run's
    checkpoint. Refused as a string, for a detector without RoI heads, without a teacher, and for a
    detector of other classes."""
    from types import SimpleNamespace

    from finetune.detectors import roi_ensemble
    from finetune.semi.plan import check_config, check_unused
    from finetune.semi.teacher_student import load_extra_teachers
    from pretrain.core.data.label_map import LabelMap

    root = synthetic_data["root"]
    other_dir = tmp_path / "other"
    train(smoke_cfg(root, "trainer.max_epochs=1", "eval.plots=false", "seed=7"), run_dir=other_dir)
    before = torch.load(other_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    calls = []
    real = roi_ensemble.head_outputs

    def spy(teacher, tpass, rois):
        extra = tpass.extra or []
        calls.append((len(extra), all(m[2] is not None for m in extra)))
        for model, *_ in extra:
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        return real(teacher, tpass, rois)

    monkeypatch.setattr(roi_ensemble, "head_outputs", spy)
    m = train(smoke_cfg(root, "semi=unbiased_teacher", f"semi.extra_teachers=[{other_dir}]", "semi.teacher_flip=true",
                        "semi.burn_in=1", "semi.ema_decay=0.5", "trainer.max_epochs=1", "eval.plots=false"),
              run_dir=tmp_path / "semi")
    assert list(m["semi"]["settings"]["extra_teachers"]) == [str(other_dir)]
    semi_steps = m["global_step"] - 1
    assert semi_steps > 0 and calls == [(1, True)] * semi_steps
    kept = torch.load(tmp_path / "semi" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in kept} == {"model", "teacher"}  # the extra detector is not the run's
    after = torch.load(other_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError, match="list"):
        check_config(smoke_cfg(root, "semi=unbiased_teacher", f"semi.extra_teachers={other_dir}"))
    with pytest.raises(ValueError, match="extra_teachers"):
        check_config(smoke_cfg(root, "semi=mean_teacher", "detector=retinanet", f"semi.extra_teachers=[{other_dir}]"))
    with pytest.raises(ValueError, match="extra_teachers"):
        check_unused(smoke_cfg(root, f"semi.extra_teachers=[{other_dir}]"))
    from finetune.checkpoint import load_detection_checkpoint

    own = load_detection_checkpoint(other_dir / "checkpoints" / "best.ckpt")
    renamed = LabelMap(dict(own.label_map.label_to_cat_id), [f"{n}x" for n in own.label_map.class_names])
    with pytest.raises(ValueError, match="same classes"):
        load_extra_teachers([str(other_dir)], SimpleNamespace(model=own.model, label_map=renamed))
    with pytest.raises(FileNotFoundError):
        load_extra_teachers([str(tmp_path / "nowhere")], SimpleNamespace(model=own.model, label_map=own.label_map))


def test_strong_scale_run_moves_the_pseudo_boxes_with_the_zoomed_views(synthetic_data, tmp_path, monkeypatch):
    """semi.strong_scale=[0.5,1.5]: the strong views arrive zoomed with their maps, every semi step's
    pseudo-boxes (RoI and RPN) are moved into them and clipped, and the soft-background teacher
    scores the student's RoIs through the same map. Refused at a bad range and without a teacher."""
    from finetune.semi import soft
    from finetune.semi.plan import check_config, check_unused
    from finetune.semi.teacher_student import TeacherStudentMode

    moved, scored = [], []
    real_move, real_probs = TeacherStudentMode._in_strong_view, soft.class_probabilities

    def spy_move(targets, affines, sizes):
        out = real_move(targets, affines, sizes)
        moved.append((targets, affines, sizes, out))
        return out

    def spy_probs(teacher, tpass, boxes, sizes):
        scored.append(tpass.strong_affines)
        return real_probs(teacher, tpass, boxes, sizes)

    monkeypatch.setattr(TeacherStudentMode, "_in_strong_view", staticmethod(spy_move))
    monkeypatch.setattr(soft, "class_probabilities", spy_probs)
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", *FAST, "semi.strong_scale=[0.5,1.5]",
                    "semi.soft_background=true", "semi.rpn_threshold=0.0")
    m = train(cfg, run_dir=tmp_path)
    assert list(m["semi"]["settings"]["strong_scale"]) == [0.5, 1.5]
    semi_steps = m["global_step"] - int(cfg.semi.burn_in)
    assert len(moved) == 2 * semi_steps > 0 and len(scored) == semi_steps  # RoI and RPN boxes each step
    n_in = n_out = 0
    for targets, affines, sizes, out in moved:
        assert affines is not None and all(a.tolist() != [1.0, 1.0, 0.0, 0.0] for a in affines)
        for t, a, (h, w), o in zip(targets, affines, sizes, out):
            sx, sy, tx, ty = a.tolist()
            want = t["boxes"] * torch.tensor([sx, sy, sx, sy]) + torch.tensor([tx, ty, tx, ty])
            want[:, 0::2], want[:, 1::2] = want[:, 0::2].clamp(0, w), want[:, 1::2].clamp(0, h)
            keep = ((want[:, 2] - want[:, 0]) >= 1) & ((want[:, 3] - want[:, 1]) >= 1)
            torch.testing.assert_close(o["boxes"], want[keep])
            assert torch.equal(o["labels"], t["labels"][keep])
            n_in, n_out = n_in + len(t["boxes"]), n_out + len(o["boxes"])
    assert n_out > 0 and n_in >= n_out
    assert all(a is not None and len(a) > 0 for a in scored)

    root = synthetic_data["root"]
    for bad in ("[1.5,0.5]", "[0,1]", "2.0"):
        with pytest.raises(ValueError, match="strong_scale"):
            check_config(smoke_cfg(root, "semi=unbiased_teacher", f"semi.strong_scale={bad}"))
    with pytest.raises(ValueError, match="strong_scale"):
        check_unused(smoke_cfg(root, "semi.strong_scale=[0.5,1.5]"))


def test_roi_focal_on_unlabeled_keeps_the_labeled_loss_cross_entropy(synthetic_data, tmp_path, monkeypatch):
    """semi.roi_focal_on=unlabeled: every labeled pass trains the RoI classifier with plain
    cross-entropy (gamma 0, what labeled-only fine-tuning uses), every pseudo-labeled pass with the
    focal exponent; a value other than all / unlabeled is refused."""
    from finetune.semi import focal
    from finetune.semi.plan import check_config

    gammas = []
    real_loss = focal.softmax_focal_loss

    def spy_loss(logits, labels, gamma=1.5, weights=None):
        gammas.append(float(gamma))
        return real_loss(logits, labels, gamma, weights)

    monkeypatch.setattr(focal, "softmax_focal_loss", spy_loss)
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.roi_focal_on=unlabeled", *FAST)
    m = train(cfg, run_dir=tmp_path)
    semi_steps = m["global_step"] - int(cfg.semi.burn_in)
    assert semi_steps > 0 and gammas.count(1.5) == semi_steps and gammas.count(0.0) == m["global_step"]
    assert set(gammas) == {0.0, 1.5}
    with pytest.raises(ValueError, match="roi_focal_on"):
        check_config(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.roi_focal_on=labeled"))


def test_consistency_retinanet_run(synthetic_data, tmp_path):
    m = train(smoke_cfg(synthetic_data["root"], "semi=consistency", "detector=retinanet", "trainer.max_epochs=1"),
              run_dir=tmp_path)
    assert m["semi"]["mode"] == "consistency" and m["semi"]["deployed"] == "student"
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    cls = [float(r["train/consistency_cls"]) for r in rows if r.get("train/consistency_cls")]
    assert cls and all(torch.isfinite(torch.tensor(cls)))


def test_self_training_round_writes_pseudo_labels(synthetic_data, tmp_path):
    m = train(smoke_cfg(synthetic_data["root"], "semi=self_training", "semi.threshold=0.0", "semi.tta_flip=true",
                        "detector.detections_per_img=5", "trainer.max_epochs=1"), run_dir=tmp_path)
    pseudo = json.loads((tmp_path / "round1" / "pseudo_labels.json").read_text())
    n_unlabeled = len(json.loads((Path(synthetic_data["root"]) / "unlabeled.json").read_text())["images"])
    assert len(pseudo["images"]) == n_unlabeled
    assert pseudo["annotations"] and all(Path(im["file_name"]).is_absolute() for im in pseudo["images"])
    merged = json.loads((tmp_path / "round1" / "train_plus_pseudo.json").read_text())
    labeled = json.loads(Path(synthetic_data["train_json"]).read_text())
    assert len(merged["images"]) == len(labeled["images"]) + n_unlabeled
    assert len(merged["annotations"]) == len(labeled["annotations"]) + len(pseudo["annotations"])
    rounds = m["semi"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["pseudo_labels"]["precision"] is not None  # hidden ground truth scored
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "round1" / "metrics.json").is_file()


def test_unlabeled_views_keep_hidden_ground_truth_aligned(synthetic_data):
    root = Path(synthetic_data["root"])
    labeled = json.loads(Path(synthetic_data["train_json"]).read_text())
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(sorted(labeled["categories"], key=lambda c: c["id"]))}
    ds = UnlabeledDetectionImages(root / "unlabeled.json", cat_id_to_label=cat_to_label)
    assert ds.hidden_ground_truth and len(ds) == 16
    torch.manual_seed(0)
    seen_flip = {False: 0, True: 0}
    changed = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["weak"].shape == item["strong"].shape
        gt = item["ground_truth"]
        raw = ds.ground_truth[item["index"]]["boxes"]
        w = item["weak"].shape[-1]
        expect = torch.from_numpy(raw)
        if item["flipped"]:
            expect = torch.stack([w - expect[:, 2], expect[:, 1], w - expect[:, 0], expect[:, 3]], 1)
        torch.testing.assert_close(gt["boxes"], expect)
        seen_flip[item["flipped"]] += 1
        changed += int(not torch.equal(item["weak"], item["strong"]))
    assert seen_flip[True] and seen_flip[False]
    assert changed >= len(ds) - 2  # the strong view is augmented (all its steps skipped: p ~ 0.3%)


def test_unlabeled_views_at_the_detectors_working_size(tmp_path):
    """A 400x200 unlabeled photograph for a detector at (min 50, max 80) is viewed at 80x40, the size
    the detector resizes it to, with its hidden box scaled by the same factor (and flipped with the
    view); an image already smaller is left as it is."""
    from PIL import Image

    img = Image.new("RGB", (400, 200))
    img.paste((255, 255, 255), (100, 40, 160, 100))
    img.save(tmp_path / "a.png")
    Image.new("RGB", (60, 30), (9, 9, 9)).save(tmp_path / "b.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 200},
                       {"id": 2, "file_name": "b.png", "width": 60, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [100, 40, 60, 60], "iscrowd": 0}],
            "categories": [{"id": 5, "name": "square"}]}
    (tmp_path / "u.json").write_text(json.dumps(coco))
    ds = UnlabeledDetectionImages(tmp_path / "u.json", cat_id_to_label={5: 1}, working_size=(50, 80))
    for _ in range(4):
        item = ds[0]
        assert item["weak"].shape == item["strong"].shape == (3, 40, 80)
        box = [100 / 5, 40 / 5, 160 / 5, 100 / 5]
        if item["flipped"]:
            box = [80 - box[2], box[1], 80 - box[0], box[3]]
        torch.testing.assert_close(item["ground_truth"]["boxes"], torch.tensor([box]))
        x1, y1, x2, y2 = (round(v) for v in box)
        assert float(item["weak"][:, y1 + 2:y2 - 2, x1 + 2:x2 - 2].min()) > 0.9  # the square is under its box
    assert ds[1]["weak"].shape == (3, 30, 60)  # smaller than the working size: not upscaled here
    assert UnlabeledDetectionImages(tmp_path / "u.json", {5: 1})[0]["weak"].shape == (3, 200, 400)
    # semi.strong_view reaches the views: on the blank image b.png, Soft Teacher's view erases at most
    # 4 squares of side < 0.2 x 30 px, Unbiased Teacher's far more (5-20% of the image per pass)
    def erased(view: str) -> float:
        d = UnlabeledDetectionImages(tmp_path / "u.json", {5: 1}, strong_view=view)
        torch.manual_seed(0)
        total = 0.0
        for _ in range(30):
            strong = d[1]["strong"]
            background = strong.flatten(1).mode(1).values.reshape(3, 1, 1)
            total += float((strong != background).any(0).float().mean()) / 30
        return total
    soft_area, ut_area = erased("soft_teacher"), erased("unbiased_teacher")
    assert 0 < soft_area <= 4 * 5 * 5 / (30 * 60) and ut_area > 2 * soft_area, (soft_area, ut_area)
    with pytest.raises(ValueError, match="strong_view"):
        UnlabeledDetectionImages(tmp_path / "u.json", {5: 1}, strong_view="heavy")


def test_burn_in_reads_no_unlabeled_image(synthetic_data, tmp_path, monkeypatch):
    """During burn-in the teacher modes never look at the unlabeled batch, so none is read: the
    sampler hands placeholders for those steps; from the first semi step on, every image is read."""
    from finetune.semi import data

    reads = []
    real_views = data.UnlabeledDetectionImages._views

    def spy(self, index, img):
        reads.append(index)
        return real_views(self, index, img)

    monkeypatch.setattr(data.UnlabeledDetectionImages, "_views", spy)
    cfg = smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", *FAST, "semi.burn_in=3", "trainer.max_epochs=2")
    m = train(cfg, run_dir=tmp_path)
    semi_steps = m["global_step"] - 3
    assert semi_steps > 0 and len(reads) == semi_steps * int(cfg.data.batch_size)
    assert m["history"][-1]["unsup_loss"] > 0


def test_burn_in_sampler_matches_the_plain_stream_after_burn_in():
    """BurnInSampler: the same (index, seed) pairs as the plain sampler, with index -1 for the samples of
    steps before burn-in, counted across epochs and after a mid-epoch resume (start_at)."""
    from finetune.semi.plan import BurnInSampler
    from pretrain.core.run.resume import EpochSampler

    plain, skip = EpochSampler(10, 6, seed=4), BurnInSampler(10, 6, 4, batch=2, steps_per_epoch=3, burn_in_steps=4)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        skip.set_epoch(epoch)
        got, want = list(skip), list(plain)
        assert [s for _, s in got] == [s for _, s in want]
        steps = [epoch * 3 + pos // 2 for pos in range(6)]
        assert [i for i, _ in got] == [-1 if st < 4 else w for st, (w, _) in zip(steps, want)]
    skip.set_epoch(1)
    skip.start_at(2)  # resumed at step 4 of epoch 1: past burn-in, real indices
    assert [i for i, _ in skip] == [i for i, _ in want[2:]]
    assert UnlabeledDetectionImages.__getitem__(None, -1) == {"skipped": True}  # type: ignore[arg-type]


def test_burn_in_skipping_only_where_a_batch_is_a_step(synthetic_data):
    """Placeholders only on a plain one-process run: any DDP strategy (even one process) regroups the
    sampler's samples, gradient accumulation makes several batches a step, a consistency mode reads
    unlabeled images from the first step."""
    from finetune.semi.plan import burn_in_skip_steps

    def skip(*overrides, need=True):
        return burn_in_skip_steps(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.burn_in=7",
                                            *overrides), 3, need)

    assert skip() == 7 and skip("semi.burn_in_epochs=2") == 6
    assert skip("trainer.strategy=ddp", "trainer.devices=1") == 0
    assert skip("trainer.accumulate_grad_batches=2") == 0 and skip(need=False) == 0


def test_semi_needs_unlabeled_images(synthetic_data, tmp_path):
    with pytest.raises(ValueError, match="semi.unlabeled=PATH"):
        train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.unlabeled=null"), run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", f"semi.unlabeled={tmp_path}/nope"),
              run_dir=tmp_path / "b")


def test_init_from_starts_from_a_fine_tuned_detector(unbiased_run, synthetic_data, tmp_path):
    from finetune.module import DetectionModule
    from finetune.train import init_detector
    from pretrain.core.data.coco import CocoDetection

    best = unbiased_run / "checkpoints" / "last.ckpt"
    hp = torch.load(best, weights_only=True)["hyper_parameters"]
    fresh = DetectionModule(cfg=hp["cfg"], label_map=hp["label_map"], backbone_info=hp["backbone_info"])
    ds = CocoDetection(synthetic_data["train_json"], train=True)
    init_detector(fresh, best, ds)  # the deployed (teacher) weights
    teacher = _teacher(torch.load(best, weights_only=True)["state_dict"])
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in teacher.items())
    with pytest.raises(ValueError, match="other classes"):
        init_detector(fresh, best, CocoDetection(_two_class_json(synthetic_data, tmp_path), train=True))


def _two_class_json(synthetic_data, tmp_path: Path) -> Path:
    d = json.loads(Path(synthetic_data["train_json"]).read_text())
    keep = {c["id"] for c in d["categories"][:2]}
    d["categories"] = [c for c in d["categories"] if c["id"] in keep]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] in keep]
    root = Path(synthetic_data["train_json"]).parent
    d["images"] = [{**im, "file_name": str(root / im["file_name"])} for im in d["images"]]
    out = tmp_path / "two.json"
    out.write_text(json.dumps(d))
    return out


def test_teacher_updates_every_n_steps_with_the_compounded_decay(synthetic_data, tmp_path, monkeypatch):
    import finetune.semi.module as semi_module

    calls: list[tuple[int, float]] = []
    original = semi_module.ema_update

    def recording(teacher, student, decay):  # type: ignore[no-untyped-def]
        calls.append((int(student_step[0]), decay))
        return original(teacher, student, decay)

    student_step = [0]
    monkeypatch.setattr(semi_module, "ema_update", recording)
    real_step = semi_module.SemiDetectionModule.optimizer_step

    def step(self, *a, **k):  # type: ignore[no-untyped-def]
        student_step[0] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(semi_module.SemiDetectionModule, "optimizer_step", step)
    train(smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", *FAST, "semi.burn_in=0",
                    "semi.teacher_update_every=2", "semi.ema_decay=0.9", "eval.plots=false"), run_dir=tmp_path)
    assert [c[0] for c in calls] == [2] and calls[0][1] == pytest.approx(0.81)  # 3 steps: after the 2nd only


def test_a_new_semi_mode_is_one_registered_class(synthetic_data, tmp_path):
    """A mode registered here (no other file edited) trains inside fine-tuning's loop: its loss is
    added at its weight from the first step, its logs reach the CSV, metrics.json names it."""
    from finetune.detectors import capabilities_of
    from finetune.semi import SEMI_MODES, SemiMode, UnsupOutput, register_semi_mode

    steps: list[int] = []

    @register_semi_mode("toy_entropy")
    class ToyEntropy(SemiMode):
        """Entropy minimisation of the per-anchor objectness on the weak views (no teacher)."""

        requires = ("anchor_outputs",)
        after_burn_in = False

        def loss(self, module, unlabeled):  # type: ignore[no-untyped-def]
            batch, _ = module.model.transform([im.to(module.device) for im in unlabeled["weak"]])
            logits = capabilities_of(module.model).anchor_outputs(module.model, batch.tensors)[0]
            p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
            entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
            steps.append(int(module.global_step))
            return UnsupOutput(entropy, {"train/toy_entropy": entropy.detach()})

    try:
        assert ToyEntropy.name == "toy_entropy" and SEMI_MODES["toy_entropy"] is ToyEntropy
        m = train(smoke_cfg(synthetic_data["root"], "semi.mode=toy_entropy", "semi.unsup_weight=2.0",
                            "trainer.max_epochs=1", "trainer.max_steps=2", "eval.plots=false"), run_dir=tmp_path)
        assert steps == [0, 1] and m["global_step"] == 2
        assert m["semi"]["mode"] == "toy_entropy" and m["semi"]["deployed"] == "student"
        with open(tmp_path / "logs" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/toy_entropy")]
        assert len(rows) == 2
        for r in rows:  # loss = sup + weight * the mode's loss
            total = float(r["train/sup_loss"]) + 2.0 * float(r["train/toy_entropy"])
            assert float(r["train/loss_step"]) == pytest.approx(total, rel=1e-4)
        with pytest.raises(ValueError, match="registered twice"):
            register_semi_mode("toy_entropy")(ToyEntropy)
    finally:
        SEMI_MODES.pop("toy_entropy")
    with pytest.raises(ValueError, match="unknown semi.mode 'toy_entropy'"):
        train(smoke_cfg(synthetic_data["root"], "semi.mode=toy_entropy"), run_dir=tmp_path / "gone")


def test_a_mode_is_refused_by_the_capability_its_detector_lacks():
    from finetune.detectors import CAPABILITIES, DetectorCapabilities, require

    CAPABILITIES["test_only_plain"] = DetectorCapabilities(model_type=torch.nn.Identity, roi_heads=False,
                                                           sigmoid_classes=False)
    try:
        with pytest.raises(ValueError, match=r"semi=consistency needs a detector with anchor_outputs; detector="
                                             r"test_only_plain has not \(use detector=fasterrcnn or retinanet\)"):
            require("test_only_plain", ("anchor_outputs",), "semi=consistency")
        require("retinanet", ("anchor_outputs", "sigmoid_classes"), "x")  # has both: no error
    finally:
        CAPABILITIES.pop("test_only_plain")
