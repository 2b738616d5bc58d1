"""Semi-supervised detection: teacher-student training on labeled + unlabeled images, a layer on
fine-tuning (it uses fine-tuning's detectors, data, module and loop; fine-tuning knows nothing of it).

One file per mode, each registered under its ``semi.mode`` (:mod:`finetune.semi.base`):
``unbiased_teacher``, ``mean_teacher`` (both :mod:`finetune.semi.teacher_student`), ``consistency``,
``self_training``. :func:`run` is what ``python -m finetune semi=<mode>`` runs.
"""

import importlib
import pkgutil

from finetune.semi.base import SEMI_MODES, SemiMode, UnsupOutput, mode_class, register_semi_mode
from finetune.semi.plan import run

# Every file of this package is imported, so a new mode's file registers itself without an edit here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SEMI_MODES", "SemiMode", "UnsupOutput", "mode_class", "register_semi_mode", "run"]
