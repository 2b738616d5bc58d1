"""Run a trained detector on images or folders and draw the boxes.

Usage::

    python -m finetune.predict CKPT IMAGE_OR_FOLDER [...] [--out DIR] [--score 0.5] [--device auto]
        [--precision auto|32|bf16-mixed|16-mixed] [--proposals N] [--pre-nms N] [--tta none|flip]

writes ``predictions.json`` (per image: file, size and detections with ``bbox`` [x, y, w, h] in
the image's own pixels, score, original ``category_id`` and class name) and one PNG per image
with the boxes drawn into ``--out`` (default ``<run dir>/predict``). Unreadable files are
skipped with a message and counted, never silently. ``--precision`` and ``--proposals``: see
:mod:`finetune.inference`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from finetune.checkpoint import load_detection_checkpoint
from finetune.inference import InferenceSetup, add_inference_args, detect, prepare, tta_arg
from finetune.module import DetectionModule
from finetune.plots import PRED_COLOUR, draw_detections
from pretrain.core.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_rgb
from pretrain.core.data.unlabeled import list_images
from pretrain.core.run.checkpoints import run_dir_of, write_json
from pretrain.core.run.precision import resolve_device

log = logging.getLogger(__name__)


def collect_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (recursive), in the given order, without duplicates.

    Raises:
        FileNotFoundError: a source does not exist, or nothing was found.
    """
    found: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found += list_images(src)
        elif src.is_file():
            found.append(src)
        else:
            raise FileNotFoundError(f"{src} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, sources))}")
    return unique


@torch.no_grad()
def predict_images(
    module: DetectionModule,
    paths: Sequence[Path],
    out_dir: str | Path | None = None,
    score: float = 0.5,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    setup: InferenceSetup | None = None,
) -> list[dict[str, Any]]:
    """Detections >= ``score`` for every readable image; PNGs with the boxes into ``out_dir`` if given.

    ``setup``: from :func:`finetune.inference.prepare` (precision, proposal budget, test-time
    augmentation); default fp32 with the model's own budget."""
    model = module.model.eval().to(device)
    names = module.label_map.class_names
    to_cat = module.label_map.label_to_cat_id
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(paths)
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            try:
                batch.append((path, load_rgb(path, max_pixels=max_pixels)))
            except ImageError as e:
                log.warning("skipped: %s", e)
                results.append({"file": str(path), "error": str(e), "detections": []})
        if not batch:
            continue
        images = [TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True) for _, img in batch]
        with setup.autocast() if setup is not None else contextlib.nullcontext():
            outputs = detect(model, [im.to(device) for im in images], setup.tta if setup is not None else None)
        for (path, _), image, det in zip(batch, images, outputs):
            keep = det["scores"] >= score
            boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
            dets = [
                {
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(s), 5),
                    "label": int(lbl),
                    "category_id": to_cat[int(lbl)],
                    "class_name": names[int(lbl) - 1],
                }
                for (x1, y1, x2, y2), s, lbl in zip(boxes.tolist(), scores.tolist(), labels.tolist())
            ]
            entry: dict[str, Any] = {"file": str(path), "width": image.shape[-1], "height": image.shape[-2],
                                     "detections": dets}
            if out is not None:
                captions = [f"{d['class_name']} {d['score']:.2f}" for d in dets]
                width = max(2, round(max(image.shape[-2:]) / 400))
                drawn = draw_detections(image, boxes, captions, PRED_COLOUR, width)
                png = out / f"{stems[path]}.png"
                TF.to_pil_image(drawn).save(png)
                entry["drawn"] = str(png)
            results.append(entry)
    return results


def _unique_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Output names: the file stem, made unique with a counter when two inputs share one."""
    seen: dict[str, int] = {}
    out = {}
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        out[p] = p.stem if n == 0 else f"{p.stem}_{n}"
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path, help="fine-tuning checkpoint (checkpoints/best.ckpt of a run)")
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run dir>/predict)")
    parser.add_argument("--score", type=float, default=0.5, help="minimum score of a kept detection")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--weights", default="auto",
                        help="which of the checkpoint's weight sets: auto (the one the run deployed), student, "
                             "or teacher (teacher-student runs)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    module = load_detection_checkpoint(args.ckpt, weights=args.weights)
    paths = collect_images(args.images)
    run_dir = run_dir_of(args.ckpt)
    out = args.out or run_dir / "predict"
    device = resolve_device(args.device)
    setup = prepare(module.model, device, args.precision, args.proposals, args.pre_nms, tta_arg(args.tta))
    log.info("inference: %s", setup.as_dict())
    results = predict_images(module, paths, None if args.no_draw else out, score=args.score,
                             device=device, batch_size=args.batch_size, setup=setup)
    write_json(out / "predictions.json", {
        "checkpoint": str(args.ckpt),
        "score_thresh": args.score,
        "inference": setup.as_dict(),
        "classes": module.label_map.to_json()["classes"],
        "images": results,
    })
    failed = sum("error" in r for r in results)
    boxes = sum(len(r["detections"]) for r in results)
    print(f"{len(results) - failed} images, {boxes} detections >= {args.score}"
          + (f", {failed} unreadable files skipped" if failed else "") + f"; wrote {out / 'predictions.json'}")
    return results


if __name__ == "__main__":
    from pretrain.core.run.safe_load import run_cli

    run_cli(main)
