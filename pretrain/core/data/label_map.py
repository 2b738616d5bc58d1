"""Which categories of a COCO file become the detector's classes, and the saved numbering.

Classes are numbered 1..K in ascending category id; 0 is the detectors' background. A category
is a class if at least one annotation uses it, or if it is not a pure placeholder: a category with
no annotations whose name is the ``supercategory`` of another category (Roboflow exports carry one:
chess's id 0 "pieces"). So every category of a COCO-style file stays a class (the 80 of COCO remain
80 even in a small subset), a one-box stray category stays a class, and only the placeholder goes.
Validation and test sets must use the training set's numbering: ``label_map.json``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

LABEL_MAP_VERSION = 1


@dataclass(frozen=True)
class LabelMap:
    """Contiguous detector labels 1..K and the COCO category ids / names they stand for."""

    label_to_cat_id: dict[int, int]
    class_names: list[str]

    def __post_init__(self) -> None:
        labels = sorted(self.label_to_cat_id)
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"labels must be 1..K without gaps, got {labels}")
        if len(self.class_names) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(self.class_names)} class names")
        if len(set(self.label_to_cat_id.values())) != len(labels):
            raise ValueError("two labels map to the same category id")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: lbl for lbl, c in self.label_to_cat_id.items()}

    @property
    def cat_ids(self) -> list[int]:
        return [self.label_to_cat_id[lbl] for lbl in range(1, self.num_classes + 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LABEL_MAP_VERSION,
            "num_classes": self.num_classes,
            "classes": [
                {"label": lbl, "category_id": self.label_to_cat_id[lbl], "name": self.class_names[lbl - 1]}
                for lbl in range(1, self.num_classes + 1)
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelMap:
        try:
            rows = sorted(data["classes"], key=lambda r: int(r["label"]))
            return cls(
                {int(r["label"]): int(r["category_id"]) for r in rows},
                [str(r["name"]) for r in rows],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"not a label map ({e}); expected {{'classes': [{{label, category_id, name}}]}}") from e


class HasLabelMap(Protocol):
    """Anything that carries a label map (a :class:`pretrain.core.data.coco.CocoDetection`)."""

    label_map: LabelMap


def save_label_map(path: str | os.PathLike[str], ds: HasLabelMap | LabelMap) -> Path:
    """Write ``label_map.json`` (labels, category ids, names) for a dataset or label map.

    Args:
        path: the file to write, or a directory to write ``label_map.json`` into.
        ds: a :class:`pretrain.core.data.coco.CocoDetection` or a :class:`LabelMap`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "label_map.json"
    lm = ds if isinstance(ds, LabelMap) else ds.label_map
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lm.to_json(), indent=2) + "\n")
    return path


def load_label_map(path: str | os.PathLike[str]) -> LabelMap:
    """Read a ``label_map.json`` written by :func:`save_label_map` (file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "label_map.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"label map {path} not found") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"label map {path} is not valid JSON: {e}") from e
    try:
        return LabelMap.from_json(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def as_label_map(label_map: LabelMap | Mapping[int, int] | str | os.PathLike[str],
                 cats: Mapping[int, Mapping[str, Any]]) -> LabelMap:
    """A :class:`LabelMap` from one, a ``label_map.json`` path, or ``{label: category_id}`` (names
    taken from ``cats``, the file's categories by id)."""
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, (str, os.PathLike)):
        return load_label_map(label_map)
    mapping = {int(k): int(v) for k, v in label_map.items()}
    names = [str(cats.get(mapping[lbl], {}).get("name", f"category_{mapping[lbl]}"))
             for lbl in sorted(mapping)]
    return LabelMap(mapping, names)


def select_classes(categories: list[dict], annotations: list[dict]) -> LabelMap:
    """Apply the class rule of this module to a COCO file's categories and annotations."""
    used = Counter(a.get("category_id") for a in annotations)
    supercats = {c.get("supercategory") for c in categories}
    chosen = []
    for c in sorted(categories, key=lambda c: int(c["id"])):
        placeholder = used[c["id"]] == 0 and c["name"] in supercats and any(
            o["name"] != c["name"] and o.get("supercategory") == c["name"] for o in categories
        )
        if not placeholder:
            chosen.append(c)
    return LabelMap({i + 1: int(c["id"]) for i, c in enumerate(chosen)}, [str(c["name"]) for c in chosen])
