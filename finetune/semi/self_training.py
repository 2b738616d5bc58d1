"""Offline self-training: train, pseudo-label the unlabeled set, retrain on both, ``semi.rounds`` times.

A run directory holds one sub-run per round::

    round0/                    fine-tuning on the labeled set (the first teacher)
    round1/pseudo_labels.json  round 0's detections on the unlabeled images, score >= threshold (COCO)
    round1/train_plus_pseudo.json, round1/...   fine-tuning on labeled + pseudo-labeled images
    ...
    metrics.json               the last round's evaluation, with a ``semi`` section per round

Every round is an ordinary fine-tuning run, so a re-run resumes the unfinished round from its
``last.ckpt`` and skips finished rounds (those with a metrics.json) and written pseudo-label files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as TF

from finetune.checkpoint import load_detection_checkpoint
from finetune.data.cocofile import merge_coco
from finetune.data.labeled import resolve_data_paths
from finetune.module import DetectionModule
from finetune.semi.base import SemiMode, register_semi_mode
from finetune.semi.data import UnlabeledDetectionImages, unlabeled_source
from finetune.semi.health import PseudoLabelHealth
from finetune.semi.thresholds import build_threshold
from finetune.semi.views import flip_boxes
from finetune.train import train
from pretrain.core.run.checkpoints import save_config, write_json
from pretrain.core.run.precision import resolve_device

log = logging.getLogger(__name__)


@register_semi_mode("self_training")
class SelfTraining(SemiMode):
    """Rounds of whole fine-tuning runs, each on the labeled set plus the previous round's pseudo-labels."""

    in_loop: ClassVar[bool] = False

    @classmethod
    def run(cls, cfg: DictConfig, run_dir: Path, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        return self_train(cfg, run_dir, callbacks)


def self_train(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) every round; write the run's metrics.json with the per-round pseudo-label health."""
    save_config(cfg, run_dir)
    rounds = int(cfg.semi.rounds)
    if rounds < 1:
        raise ValueError(f"semi.rounds must be >= 1 for self_training, got {rounds}")
    source = unlabeled_source(cfg)
    paths = resolve_data_paths(cfg.data)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["semi"]["mode"] = "none"  # type: ignore[index, call-overload]
    round_cfg = OmegaConf.create(plain)
    assert isinstance(round_cfg, DictConfig)

    history: list[dict[str, Any]] = []
    metrics = _run_round(train, round_cfg, run_dir / "round0", callbacks)
    history.append({"round": 0, "train_json": str(paths.train_json), **_ap(metrics)})
    for r in range(1, rounds + 1):
        rdir = run_dir / f"round{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        pseudo_file = rdir / "pseudo_labels.json"
        health_file = rdir / "pseudo_label_health.json"
        if not pseudo_file.is_file() or not health_file.is_file():
            teacher = load_detection_checkpoint(metrics["best_checkpoint"])
            pseudo, health = pseudo_label(teacher, source, cfg, image_root=cfg.semi.get("image_root"))
            write_json(health_file, health)
            write_json(pseudo_file, pseudo)  # last: its presence marks the round's labels as done
        health = json.loads(health_file.read_text())
        merged = rdir / "train_plus_pseudo.json"
        labeled_root = (paths.train_images or paths.train_json.parent).resolve()
        write_json(merged, merge_coco([json.loads(paths.train_json.read_text()), json.loads(pseudo_file.read_text())],
                                      [labeled_root, labeled_root]))
        rcfg = round_cfg.copy()
        rcfg.data.train_json = str(merged)
        rcfg.data.train_images = None
        metrics = _run_round(train, rcfg, rdir, callbacks)
        history.append({"round": r, "pseudo_labels_file": str(pseudo_file), "train_json": str(merged),
                        "pseudo_labels": health, **_ap(metrics)})
        log.info("self-training round %d: %d pseudo-boxes on %d images; val AP %.4f", r,
                 health["boxes"], health["images"], metrics["coco"]["AP"] if metrics.get("coco") else float("nan"))
    final = {**metrics, "run_dir": str(run_dir), "semi": {
        "mode": "self_training",
        "settings": OmegaConf.to_container(cfg.semi, resolve=True),
        "deployed": f"round{rounds}",
        "rounds": history,
        "pseudo_labels": history[-1].get("pseudo_labels"),
    }}
    write_json(run_dir / "metrics.json", final)
    return final


def _run_round(train: Any, cfg: DictConfig, rdir: Path, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    done = rdir / "metrics.json"
    if done.is_file():
        log.info("%s is done (metrics.json); skipped", rdir)
        return json.loads(done.read_text())
    return train(cfg, rdir, callbacks=callbacks)


def _ap(metrics: dict[str, Any]) -> dict[str, Any]:
    coco = metrics.get("coco") or {}
    return {"val_AP": coco.get("AP"), "val_AP50": coco.get("AP50"), "best_checkpoint": metrics.get("best_checkpoint")}


@torch.no_grad()
def predict_with_flip(model: torch.nn.Module, images: list[torch.Tensor], tta_flip: bool,
                      nms_iou: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """The detector's outputs; with ``tta_flip``, merged with its outputs on the mirrored images (per-class NMS)."""
    outs = model(images)
    if not tta_flip:
        return outs
    flipped = model([im.flip(-1) for im in images])
    merged = []
    for im, a, b in zip(images, outs, flipped):
        boxes = torch.cat([a["boxes"], flip_boxes(b["boxes"], im.shape[-1])])
        scores = torch.cat([a["scores"], b["scores"]])
        labels = torch.cat([a["labels"], b["labels"]])
        keep = batched_nms(boxes, scores, labels, nms_iou)
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return merged


def pseudo_label(module: DetectionModule, source: Path, cfg: DictConfig, image_root: Any = None,
                 batch_size: int = 4) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO JSON of the teacher's confident detections on every unlabeled image, and their health.

    Images get absolute file names, so the merged training file works whatever its folder. With
    ``semi.threshold=gmm`` the per-class thresholds come from the GMM over all the set's scores.
    """
    device = resolve_device("auto")
    model = module.model.eval().to(device)
    k = module.label_map.num_classes
    ds = UnlabeledDetectionImages(source, cat_id_to_label=module.label_map.cat_id_to_label, strong=False,
                                  max_pixels=cfg.data.get("max_pixels"), image_root=image_root)
    tta = bool(cfg.semi.get("tta_flip", False))
    fallback = cfg.semi.get("gmm_fallback")
    threshold = build_threshold(cfg.semi.threshold, k, gmm_fallback=0.5 if fallback is None else float(fallback))
    kept: list[tuple[int, Path, tuple[int, int], dict[str, torch.Tensor]]] = []
    for start in range(0, len(ds), batch_size):
        batch = []
        for i in range(start, min(len(ds), start + batch_size)):
            img = ds.images.load(i)
            if img is not None:
                batch.append((i, TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)))
        if not batch:
            continue
        dets = predict_with_flip(model, [im.to(device) for _, im in batch], tta)
        dets = [{key: v.cpu() for key, v in d.items()} for d in dets]
        threshold.update(dets)
        kept += [(i, ds.images.paths[i], tuple(im.shape[-2:]), d) for (i, im), d in zip(batch, dets)]
    # Thresholds are applied after the whole pass, so a GMM sees every image's scores.
    health = PseudoLabelHealth(k, module.label_map.class_names)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    filtered = threshold.filter([d for *_, d in kept])
    for (i, path, (h, w), _), d in zip(kept, filtered):
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": str(Path(path).resolve()), "width": int(w), "height": int(h)})
        for box, label, score in zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": module.label_map.label_to_cat_id[int(label)],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0, "score": float(score)})
        gt: list[dict[str, torch.Tensor] | None] | None = None
        if ds.ground_truth is not None:
            g = ds.ground_truth[i]
            gt = [{"boxes": torch.from_numpy(g["boxes"]), "labels": torch.from_numpy(g["labels"])}]
        health.update([d], gt)
    lm = module.label_map
    categories = [{"id": cid, "name": name} for cid, name in zip(lm.cat_ids, lm.class_names)]
    summary = health.summary(threshold.thresholds())
    summary.update({"images": len(images), "boxes": len(annotations), "skipped_images": len(ds.skipped),
                    "tta_flip": tta})
    coco = {"info": {"description": "pseudo-labels", "source": str(source), "tta_flip": tta,
                     "thresholds": [float(t) for t in threshold.thresholds()]},
            "images": images, "annotations": annotations, "categories": categories}
    return coco, summary
