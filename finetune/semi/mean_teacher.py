"""Mean Teacher (Tarvainen & Valpola 2017) for detection as Consistent Teacher uses it (Wang et al.,
CVPR 2023): an EMA teacher whose pseudo-labels train classification and box regression, with a fixed
or Consistent Teacher's per-class GMM threshold (``semi.threshold=gmm``). The settings are in
``conf/finetune/semi/mean_teacher.yaml``; the step is :mod:`finetune.semi.teacher_student`'s.
"""

from __future__ import annotations

from finetune.semi.base import register_semi_mode
from finetune.semi.teacher_student import TeacherStudentMode


@register_semi_mode("mean_teacher")
class MeanTeacher(TeacherStudentMode):
    """Pseudo-labels train classification and box regression (``semi.unsup_box_loss=true`` in its yaml)."""
