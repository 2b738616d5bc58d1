"""A trained detector as a Python object: images in, boxes out.

::

    from finetune.api import Detector

    detector = Detector.load("outputs/finetune/<date>/<time>")   # a run dir, a .ckpt or an exported .safetensors
    for det in detector(["a.jpg", "photos/"]):                    # files, folders, PIL images, tensors, arrays
        for d in det.as_dicts():
            print(det.source, d["class_name"], d["score"], d["bbox"])

It is made of the objects the command lines use: the checkpoint is rebuilt by
:func:`finetune.checkpoint.load_detection_checkpoint` (``weights_only=True``; ``weights="teacher"``
or ``"student"`` for teacher-student runs), images are read by the loader of ``finetune.predict``
(EXIF-upright RGB, refused past ``max_pixels``) and the model runs as :func:`finetune.inference.prepare`
sets it up (precision ``auto``: bf16 where computed natively; ``proposals``: the test-time budget).
Boxes come back in each image's own pixels (the detector resizes internally and maps its boxes
back), labelled with the annotation file's own category ids and names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from finetune.checkpoint import load_detection_checkpoint
from finetune.inference import InferenceSetup, prepare, set_test_budget
from finetune.module import DetectionModule
from finetune.predict import collect_images
from pretrain.core.data.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from pretrain.core.run.checkpoints import CKPT_DIR
from pretrain.core.run.precision import resolve_device

log = logging.getLogger(__name__)

# What one image can be; a list of them, or a folder (searched recursively), is a batch.
ImageLike = str | Path | Image.Image | torch.Tensor | np.ndarray
SAFETENSORS_KEY = "fewlabel_detector"  # the metadata entry of an exported .safetensors (finetune.export)


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint a run stands for: a file as given, a run dir's ``checkpoints/best.ckpt`` (the best
    val AP), else its ``checkpoints/last.ckpt``.

    Raises:
        FileNotFoundError: nothing there, or a folder without a checkpoint.
    """
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (p / CKPT_DIR / name).is_file():
                return p / CKPT_DIR / name
        raise FileNotFoundError(f"{p} holds no {CKPT_DIR}/best.ckpt or {CKPT_DIR}/last.ckpt; "
                                "give the run directory of `python -m finetune` or a .ckpt file")
    raise FileNotFoundError(f"{p} does not exist (give a run directory, a .ckpt or an exported .safetensors)")


def load_module(source: str | Path, weights: str = "auto") -> DetectionModule:
    """The trained detector of a run dir, a fine-tuning ``.ckpt`` or a ``.safetensors`` written by
    ``python -m finetune.export --format safetensors`` (which carries its own config and label map).

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: not a detector of this package; no such weight set.
    """
    path = resolve_checkpoint(source)
    if path.suffix == ".safetensors":
        if weights not in ("auto",):
            raise ValueError(f"{path} holds one detector (the one exported); weights={weights!r} applies to "
                             "checkpoints of teacher-student runs")
        return load_safetensors_detector(path)
    return load_detection_checkpoint(path, weights=weights)


