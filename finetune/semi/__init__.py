"""Semi-supervised detection: teacher-student training on labeled + unlabeled images, a layer on
fine-tuning (it uses fine-tuning's detectors, data, module and loop; fine-tuning knows nothing of it).

One file per mode, each registered under its ``semi.mode`` (:mod:`finetune.semi.base`):
``unbiased_teacher``, ``mean_teacher`` (both :mod:`finetune.semi.teacher_student`), ``consistency``,
``self_training``. :func:`run` is what ``python -m finetune semi=<mode>`` runs.
"""

from finetune.semi import consistency, mean_teacher, self_training, unbiased_teacher  # noqa: F401 (registers the modes)
from finetune.semi.base import SEMI_MODES, SemiMode, UnsupOutput, mode_class, register_semi_mode
from finetune.semi.plan import run

__all__ = ["SEMI_MODES", "SemiMode", "UnsupOutput", "mode_class", "register_semi_mode", "run"]
