"""Export a trained detector to ONNX, TorchScript or safetensors, checked against the original.

Usage::

    python -m finetune.export RUN_DIR_OR_CKPT [--format onnx|torchscript|safetensors] [--out FILE]
        [--weights auto|teacher|student] [--opset 17] [--proposals N] [--pre-nms N]
        [--images FILE_OR_FOLDER ...] [--num-images 8] [--box-tol 0.5] [--score-tol 0.001]

What each file holds (the model's own resize + normalisation in front, box decoding, NMS and the
mapping of boxes back to the input's pixels behind; the label map and those settings in its
metadata under ``fewlabel_detector``, a JSON string):

- ``onnx``: one RGB image per run, ``image`` float32 (3, H, W) in [0, 1], any H and W; outputs
  ``boxes`` (N, 4) x1 y1 x2 y2 in the input's pixels, ``scores`` (N,), ``labels`` (N,) int64 1..K
  (``classes[label - 1]`` in the metadata). The batch is one image: torchvision's detectors loop over
  a batch's images in Python, and the tracing exporter (the one torchvision documents and tests for
  its detectors) unrolls that loop, so a batch size would be fixed at export. Runs on onnxruntime
  alone.
- ``torchscript``: ``torch.jit.script`` of the detector: a list of any number of (3, H, W) images of
  any sizes in, a list of ``{"boxes", "scores", "labels"}`` out. Runs on ``torch`` + ``torchvision``
  alone (``import torchvision`` registers NMS and RoIAlign), metadata in the archive's extra file
  ``fewlabel_detector.json``.
- ``safetensors``: the detector's weights with its config, label map and backbone description in
  the metadata: no pickle, and :func:`finetune.api.Detector.load` rebuilds it (this package needed).

After writing, the exported model is run (onnxruntime, ``torch.jit.load``, or the rebuilt module) on
real images, by default the run's validation images, and its detections are matched with the
PyTorch model's (fp32, the same test-time budget): same label, boxes within ``--box-tol`` pixels,
scores within ``--score-tol``; a detection without a counterpart is allowed only at the edge of what
the model keeps (its score within ``--score-tol`` of the score threshold, or of the lowest kept score
when the output is full). The comparison is printed and written beside the file
(``<file>.verification.json``); a file that disagrees is renamed ``<file>.rejected`` and the export
fails, naming the images and by how much.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetRegressionHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as TF

from finetune.api import SAFETENSORS_KEY, load_module, load_safetensors_detector, resolve_checkpoint
from finetune.detectors.heads import SmoothL1RegressionHead
from finetune.detectors.retinanet import KClassRetinaNet
from finetune.inference import set_test_budget
from finetune.module import DetectionModule
from finetune.predict import collect_images
from pretrain.core.data.images import load_rgb
from pretrain.core.run.checkpoints import run_dir_of

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
FORMAT_VERSION = 1
META_KEY = SAFETENSORS_KEY  # the metadata entry in every format
TORCHSCRIPT_META = META_KEY + ".json"  # the extra file of a TorchScript archive
DEFAULT_OPSET = 17
# torchvision's detection ops (RoIAlign, NMS, dynamic resize) export from opset 11; the tracing
# exporter writes up to torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET (20 in torch 2.13).
MIN_OPSET = 11

# Subclasses that change training only (labels shifted for the K-class RetinaNet, a smooth-L1 beta in
# the loss): TorchScript compiles the training branch too and cannot compile their untyped Python,
# so the scripted copy uses the torchvision class (same inference) and re-applies the label shift.
_INFERENCE_CLASSES: dict[type[nn.Module], tuple[type[nn.Module], int]] = {
    KClassRetinaNet: (RetinaNet, 1),
    SmoothL1RegressionHead: (RetinaNetRegressionHead, 0),
}


class ExportMismatchError(ValueError):
    """The exported file's detections differ from the PyTorch model's beyond the tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """How close the exported model's detections must be to the PyTorch model's."""

    box_px: float = 0.5
    score: float = 1e-3

    def describe(self) -> str:
        return f"same labels, boxes within {self.box_px:g} px, scores within {self.score:g}"


