"""Detection fine-tuning (Faster R-CNN, RetinaNet) on few labels, evaluation and prediction."""
