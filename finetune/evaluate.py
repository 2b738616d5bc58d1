"""COCO evaluation of a trained detector checkpoint on a COCO-JSON set.

Usage::

    python -m finetune.evaluate CKPT --ann COCO_JSON [--images ROOT] [--out DIR]
        [--backend pycocotools|faster_coco_eval] [--batch-size 4] [--device auto]
        [--precision auto|32|bf16-mixed|16-mixed] [--proposals N] [--pre-nms N] [--tta none|flip]
        [--confusion-iou 0.5] [--confusion-score 0.5]

writes ``metrics.json`` (12-number COCO summary, per-class AP, the confusion matrix of
:mod:`finetune.confusion`, the annotation file used) and
``predictions.json`` (COCO results with the original category ids, original image coordinates)
into ``--out`` (default ``<run dir>/eval/<annotation file stem>``), and prints the table.
``--precision`` and ``--proposals``: see :mod:`finetune.inference` (what ran is in metrics.json's
``inference``). ``--confusion-iou`` / ``--confusion-score``: where a detection matches an object
and which detections count, for the confusion matrix only (AP uses every detection). ``--tta flip``
(Faster R-CNN, :mod:`finetune.inference`) evaluates the teacher ensemble of ``semi.teacher_flip``:
what that teacher would be worth on the evaluated set.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from finetune.checkpoint import load_detection_checkpoint
from finetune.coco_eval import BACKENDS, CocoEvalResult, evaluate_coco, evaluated_ground_truth
from finetune.coco_results import write_predictions
from finetune.confusion import confusion_matrix, format_confusion
from finetune.inference import InferenceSetup, add_inference_args, prepare, tta_arg
from finetune.module import DetectionModule
from finetune.transforms import build_transforms
from pretrain.core.data.coco import CocoDetection, collate_fn
from pretrain.core.run.checkpoints import run_dir_of, write_json
from pretrain.core.run.precision import resolve_device

log = logging.getLogger(__name__)
GROUND_TRUTH = "ground_truth.json"  # the evaluated (cleaned) ground truth, beside predictions.json


@torch.no_grad()
def predict_dataset(
    module: DetectionModule,
    dataset: CocoDetection,
    batch_size: int = 4,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    setup: InferenceSetup | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run the detector over a CocoDetection set (``setup``: from :func:`finetune.inference.prepare`;
    default: fp32 with the model's own test budget; its ``tta`` applies).

    Returns:
        COCO results (original category ids, boxes in the annotation file's image frame) and the
        ids of every image predicted on, including those without detections.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_fn)
    module.eval().to(device)
    preds: list[dict[str, Any]] = []
    ids: list[int] = []
    with setup.autocast() if setup is not None else contextlib.nullcontext():
        for images, targets in loader:
            for iid, dets in module.predict_coco(images, targets, dataset.coco,
                                                 tta=setup.tta if setup is not None else None).items():
                ids.append(iid)
                preds += dets
    return preds, ids


def evaluate_module(
    module: DetectionModule,
    dataset: CocoDetection,
    out_dir: str | Path,
    batch_size: int = 4,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    backend: str = "pycocotools",
    extra: Mapping[str, Any] | None = None,
    setup: InferenceSetup | None = None,
    confusion_iou: float = 0.5,
    confusion_score: float = 0.5,
) -> tuple[CocoEvalResult, list[dict[str, Any]], dict[str, Any]]:
    """Predict on ``dataset``, evaluate, write ``predictions.json`` and ``metrics.json`` into ``out_dir``.

    Args:
        extra: further metrics.json entries, written first (``stage``, ``backbone``, ...).
        confusion_iou, confusion_score: the confusion matrix's matching IoU and score floor.

    The confusion matrix is a diagnostic: should it fail, metrics.json is written without it (logged).

    Raises:
        ValueError: ``confusion_iou`` outside (0, 1].

    Returns:
        The evaluation result, the predictions and the metrics dict written.
    """
    out = Path(out_dir)
    if not 0.0 < confusion_iou <= 1.0:  # before the predictions, not after them
        raise ValueError(f"confusion_iou must be in (0, 1], got {confusion_iou}")
    t0 = time.perf_counter()
    preds, ids = predict_dataset(module, dataset, batch_size, num_workers, device, setup)
    t1 = time.perf_counter()
    names = dict(zip(module.label_map.cat_ids, module.label_map.class_names))
    result = evaluate_coco(dataset.coco, preds, image_ids=ids, class_names=names, backend=backend)
    t2 = time.perf_counter()
    # The loader cleaned the file (boxes clipped or dropped, sizes fixed): what was evaluated is
    # written beside the predictions and named in metrics.json, so pycocotools on the two files
    # gives these numbers; the file the user gave is kept as source_ann_file.
    evaluated = evaluated_ground_truth(dataset.coco)
    ground_truth = write_json(out / GROUND_TRUTH, evaluated)
    result.ann_file = str(ground_truth)
    write_predictions(out / "predictions.json", preds)
    metrics = {
        **dict(extra or {}),
        "detector": module.cfg["detector"]["name"],
        **result.to_dict(),
        "confusion": _confusion(evaluated, preds, ids, confusion_iou, confusion_score, names),
        "source_ann_file": str(dataset.ann_file),
        "image_root": str(dataset.image_root),
        "score_thresh": module.cfg["detector"].get("score_thresh"),
        "detections_per_img": module.cfg["detector"].get("detections_per_img"),
        "timing_s": {"predict": round(t1 - t0, 3), "coco_eval": round(t2 - t1, 3)},
        "inference": setup.as_dict() if setup is not None else None,
    }
    write_json(out / "metrics.json", metrics)
    return result, preds, metrics


def _confusion(ground_truth: Mapping[str, Any], preds: Sequence[Mapping[str, Any]], ids: Sequence[int],
               iou: float, score: float, names: Mapping[int, str]) -> dict[str, Any] | None:
    """:func:`finetune.confusion.confusion_matrix`, or None (logged) if it fails: a diagnostic must not
    cost a finished run its metrics.json."""
    try:
        return confusion_matrix(ground_truth, preds, ids, iou=iou, score=score, class_names=names)
    except Exception as e:  # noqa: BLE001
        log.warning("confusion matrix failed, metrics.json has none: %s", e)
        return None


def default_out_dir(ckpt: Path, ann_file: Path) -> Path:
    """``<run dir>/eval/<annotation stem>`` next to the checkpoint's run."""
    run_dir = run_dir_of(ckpt)
    stem = ann_file.stem if ann_file.stem not in ("_annotations.coco", "_annotations") else ann_file.parent.name
    return run_dir / "eval" / stem


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path, help="fine-tuning checkpoint (checkpoints/best.ckpt of a run)")
    parser.add_argument("--ann", type=Path, required=True, help="COCO JSON with the ground truth")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the JSON's folder)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/eval/<ann stem>)")
    parser.add_argument("--backend", choices=BACKENDS, default="pycocotools")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--weights", default="auto",
                        help="which of the checkpoint's weight sets: auto (the one the run deployed), student, "
                             "or teacher (teacher-student runs)")
    parser.add_argument("--missing", choices=("error", "skip"), default="error",
                        help="images whose files are missing: fail, or leave them out of the evaluation")
    parser.add_argument("--confusion-iou", type=float, default=0.5,
                        help="confusion matrix: the IoU at which a detection matches an object")
    parser.add_argument("--confusion-score", type=float, default=0.5,
                        help="confusion matrix: detections below this score are left out")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    module = load_detection_checkpoint(args.ckpt, weights=args.weights)
    dataset = CocoDetection(args.ann, args.images, transforms=build_transforms(train=False), train=False,
                            label_map=module.label_map, missing=args.missing)
    out = args.out or default_out_dir(args.ckpt, args.ann)
    device = resolve_device(args.device)
    setup = prepare(module.model, device, args.precision, args.proposals, args.pre_nms, tta_arg(args.tta))
    log.info("inference: %s", setup.as_dict())
    result, _, metrics = evaluate_module(
        module, dataset, out, batch_size=args.batch_size, num_workers=args.workers,
        device=device, backend=args.backend, setup=setup,
        confusion_iou=args.confusion_iou, confusion_score=args.confusion_score,
        extra={"stage": "evaluate", "checkpoint": str(args.ckpt), "checkpoint_epoch": module.checkpoint_epoch,
               "weights": module.deployed_weights,
               "backbone": module.hparams["backbone_info"].get("summary")},
    )
    print(f"{args.ann}: {result.num_images} images, {result.num_detections} detections")
    print(result.table())
    if metrics["confusion"] is not None:
        print(format_confusion(metrics["confusion"]))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.json'}")
    return metrics


if __name__ == "__main__":
    from pretrain.core.run.safe_load import run_cli

    run_cli(main)