@dataclass
class ImageComparison:
    """One image's detections, PyTorch against exported."""

    source: str
    reference: int
    exported: int
    matched: int
    max_box_px: float
    max_score: float
    unmatched: list[dict[str, Any]] = field(default_factory=list)  # [{"in", "label", "score", "edge"}]

    def ok(self, tol: Tolerance) -> bool:
        return self.max_box_px <= tol.box_px and self.max_score <= tol.score and all(u["edge"] for u in self.unmatched)


@dataclass
class Comparison:
    """The verification of an exported file on real images."""

    format: str
    tolerance: Tolerance
    images: list[ImageComparison]

    @property
    def ok(self) -> bool:
        """Every image within the tolerance, and something compared: a model that detects nothing on the
        images proves nothing about the file."""
        return self.compared > 0 and all(im.ok(self.tolerance) for im in self.images)

    @property
    def compared(self) -> int:
        return sum(im.matched for im in self.images)

    @property
    def max_box_px(self) -> float:
        return max((im.max_box_px for im in self.images), default=0.0)

    @property
    def max_score(self) -> float:
        return max((im.max_score for im in self.images), default=0.0)

    def table(self) -> str:
        lines = [(f"{'image':<32} {'pytorch':>7} {'exported':>8} {'matched':>7} {'max|dbox| px':>12} "
                  f"{'max|dscore|':>11}  verdict")]
        for im in self.images:
            edge = sum(u["edge"] for u in im.unmatched)
            verdict = "ok" if im.ok(self.tolerance) else "DIFFERS"
            if edge:
                verdict += f" ({edge} at the score cut, unmatched)"
            lines.append(f"{Path(im.source).name[-32:]:<32} {im.reference:>7} {im.exported:>8} {im.matched:>7} "
                         f"{im.max_box_px:>12.2e} {im.max_score:>11.2e}  {verdict}")
        verdict = "MATCHES" if self.ok else "DIFFERS from"
        lines.append(f"{self.format} {verdict} the PyTorch model on {len(self.images)} images "
                     f"({self.tolerance.describe()}): max box difference {self.max_box_px:.2e} px, "
                     f"max score difference {self.max_score:.2e}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "ok": self.ok, "tolerance": asdict(self.tolerance),
                "max_box_px": self.max_box_px, "max_score": self.max_score,
                "images": [asdict(im) for im in self.images]}

    def problems(self) -> str:
        """What differs, image by image (empty when it matches)."""
        out = []
        if not self.compared:
            out.append(f"the PyTorch model detects nothing above its score threshold on the {len(self.images)} "
                       "images, so nothing was compared; pass --images with objects it finds")
        for im in self.images:
            if im.ok(self.tolerance):
                continue
            why = []
            if im.max_box_px > self.tolerance.box_px:
                why.append(f"a box {im.max_box_px:.3g} px off")
            if im.max_score > self.tolerance.score:
                why.append(f"a score {im.max_score:.3g} off")
            missing = [u for u in im.unmatched if not u["edge"]]
            if missing:
                why.append(f"{len(missing)} detections without a counterpart (e.g. label {missing[0]['label']} "
                           f"score {missing[0]['score']:.3f} only in the {missing[0]['in']} output)")
            out.append(f"{im.source}: " + ", ".join(why))
        return "; ".join(out)


@dataclass
class ExportResult:
    path: Path
    comparison: Comparison
    metadata: dict[str, Any]


# ------------------------------------------------------------------------------------ metadata
def export_metadata(module: DetectionModule, fmt: str, source: Path, budget: dict[str, Any],
                    opset: int | None = None) -> dict[str, Any]:
    """What a user of the file needs besides the weights: input, what the model does inside, classes."""
    model = module.model
    transform: Any = model.transform
    heads: Any = getattr(model, "roi_heads", model)  # Faster R-CNN's thresholds sit on its RoI heads
    lm = module.label_map
    one = fmt == "onnx"
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "producer": "fewlabel-det python -m finetune.export",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": str(source),
        "weights": module.deployed_weights,
        "checkpoint_epoch": module.checkpoint_epoch,
        "detector": module.cfg["detector"]["name"],
        "arch": module.hparams["backbone_info"].get("arch"),
        "classes": [{"label": i + 1, "category_id": c, "name": n}
                    for i, (c, n) in enumerate(zip(lm.cat_ids, lm.class_names))],
        "input": {
            "name": "image" if one else "images",
            "layout": "(3, H, W)" if one else "list of (3, H, W)",
            "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB",
            "batch": "one image per run" if one else "any number of images, each its own size",
            "size": "any height and width",
        },
        "preprocessing": {
            "inside_the_model": True,
            "resize": {"min_size": list(transform.min_size), "max_size": int(transform.max_size)},
            "normalize": {"mean": list(transform.image_mean), "std": list(transform.image_std)},
        },
        "postprocessing": {
            "inside_the_model": True,
            "boxes": "x1, y1, x2, y2 in the input image's pixels",
            "labels": "1..K: classes[label - 1]",
            "score_thresh": float(getattr(heads, "score_thresh", module.cfg["detector"].get("score_thresh"))),
            "nms_thresh": float(heads.nms_thresh),
            "detections_per_img": int(heads.detections_per_img),
            "test_budget": budget,
        },
        "outputs": ["boxes", "scores", "labels"],
        "precision": "fp32",
        "opset": opset,
    }


