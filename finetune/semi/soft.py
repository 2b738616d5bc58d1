"""Soft Teacher's background weighting of the pseudo-labeled RoI classification loss, and soft
class targets.

With few labels the teacher finds only part of the objects on an unlabeled image (chess, 20
labeled images, threshold 0.5: pseudo-label recall 48% at precision 80%, BENCHMARKS.md's semi
probes), and every object it misses is trained as background. Soft Teacher (Xu et al.,
"End-to-End Semi-Supervised Object Detection with Soft Teacher", ICCV 2021) weights each
background RoI of the student by the teacher's own background probability for that box: a
proposal the teacher thinks is probably an object costs little as background, one it is sure is
background costs fully. Foreground RoIs weight 1 and the classification loss is
``sum(w * l) / max(sum(w), 1)``.

The student's sampled proposals live in the coordinates of the student's resized strong view; the
teacher scores them on its features of the weak view of the same image. The views differ only in
colour and erasing (:mod:`finetune.semi.views`), so one box is the same object in both, up to the
two resizes, which :func:`to_frame` undoes; with ``semi.strong_scale`` the strong view's zoom and
crop are undone too (``TeacherPass.strong_affines``).

:func:`teacher_forward` runs the teacher as ``GeneralizedRCNN.forward`` does in eval mode and keeps
its features; :func:`soft_background` installs the weighting on the student's RoI head for one
forward pass.

:func:`soft_classes` goes one step further (``semi.soft_classes``): a sampled RoI trains against
the teacher's whole class distribution for its box, not a thresholded label. On chess the
converged teacher finds 92% of the pieces class-agnostically but its thresholded pseudo-labels
recall 44-72% of them (BENCHMARKS.md): the rest, pieces it is unsure of the class of, train as
(down-weighted) background. With ``background`` those RoIs learn the teacher's belief instead;
``all`` gives every sampled RoI the teacher's distribution, the soft targets of Humble Teacher
(Tang et al., "Humble Teacher Teaches Better Students for Semi-Supervised Object Detection",
CVPR 2021).

The teacher's pass and its ensembles (``semi.teacher_flip``, ``semi.extra_teachers``) are
:mod:`finetune.detectors.roi_ensemble`'s, shared with test-time augmentation (``--tta flip``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_area, clip_boxes_to_image

from finetune.detectors.roi_ensemble import (  # noqa: F401 (re-exported: the semi modes' names for them)
    TeacherPass,
    head_outputs,
    teacher_forward,
    to_frame,
    transform_and_features,
)
from finetune.semi.focal import FocalRoIHeads
from finetune.semi.views import unmap_boxes


@torch.no_grad()  # called inside the student's forward: nothing of the teacher's may enter its graph
def class_probabilities(teacher: FasterRCNN, tpass: TeacherPass, boxes: Sequence[torch.Tensor],
                        box_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The teacher's class distribution (softmax of its RoI classifier, background at 0) for each box;
    with ``tpass.mirrored_features``, the mean with the mirror image's (:func:`head_outputs`).

    Args:
        teacher: the eval-mode teacher that produced ``tpass``.
        tpass: :func:`teacher_forward`'s result for the images the boxes belong to.
        boxes: per image, (N_i, 4) boxes in the coordinates of that image resized to ``box_sizes[i]``.
        box_sizes: the (height, width) the boxes' images were resized to (the student's).

    Returns:
        (sum N_i, C) float32 probabilities, rows summing to 1, in the order of ``boxes``.
    """
    rois = [b.detach().float() for b in boxes]
    if tpass.strong_affines is None:
        rois = to_frame(rois, box_sizes, tpass.image_sizes)
    else:  # the student's resize undone, the strong view's zoom undone, then the teacher's resize
        if tpass.original_sizes is None:
            raise ValueError("a TeacherPass with strong_affines needs original_sizes")
        weak = [unmap_boxes(b, a) for b, a in zip(to_frame(rois, box_sizes, tpass.original_sizes),
                                                 tpass.strong_affines)]
        # A zoomed-out view is padded: a RoI mostly on the padding shows the teacher nothing of the
        # image, so it is background (one-hot) rather than the teacher's guess at features it never saw.
        clipped = [clip_boxes_to_image(b, size) for b, size in zip(weak, tpass.original_sizes)]
        outside = torch.cat([box_area(c) < 0.5 * box_area(b) for b, c in zip(weak, clipped)])
        rois = to_frame(clipped, tpass.original_sizes, tpass.image_sizes)
    probs, _ = head_outputs(teacher, tpass, rois)
    if tpass.strong_affines is not None:
        probs[outside] = F.one_hot(torch.zeros_like(outside[outside], dtype=torch.long), probs.shape[-1]).float()
    return probs


def background_probability(teacher: FasterRCNN, tpass: TeacherPass, boxes: Sequence[torch.Tensor],
                           box_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The teacher's background probability (:func:`class_probabilities`' column 0) for each box:
    (sum N_i,) float32 in [0, 1]."""
    return class_probabilities(teacher, tpass, boxes, box_sizes)[:, 0]


@contextlib.contextmanager
def soft_background(student: FasterRCNN, teacher: FasterRCNN, tpass: TeacherPass) -> Iterator[None]:
    """Within the block, the student's RoI classification loss weights its background RoIs by the
    teacher's background probability (the student's head must be a :class:`FocalRoIHeads`; gamma 0
    is plain cross-entropy)."""
    heads = student.roi_heads
    if not isinstance(heads, FocalRoIHeads):
        raise TypeError("soft background weighting needs the student's RoI head to be a FocalRoIHeads "
                        f"(use_focal_roi_heads), got {type(heads).__name__}")

    def weights(proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        return background_probability(teacher, tpass, proposals, image_shapes)

    heads.background_weights = weights
    try:
        yield
    finally:
        heads.background_weights = None


@contextlib.contextmanager
def soft_classes(student: FasterRCNN, teacher: FasterRCNN, tpass: TeacherPass,
                 on: str = "background") -> Iterator[None]:
    """Within the block, the student's sampled RoIs that ``on`` names (``background``: those sampled
    as background; ``all``: every one) train against the teacher's class distribution for the same
    box (:func:`class_probabilities`), the others against their pseudo-label."""
    heads = student.roi_heads
    if not isinstance(heads, FocalRoIHeads):
        raise TypeError("soft class targets need the student's RoI head to be a FocalRoIHeads "
                        f"(use_focal_roi_heads), got {type(heads).__name__}")
    if on not in ("background", "all"):
        raise ValueError(f"soft class targets on {on!r}: use 'background' or 'all'")

    def targets(proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        return class_probabilities(teacher, tpass, proposals, image_shapes)

    heads.soft_targets, heads.soft_targets_on = targets, on
    try:
        yield
    finally:
        heads.soft_targets, heads.soft_targets_on = None, "background"
