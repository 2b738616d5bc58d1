"""Unbiased Teacher (Liu et al., ICLR 2021): burn-in, EMA teacher, weak/strong views, pseudo-labels at
a fixed score, an unsupervised loss of the classification terms only (RPN objectness and RoI
classification), and a softmax focal loss on the RoI classifier against the class imbalance of
pseudo-labels. The settings are facebookresearch/unbiased-teacher's COCO ones
(``conf/finetune/semi/unbiased_teacher.yaml``); the step is :mod:`finetune.semi.teacher_student`'s.
"""

from __future__ import annotations

from finetune.semi.base import register_semi_mode
from finetune.semi.teacher_student import TeacherStudentMode


@register_semi_mode("unbiased_teacher")
class UnbiasedTeacher(TeacherStudentMode):
    """Pseudo-labels train classification only (``semi.unsup_box_loss=false`` in its yaml)."""