# ------------------------------------------------------------------------------------ writers
class _ScriptedResize(GeneralizedRCNNTransform):
    """torchvision's test-time resize, sized as eager PyTorch sizes it, for TorchScript.

    Scripted (and traced) torchvision computes the scale in float32, eager PyTorch in double; at about
    half of all image sizes the two floor the resized side to sizes one pixel apart, and every box
    moves. Here the scale and the output size are computed in double, as eager does (TorchScript's
    ``float`` is a double)."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        h, w = image.shape[-2], image.shape[-1]
        scale = min(float(self.min_size[-1]) / float(min(h, w)), float(self.max_size) / float(max(h, w)))
        size = [math.floor(float(h) * scale), math.floor(float(w) * scale)]
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], target


class _TracedResize(GeneralizedRCNNTransform):
    """The same for the ONNX tracer: the size computed from the traced shape in double, so the graph
    keeps it a function of the input's height and width (a Python number would be frozen)."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        shape = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        # One-element double tensors: the exporter casts a Python number, or a 0-d tensor, to float32.
        lo, hi = (torch.tensor([float(v)], dtype=torch.float64) for v in (self.min_size[-1], self.max_size))
        scale = torch.min(lo / shape.min(), hi / shape.max())
        size = torch.floor(shape * scale).to(torch.float32)
        # Sizes as tensors, as F.interpolate itself hands them to the op when it is traced (its own
        # public signature takes ints only).
        out = torch._C._nn.upsample_bilinear2d(image[None], [size[0], size[1]], False, None)  # type: ignore[list-item]
        return out[0], target


def for_export(model: nn.Module, resize: type[GeneralizedRCNNTransform]) -> nn.Module:
    """An eval-mode copy of ``model`` whose test-time resize is ``resize`` (eager PyTorch's sizes)."""
    model = copy.deepcopy(model).eval()
    transform = model.transform
    if type(transform) is not GeneralizedRCNNTransform or transform.fixed_size is not None:  # type: ignore[union-attr]
        raise ValueError(f"{type(model).__name__} resizes with {type(transform).__name__}: the export knows how to "
                         "size torchvision's GeneralizedRCNNTransform (without fixed_size) only")
    transform.__class__ = resize
    return model


class _OneImage(nn.Module):
    """One image in, ``(boxes, scores, labels)`` out: the graph the ONNX file is traced from."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.model([image])[0]
        return det["boxes"], det["scores"], det["labels"]


class _ScriptedDetector(nn.Module):
    """A list of images in, a list of detections out, as a scripted torchvision detector returns them
    (scripted detectors return ``(losses, detections)``; the label shift of a K-class head added back)."""

    def __init__(self, model: nn.Module, label_offset: int) -> None:
        super().__init__()
        self.model = model
        self.label_offset = label_offset

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        _, detections = self.model(images)
        out: list[dict[str, torch.Tensor]] = []
        for d in detections:
            out.append({"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] + self.label_offset})
        return out


def check_opset(opset: int) -> None:
    """Raises ValueError for an opset the detector cannot be written in."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as max_opset

    if not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset {opset} is not supported: torchvision's detection ops (RoIAlign, NMS, the "
                         f"resize to any image size) export from opset {MIN_OPSET}, and torch's exporter writes "
                         f"up to {max_opset}; use --opset {MIN_OPSET}..{max_opset} (default {DEFAULT_OPSET})")


