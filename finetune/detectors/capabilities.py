"""What each detector can do, registered beside its builder, so that the rest of the code asks instead
of testing class names or attributes.

Inference sets the test-time budget through :attr:`DetectorCapabilities.set_test_budget`; the semi
stage's consistency loss reads per-anchor outputs through :attr:`~DetectorCapabilities.anchor_outputs`;
config checks refuse a combination by the capability it lacks (:func:`require`), with one message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# (model, proposals, pre_nms) -> the budget now in force, by the detector's own setting names.
TestBudgetSetter = Callable[[nn.Module, "int | None", "int | None"], dict[str, int]]
# (model, normalised image batch) -> per-anchor class logits (N, A, C), box deltas (N, A, 4),
# the feature grid sizes (h, w) per level and the anchors per location.
AnchorOutputs = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], int]]


@dataclass(frozen=True)
class DetectorCapabilities:
    """One detector's abilities.

    Attributes:
        model_type: the class its builder returns (how a built model finds its entry).
        roi_heads: a two-stage RoI head (torchvision's ``RoIHeads``: RoI losses can be re-weighted,
            the RoI classifier swapped for a focal one, proposals scored by another model).
        sigmoid_classes: K sigmoid classifiers over dense anchors (no background class); its loss on
            an image without boxes sums over every anchor.
        set_test_budget: sets the test-time candidate budget in place; None if it has none.
        anchor_outputs: per-anchor outputs for anchor-level consistency; None if it has none.
    """

    model_type: type[nn.Module]
    roi_heads: bool
    sigmoid_classes: bool
    set_test_budget: TestBudgetSetter | None = None
    anchor_outputs: AnchorOutputs | None = None

    def has(self, capability: str) -> bool:
        value = getattr(self, capability)
        return bool(value) if not callable(value) else True


CAPABILITIES: dict[str, DetectorCapabilities] = {}


def register_capabilities(name: str, capabilities: DetectorCapabilities) -> None:
    if name in CAPABILITIES:
        raise ValueError(f"detector {name!r} has its capabilities registered twice")
    CAPABILITIES[name] = capabilities


def capabilities_for(name: str) -> DetectorCapabilities:
    """The capabilities registered for ``detector.name``."""
    if name not in CAPABILITIES:
        raise ValueError(f"detector {name!r} registered no capabilities; registered: {sorted(CAPABILITIES)}")
    return CAPABILITIES[name]


def capabilities_of(model: nn.Module) -> DetectorCapabilities:
    """The capabilities of a built detector, found by its class: the registered class nearest to it in
    its method resolution order (a subclass of FasterRCNN registered by itself gets its own entry)."""
    mro = type(model).__mro__
    found = [caps for caps in CAPABILITIES.values() if caps.model_type in mro]
    if found:
        return min(found, key=lambda caps: mro.index(caps.model_type))
    raise TypeError(f"{type(model).__name__} is not a registered detector type "
                    f"({', '.join(c.model_type.__name__ for c in CAPABILITIES.values())})")


def require(detector: str, needs: Iterable[str], what: str) -> None:
    """Refuse ``what`` (e.g. ``semi=consistency``) on a detector that lacks a capability it needs.

    Raises:
        ValueError: naming the detector, the missing capabilities and the detectors that have them.
    """
    needs = list(needs)
    if not needs:
        return
    caps = capabilities_for(detector)
    missing = [n for n in needs if not caps.has(n)]
    if missing:
        able = sorted(name for name, c in CAPABILITIES.items() if all(c.has(n) for n in missing))
        raise ValueError(f"{what} needs a detector with {', '.join(missing)}; detector={detector} has not"
                         + (f" (use detector={' or '.join(able)})" if able else ""))
