"""Semi-supervised detection: teacher-student training on labeled + unlabeled images."""
