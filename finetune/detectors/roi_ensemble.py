"""A Faster R-CNN's RoI head averaged over views and models: the teacher's pass of the teacher-student
modes and the test-time flip of :mod:`finetune.inference`.

:func:`teacher_forward` runs a detector as ``GeneralizedRCNN.forward`` does in eval mode and keeps
its features, so that the same teacher can score more boxes later (the student's RoIs,
:mod:`finetune.semi.soft`); :func:`head_outputs` gives the RoI head's class probabilities and box
deltas for any boxes, averaged over the pass's views and models.

``teacher_forward(..., flip=True)`` (``semi.teacher_flip``) is Humble Teacher's teacher ensemble:
the teacher also sees each weak view's mirror image, and its RoI head's class probabilities and box
deltas for a box are the mean of the two views' (the mirror's deltas mirrored back: dx negated), for
the pseudo-labels (the detections decoded from the mean) and for the soft targets alike. The
proposals are the unmirrored view's RPN's (Humble Teacher averages the RPN too): the ensemble acts
where the teacher is least sure, the class of a box it has found.

``teacher_forward(..., extra=models)`` (``semi.extra_teachers``) widens the ensemble to other
detectors: frozen Faster R-CNNs trained on the same labels (e.g. with other seeds), whose RoI heads
score the same proposals on their own features (and, with ``flip``, on their own mirror features);
every view of every model weighs the same. On chess (split seed 1) two converged detectors averaged
this way reach 58.8 AP on the validation set against 54.5 and 55.9 alone (fp32): a teacher the
student has more to learn from than the mirror's +1.1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy boxes mirrored in an image of ``width``: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


@dataclass
class TeacherPass:
    """The teacher's detections (original image coordinates) and what scoring more boxes needs."""

    detections: list[dict[str, torch.Tensor]]
    features: dict[str, torch.Tensor]
    image_sizes: list[tuple[int, int]]  # after the teacher's resize, before padding
    original_sizes: list[tuple[int, int]] | None = None  # the weak views' sizes (the strong views' too)
    # Per image, the strong view's map from the weak view's coordinates (semi.strong_scale,
    # finetune.semi.views.scale_view); None: the views share their geometry.
    strong_affines: list[torch.Tensor] | None = None
    # semi.teacher_flip: the teacher's features of the weak views' mirror images (same sizes).
    mirrored_features: dict[str, torch.Tensor] | None = None
    # semi.extra_teachers: per extra detector, (model, its features, its mirror features or None,
    # its resized image sizes).
    extra: list[tuple[FasterRCNN, dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                      list[tuple[int, int]]]] | None = None