def write_onnx(model: nn.Module, path: Path, meta: dict[str, Any], opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``model`` (eval mode, fp32) into ``path``: dynamic height and width, metadata attached."""
    import onnx

    check_opset(opset)
    example = torch.rand(3, *_example_size(model))
    wrapper = _OneImage(for_export(model, _TracedResize)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python number taken from a tensor in torchvision's code; the
        # ones that matter for dynamic sizes are handled by torchvision's tracing paths, and the
        # verification below runs the file on other sizes than this example's.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["boxes", "scores", "labels"],
            dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                          "scores": {0: "detections"}, "labels": {0: "detections"}},
        )
    proto = onnx.load(str(path))
    for key, value in ((META_KEY, json.dumps(meta)),
                       ("names", json.dumps({c["label"]: c["name"] for c in meta["classes"]}))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{meta['detector']} detector of {len(meta['classes'])} classes; see metadata {META_KEY}"
    onnx.save(proto, str(path))
    return path


def scriptable(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` that ``torch.jit.script`` compiles, and the label offset its outputs need."""
    model = for_export(model, _ScriptedResize)
    offset = 0
    for m in model.modules():
        # The fp32 cast hooks (finetune.detectors.builders.fp32_head_outputs) do nothing in an fp32
        # export, and TorchScript compiles no Python hooks.
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        target = _INFERENCE_CLASSES.get(type(m))
        if target is not None:
            m.__class__, shift = target
            offset += shift
    return model, offset


def write_torchscript(model: nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """Script ``model`` into ``path`` (any batch, any size), metadata as an extra file of the archive."""
    inner, offset = scriptable(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(_ScriptedDetector(inner, offset))
    except Exception as e:
        raise ValueError(f"TorchScript cannot compile this {meta['detector']} detector: "
                         f"{str(e).strip().splitlines()[0]}; export it with --format onnx instead") from e
    torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
    return path


def write_safetensors(module: DetectionModule, path: Path, meta: dict[str, Any]) -> Path:
    """The detector's weights and what rebuilds it (config, label map, backbone description)."""
    from safetensors.torch import save_file

    hp = module.hparams
    info = {**meta, "cfg": hp["cfg"], "label_map": hp["label_map"], "backbone_info": hp["backbone_info"]}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.model.state_dict().items()}
    save_file(state, str(path), metadata={META_KEY: json.dumps(info)})
    return path


def _example_size(model: nn.Module) -> tuple[int, int]:
    """A tracing example of the size the model resizes to (any size works; this one costs least)."""
    side = int(max(model.transform.min_size))  # type: ignore[union-attr, arg-type]
    return side, side + side // 3


# ------------------------------------------------------------------------------------ runners
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def exported_runner(path: Path, fmt: str) -> Runner:
    """Run the exported file on one (3, H, W) image the way its users do (onnxruntime, torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(image: torch.Tensor) -> dict[str, torch.Tensor]:
            boxes, scores, labels = session.run(None, {"image": image.numpy()})
            return {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                    "labels": torch.from_numpy(labels)}

        return run_onnx
    if fmt == "torchscript":
        scripted = torch.jit.load(str(path), map_location="cpu")

        def run_script(image: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "(RCNN|RetinaNet) always returns")
                return dict(scripted([image])[0])

        return run_script
    model = load_safetensors_detector(path).model

    def run_rebuilt(image: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(model([image])[0])

    return run_rebuilt


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``fewlabel_detector`` metadata of an exported file, whatever its format."""
    p = Path(path)
    if p.suffix == ".onnx":
        import onnx

        props = {e.key: e.value for e in onnx.load(str(p), load_external_data=False).metadata_props}
        raw = props.get(META_KEY)
    elif p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    else:
        extra = {TORCHSCRIPT_META: ""}
        torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
        raw = extra[TORCHSCRIPT_META] or None
    if raw is None:
        raise ValueError(f"{p} carries no {META_KEY} metadata: not written by `python -m finetune.export`")
    return json.loads(raw)


# ------------------------------------------------------------------------------------ comparison
def compare_detections(source: str, ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                       score_cut: float, max_dets: int, tol: Tolerance) -> ImageComparison:
    """Pair each PyTorch detection with the exported one of the same label that overlaps it most
    (greedy, strongest first), and measure the pairs; an unpaired detection is ``edge`` when its
    score is within the tolerance of what the model keeps (the score threshold, or the lowest kept
    score of a full output), where a rounding difference legitimately decides whether it is kept."""
    rb, rs, rl = ref["boxes"].float(), ref["scores"].float(), ref["labels"].long()
    gb, gs, gl = got["boxes"].float(), got["scores"].float(), got["labels"].long()
    iou = box_iou(rb, gb) if len(rb) and len(gb) else torch.zeros(len(rb), len(gb))
    iou = torch.where(rl[:, None] == gl[None, :], iou, torch.full_like(iou, -1.0))
    taken: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for i in torch.argsort(rs, descending=True).tolist():
        row = iou[i].clone()
        if taken:
            row[list(taken)] = -1.0
        if len(row) and float(row.max()) > 0.5:
            j = int(row.argmax())
            taken.add(j)
            pairs.append((i, j))
    box = max((float((rb[i] - gb[j]).abs().max()) for i, j in pairs), default=0.0)
    score = max((float((rs[i] - gs[j]).abs()) for i, j in pairs), default=0.0)

    def cut(scores: torch.Tensor) -> float:
        return max(score_cut, float(scores.min())) if len(scores) >= max_dets else score_cut

    unmatched = []
    paired_ref = {i for i, _ in pairs}
    for name, scores, labels, paired, other in (("pytorch", rs, rl, paired_ref, gs), ("exported", gs, gl, taken, rs)):
        for k in range(len(scores)):
            if k not in paired:
                s = float(scores[k])
                unmatched.append({"in": name, "label": int(labels[k]), "score": s,
                                  "edge": s <= max(cut(scores), cut(other)) + tol.score})
    return ImageComparison(source, len(rb), len(gb), len(pairs), box, score, unmatched)


def verify_export(path: Path, fmt: str, module: DetectionModule, images: Sequence[Path],
                  tol: Tolerance = Tolerance()) -> Comparison:
    """Run the exported file and the PyTorch model (fp32) on ``images``, each also resized to another size
    and aspect, and compare their detections."""
    runner = exported_runner(path, fmt)
    model = module.model.eval().cpu()
    meta_post = export_metadata(module, fmt, path, {})["postprocessing"]
    results = []
    for p in images:
        image = TF.to_dtype(TF.pil_to_tensor(load_rgb(p)), torch.float32, scale=True)
        h, w = image.shape[-2:]
        # Each image also at another size and aspect: the file must size its input as the model does
        # at every size, not only at the validation set's.
        odd = TF.resize(image, [round(h * 0.77) + 1, round(w * 1.31) + 1], antialias=True).clamp(0, 1)
        for name, x in ((str(p), image), (f"{p}@{odd.shape[-1]}x{odd.shape[-2]}", odd)):
            with torch.no_grad():
                ref = model([x])[0]
            results.append(compare_detections(name, ref, runner(x), meta_post["score_thresh"],
                                              meta_post["detections_per_img"], tol))
    return Comparison(fmt, tol, results)


def verification_images(ckpt: Path, given: Sequence[str | Path] | None, num: int) -> list[Path]:
    """The images to check on: ``given`` (files / folders), else the run's validation images (its
    metrics.json names the annotation file and image folder)."""
    if num < 1:
        raise ValueError(f"--num-images must be at least 1, got {num}")
    if given:
        return collect_images(given)[:num]
    metrics = run_dir_of(ckpt) / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        ann, root = m.get("source_ann_file"), m.get("image_root")
        if ann and root and Path(ann).is_file():
            files = [Path(root) / im["file_name"] for im in json.loads(Path(ann).read_text())["images"]]
            found = [f for f in files if f.is_file()][:num]
            if found:
                return found
    raise FileNotFoundError(f"no images to verify the export on: {ckpt}'s run has no metrics.json naming "
                            "validation images that exist here; pass --images FILE_OR_FOLDER")


# ------------------------------------------------------------------------------------ the verb
def default_out(ckpt: Path, module: DetectionModule, fmt: str) -> Path:
    """``<run dir>/export/<detector>-<weights><suffix>``."""
    return run_dir_of(ckpt) / "export" / f"{module.cfg['detector']['name']}-{module.deployed_weights}{SUFFIXES[fmt]}"


def export_detector(
    source: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    weights: str = "auto",
    opset: int = DEFAULT_OPSET,
    proposals: int | None = None,
    pre_nms: int | None = None,
    images: Sequence[str | Path] | None = None,
    num_images: int = 8,
    tolerance: Tolerance = Tolerance(),
) -> ExportResult:
    """Export the detector of a run dir / checkpoint and verify the file on real images.

    Args:
        source: a run directory, a fine-tuning ``.ckpt`` or an exported ``.safetensors``.
        fmt: ``onnx``, ``torchscript`` or ``safetensors``.
        out: the file to write; default ``<run dir>/export/<detector>-<weights><suffix>``.
        weights: ``auto`` (the detector the run deployed), ``teacher`` or ``student`` (teacher-student runs).
        opset: the ONNX opset (11..20).
        proposals: test-time budget baked into the file (see :mod:`finetune.inference`); None keeps the checkpoint's.
        pre_nms: Faster R-CNN's RPN candidates per level before NMS.
        images: files / folders to verify on; default the run's validation images.
        num_images: at most this many images are verified on.
        tolerance: how close the exported detections must be.

    Raises:
        ValueError: an unknown format or opset, a checkpoint that is not a detector of this package
            (``ExportMismatchError``: the exported file disagrees; it is renamed ``<file>.rejected``).
        FileNotFoundError: no checkpoint, or no images to verify on.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unsupported export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        check_opset(opset)
    ckpt = resolve_checkpoint(source)
    module = load_module(ckpt, weights)
    module.model.eval().cpu()
    budget = set_test_budget(module.model, proposals, pre_nms)
    check_on = verification_images(ckpt, images, num_images)
    path = Path(out) if out is not None else default_out(ckpt, module, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = export_metadata(module, fmt, ckpt, budget, opset if fmt == "onnx" else None)
    meta["tolerance"] = asdict(tolerance)
    if fmt == "safetensors":
        meta["proposals"], meta["pre_nms"] = proposals, pre_nms
    writers: dict[str, Callable[[], Path]] = {
        "onnx": lambda: write_onnx(module.model, path, meta, opset),
        "torchscript": lambda: write_torchscript(module.model, path, meta),
        "safetensors": lambda: write_safetensors(module, path, meta),
    }
    writers[fmt]()
    comparison = verify_export(path, fmt, module, check_on, tolerance)
    report = Path(str(path) + ".verification.json")
    report.write_text(json.dumps({"file": str(path), **comparison.to_dict()}, indent=1))
    if not comparison.ok:
        rejected = path.with_name(path.name + ".rejected")
        path.replace(rejected)
        verdict = ("could not be verified against the PyTorch model" if not comparison.compared else
                   "disagrees with the PyTorch model beyond the tolerance")
        raise ExportMismatchError(
            f"the exported {fmt} model {verdict} ({tolerance.describe()}): {comparison.problems()}. The file was "
            f"renamed {rejected} so that it is not used; the comparison is in {report}")
    return ExportResult(path, comparison, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a fine-tuning run directory, its checkpoints/best.ckpt, or an exported "
                                       ".safetensors")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)} (default onnx)")
    parser.add_argument("--out", type=Path, default=None,
                        help="file to write (default <run dir>/export/<detector>-<weights><suffix>)")
    parser.add_argument("--weights", default="auto",
                        help="auto (the detector the run deployed), teacher or student (teacher-student runs)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (11..20)")
    parser.add_argument("--proposals", type=int, default=None,
                        help="test-time budget baked into the file (Faster R-CNN: RPN proposals per image; "
                             "RetinaNet: candidates per level); default the checkpoint's")
    parser.add_argument("--pre-nms", type=int, default=None, help="Faster R-CNN: RPN candidates per level")
    parser.add_argument("--images", nargs="+", default=None,
                        help="images / folders to verify on (default: the run's validation images)")
    parser.add_argument("--num-images", type=int, default=8, help="verify on at most this many images")
    parser.add_argument("--box-tol", type=float, default=Tolerance.box_px, help="pixels a box may differ by")
    parser.add_argument("--score-tol", type=float, default=Tolerance.score, help="how much a score may differ by")
    args = parser.parse_args(argv)
    try:
        result = export_detector(args.source, args.format, args.out, args.weights, args.opset, args.proposals,
                                 args.pre_nms, args.images, args.num_images, Tolerance(args.box_tol, args.score_tol))
    except ExportMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, ImportError) as e:  # UnsafeCheckpointError and CorruptCheckpointError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.comparison.table())
    print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB; "
          f"verification in {result.path}.verification.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