def load_safetensors_detector(path: str | Path) -> DetectionModule:
    """Rebuild a detector from an exported ``.safetensors`` (weights + the config, label map and backbone
    description in its metadata); no pickle anywhere.

    Raises:
        ValueError: a safetensors file that is not a detector exported by this package, or whose
            weights do not fit the detector its metadata describes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SAFETENSORS_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file without the '{SAFETENSORS_KEY}' metadata: not a detector "
                         "written by `python -m finetune.export --format safetensors` (a backbone file goes to "
                         "backbone.checkpoint=... of a fine-tuning run instead)")
    info = json.loads(meta[SAFETENSORS_KEY])
    module = DetectionModule(cfg=info["cfg"], label_map=info["label_map"], backbone_info=info["backbone_info"])
    try:
        module.model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the detector its metadata describes: "
                         f"{str(e).splitlines()[0]}") from e
    if info.get("proposals") is not None or info.get("pre_nms") is not None:  # the budget it was exported at
        set_test_budget(module.model, info.get("proposals"), info.get("pre_nms"))
    module.deployed_weights = str(info.get("weights", "student"))
    module.checkpoint_epoch = info.get("checkpoint_epoch")
    return module.eval()


@dataclass
class Detections:
    """The detections of one image, strongest first.

    Attributes:
        source: the file, or ``"#<i>"`` for the i-th in-memory image of the call.
        width: the image's width in pixels (boxes are in this frame).
        height: its height.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in the image's pixels.
        scores: (N,) float32.
        labels: (N,) int64 detector labels 1..K.
        category_ids: the annotation file's category id of each detection.
        names: the class name of each detection.
        error: why the image could not be read (``errors="skip"``); then there are no detections.
    """

    source: str
    width: int
    height: int
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    category_ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    error: str | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def as_dicts(self) -> list[dict[str, Any]]:
        """One dict per detection: ``bbox`` [x, y, w, h] (COCO's box), ``box_xyxy``, ``score``,
        ``category_id``, ``class_name`` (the entries of ``finetune.predict``'s predictions.json)."""
        return [{"bbox": [x1, y1, x2 - x1, y2 - y1], "box_xyxy": [x1, y1, x2, y2], "score": s,
                 "category_id": c, "class_name": n}
                for (x1, y1, x2, y2), s, c, n in zip(self.boxes.tolist(), self.scores.tolist(),
                                                    self.category_ids, self.names)]

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results entries for this image under ``image_id``."""
        return [{"image_id": image_id, "category_id": d["category_id"], "bbox": d["bbox"], "score": d["score"]}
                for d in self.as_dicts()]


class Detector:
    """A trained detector: call it on images, get :class:`Detections` in each image's own pixels.

    Args:
        module: a loaded detector (:func:`load_module`); :meth:`load` is the usual way in.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``auto`` (bf16 where the hardware computes it natively, as training chose), ``32``,
            ``bf16-mixed`` or ``16-mixed``.
        proposals: the test-time budget (Faster R-CNN: RPN proposals per image; RetinaNet: candidates
            per level); None keeps the checkpoint's. 100 is the CPU fast path (README, "Inference").
        pre_nms: Faster R-CNN's RPN candidates per level before NMS (default: as ``proposals``).
        score: detections below this score are left out (the detector's own ``score_thresh`` applies first).
        batch_size: images per forward pass.
        max_pixels: refuse image files larger than this (None: no limit of ours).
        tta: None, or ``"flip"`` (Faster R-CNN): the RoI head averaged over each image and its mirror
            image (:mod:`finetune.inference`), at twice the backbone's cost.
    """

    def __init__(self, module: DetectionModule, device: str | torch.device = "auto", precision: str = "auto",
                 proposals: int | None = None, pre_nms: int | None = None, score: float = 0.5,
                 batch_size: int = 4, max_pixels: int | None = DEFAULT_MAX_PIXELS, tta: str | None = None) -> None:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {score}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.module = module
        self.device = resolve_device(str(device))
        self.setup: InferenceSetup = prepare(module.model, self.device, precision, proposals, pre_nms, tta)
        self.score = float(score)
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, source: str | Path, weights: str = "auto", **kwargs: Any) -> Detector:
        """The detector of a run directory, a ``.ckpt`` or an exported ``.safetensors``.

        Args:
            source: a run dir (its ``checkpoints/best.ckpt``, else ``last.ckpt``) or a file.
            weights: ``auto`` (the detector the run deployed), or ``teacher`` / ``student`` of a
                teacher-student run.
            **kwargs: :class:`Detector`'s settings (device, precision, proposals, score, ...).
        """
        return cls(load_module(source, weights), **kwargs)

    @property
    def model(self) -> torch.nn.Module:
        """The torchvision detector itself (eval mode, on :attr:`device`)."""
        return self.module.model

    @property
    def classes(self) -> list[dict[str, Any]]:
        """``{"label", "category_id", "name"}`` for every class, in label order."""
        lm = self.module.label_map
        return [{"label": i + 1, "category_id": c, "name": n}
                for i, (c, n) in enumerate(zip(lm.cat_ids, lm.class_names))]

    def __call__(self, images: ImageLike | Sequence[ImageLike], errors: str = "raise") -> list[Detections]:
        """Detect objects on ``images``: one image, a folder (recursive), or a list of them mixed.

        Tensors are (3, H, W) RGB, float in [0, 1] or uint8, or a (N, 3, H, W) batch; arrays are
        (H, W, 3) uint8 RGB (PIL's and imageio's layout). Returns one :class:`Detections` per image,
        in order (a folder's images sorted by path).

        Args:
            errors: an unreadable image file: ``raise`` (an ImageError naming it) or ``skip`` (logged,
                and returned with ``error`` set and no detections).
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        items = list(_expand(images))
        out: list[Detections] = []
        for start in range(0, len(items), self.batch_size):
            out += self._batch(items[start:start + self.batch_size], errors)
        return out

    predict = __call__

    @torch.no_grad()
    def _batch(self, items: Sequence[tuple[str, Any]], errors: str) -> list[Detections]:
        loaded: list[tuple[int, str, torch.Tensor]] = []
        results: list[Detections | None] = [None] * len(items)
        for i, (source, item) in enumerate(items):
            try:
                loaded.append((i, source, self._tensor(item)))
            except ImageError as e:
                if errors == "raise":
                    raise
                log.warning("skipped: %s", e)
                empty = torch.zeros((0, 4))
                results[i] = Detections(source, 0, 0, empty, empty[:, 0], empty[:, 0].long(), error=str(e))
        if loaded:
            with self.setup.autocast():
                outputs = self.setup.detect(self.model, [t.to(self.device) for _, _, t in loaded])
            lm = self.module.label_map
            for (i, source, image), det in zip(loaded, outputs):
                keep = det["scores"] >= self.score
                labels = det["labels"][keep].cpu()
                results[i] = Detections(
                    source, int(image.shape[-1]), int(image.shape[-2]), det["boxes"][keep].float().cpu(),
                    det["scores"][keep].float().cpu(), labels,
                    [lm.label_to_cat_id[int(k)] for k in labels], [lm.class_names[int(k) - 1] for k in labels])
        return [r for r in results if r is not None]

    def _tensor(self, item: Any) -> torch.Tensor:
        """A (3, H, W) float image in [0, 1] from a path, PIL image, tensor or array."""
        if isinstance(item, (str, Path)):
            item = load_rgb(item, max_pixels=self.max_pixels)
        if isinstance(item, Image.Image):
            return TF.to_dtype(TF.pil_to_tensor(item.convert("RGB")), torch.float32, scale=True)
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise ValueError(f"an array image must be (H, W, 3) uint8 RGB, got {item.shape} {item.dtype}")
            item = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1)
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise ValueError(f"a tensor image must be (3, H, W) RGB, got shape {tuple(item.shape)}")
            if item.dtype == torch.uint8:
                return TF.to_dtype(item, torch.float32, scale=True)
            if not item.is_floating_point():
                raise ValueError(f"a tensor image must be uint8 or float in [0, 1], got {item.dtype}")
            return item.float()
        raise TypeError(f"cannot read an image from {type(item).__name__}: give a path, a folder, a PIL image, "
                        "a (3, H, W) tensor or an (H, W, 3) uint8 array")


def _expand(images: Any) -> Iterator[tuple[str, Any]]:
    """(source name, item) per image: folders listed, (N, 3, H, W) tensors split, lists flattened."""
    if isinstance(images, (str, Path)):
        for p in collect_images([images]):
            yield str(p), p
        return
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        images = [images]
    n = 0
    for item in images:
        if isinstance(item, (str, Path)):
            yield from _expand(item)
        elif isinstance(item, torch.Tensor) and item.ndim == 4:
            for t in item:
                yield f"#{n}", t
                n += 1
        else:
            yield f"#{n}", item
            n += 1