def transform_and_features(model: FasterRCNN, images: Sequence[torch.Tensor],
                           targets: Sequence[dict[str, torch.Tensor]] | None = None
                           ) -> tuple[ImageList, dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """``GeneralizedRCNN.forward``'s first steps: resize and normalise (with the targets' boxes), then
    the backbone's features as an ordered dict (a backbone without FPN gives one level, ``"0"``)."""
    batch, resized = model.transform(list(images), None if targets is None else list(targets))
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return batch, features, resized


def _mirror_features(model: FasterRCNN, images: Sequence[torch.Tensor],
                     sizes: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """``model``'s features of the mirror images of ``images`` (resized as the images were)."""
    mirrored, features, _ = transform_and_features(model, [im.flip(-1) for im in images])
    if [tuple(s) for s in mirrored.image_sizes] != [tuple(s) for s in sizes]:
        raise RuntimeError(f"the mirrored images were resized to {mirrored.image_sizes}, the images to {list(sizes)}")
    return features


@torch.no_grad()
def teacher_forward(teacher: FasterRCNN, images: Sequence[torch.Tensor], flip: bool = False,
                    extra: Sequence[FasterRCNN] = ()) -> TeacherPass:
    """The teacher's eval-mode detections of ``images``, with its FPN features kept.

    The same steps as torchvision's ``GeneralizedRCNN.forward`` in eval mode (resize and normalise,
    backbone, RPN, RoI heads, boxes back to the input size), so without ``flip`` and ``extra`` the
    detections are the ones ``teacher(images)`` returns. With ``flip`` (the teacher ensemble) the RoI
    head's outputs for the RPN's proposals are averaged with the mirrored images' and, with ``extra``
    (eval-mode detectors of the same classes), with each extra detector's for the same proposals
    (:func:`head_outputs`), before torchvision's post-processing (score threshold, per-class NMS,
    top detections).
    """
    if teacher.training or any(m.training for m in extra):
        raise ValueError("the teacher (and every extra teacher) must be in eval mode (its detections are the "
                         "eval-mode ones)")
    original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch, features, _ = transform_and_features(teacher, images)
    sizes = [(int(h), int(w)) for h, w in batch.image_sizes]
    proposals, _ = teacher.rpn(batch, features)
    if not flip and not extra:
        dets, _ = teacher.roi_heads(features, proposals, batch.image_sizes)
        return TeacherPass(teacher.transform.postprocess(dets, batch.image_sizes, original), features, sizes, original)
    tpass = TeacherPass([], features, sizes, original,
                        mirrored_features=_mirror_features(teacher, images, sizes) if flip else None)
    if extra:
        tpass.extra = []
        for model in extra:
            b, f, _ = transform_and_features(model, images)
            s = [(int(h), int(w)) for h, w in b.image_sizes]
            tpass.extra.append((model, f, _mirror_features(model, images, s) if flip else None, s))
    probs, deltas = head_outputs(teacher, tpass, proposals)
    # postprocess_detections takes logits and softmaxes them: the log of the mean is the logit whose
    # softmax is the mean (the clamp only keeps log(0) finite).
    boxes, scores, labels = teacher.roi_heads.postprocess_detections(
        probs.clamp_min(1e-12).log(), deltas, proposals, batch.image_sizes)
    dets = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]
    tpass.detections = teacher.transform.postprocess(dets, batch.image_sizes, original)
    return tpass


@torch.no_grad()
def head_outputs(teacher: FasterRCNN, tpass: TeacherPass, rois: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's RoI-head outputs for ``rois`` (per image, in its resized frame,
    ``tpass.image_sizes``): class probabilities (sum N_i, C) and box deltas (sum N_i, 4C), float32.

    With ``tpass.mirrored_features`` the mean over the view and its mirror image: the mirrored RoI
    (x1' = W - x2) pooled from the mirror's features, its deltas mirrored back (dx negated; dy, dw
    and dh are unchanged by a horizontal flip). With ``tpass.extra`` the mean also takes in each
    extra detector's outputs for the same RoIs (moved to its resized frame; box deltas are relative to
    the RoI, so they average across frames), each of its views weighing as much as one of the teacher's.
    """
    views: list[tuple[FasterRCNN, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[tuple[int, int]]]]
    views = [(teacher, tpass.features, tpass.mirrored_features, tpass.image_sizes), *(tpass.extra or [])]
    rois = list(rois)
    sign = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    prob_sum: torch.Tensor | None = None
    delta_sum: torch.Tensor | None = None
    count = 0
    for model, features, mirrored, sizes in views:
        heads = model.roi_heads
        boxes = rois if sizes == tpass.image_sizes else to_frame(rois, tpass.image_sizes, sizes)
        passes = [(features, boxes, False)]
        if mirrored is not None:
            passes.append((mirrored, [flip_boxes(r, w) for r, (_, w) in zip(boxes, sizes)], True))
        for feats, b, flipped in passes:
            logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, b, sizes)))
            probs, deltas = logits.float().softmax(-1), deltas.float()
            if flipped:
                deltas = (deltas.reshape(len(deltas), -1, 4) * sign.to(deltas)).reshape(deltas.shape)
            prob_sum = probs if prob_sum is None else prob_sum + probs
            delta_sum = deltas if delta_sum is None else delta_sum + deltas
            count += 1
    assert prob_sum is not None and delta_sum is not None
    return prob_sum / count, delta_sum / count


def to_frame(boxes: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]],
             target_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Boxes (x1, y1, x2, y2) of images resized to ``sizes``, expressed for the same images resized
    to ``target_sizes`` (per image, x scales by the width ratio and y by the height ratio)."""
    if len(boxes) != len(sizes) or len(sizes) != len(target_sizes):
        raise ValueError(f"{len(boxes)} box sets for {len(sizes)} and {len(target_sizes)} image sizes")
    out = []
    for b, (h, w), (th, tw) in zip(boxes, sizes, target_sizes):
        scale = b.new_tensor([tw / w, th / h, tw / w, th / h])
        out.append(b * scale)
    return out
