"""Precision and memory format chosen from what the hardware computes natively.

``trainer.precision=auto`` (the default of both stages) resolves to:

- ``bf16-mixed`` on CUDA devices with native bf16 (Ampere and later) and on CPUs with bf16
  units (x86 ``avx512_bf16`` or ``amx_bf16``; Arm ``bf16``);
- ``16-mixed`` on CUDA devices without bf16 (V100, T4), with Lightning's loss scaling;
- ``32`` everywhere else. On a CPU without bf16 units (Intel Skylake-SP, many laptops) PyTorch
  emulates bf16 autocast: ResNet-18 forward+backward ran 2.4x *slower* than fp32 there.

An explicit value (``trainer.precision=32``) always wins. ``backbone.channels_last=auto`` turns
NHWC on for CUDA and CPU convolutions (faster with oneDNN in fp32 and bf16 alike, measured on
both CPU kinds by ``scripts/bench_pretrain.py``), off on Apple's MPS.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

log = logging.getLogger(__name__)
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "64", "bf16-true", "16-true")
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ENV_CPU_BF16 = "FEWLABEL_CPU_BF16"


@dataclass(frozen=True)
class HardwareChoice:
    """What ``auto`` resolved to, and why (logged, and written to each stage's metrics.json)."""

    device: str
    precision: str
    channels_last: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "channels_last": self.channels_last,
                "reason": self.reason, "torch_threads": torch.get_num_threads()}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of Linux's /proc/cpuinfo (x86 ``flags``, Arm ``Features``); on
    macOS the ``hw.optional.arm.FEAT_*`` sysctls that are set; empty where neither can be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "hw.optional.arm"], check=False, capture_output=True, text=True,
                                 timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset(line.split(":")[0].rsplit("FEAT_", 1)[-1].lower()
                         for line in out.splitlines() if "FEAT_" in line and line.strip().endswith("1"))
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU has bf16 arithmetic units (x86 AVX512_BF16 / AMX-BF16, Arm BF16).

    ``FEWLABEL_CPU_BF16=0`` (or ``1``) overrides the probe: for a VM that hides its CPU flags, or
    to run the fp32 path of a CPU without bf16 units on one that has them.
    """
    forced = os.environ.get(ENV_CPU_BF16)
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in X86_BF16_FLAGS) or ("bf16" in flags and platform.machine() in ("aarch64", "arm64"))


def training_device(accelerator: str = "auto") -> str:
    """``cuda``, ``mps`` or ``cpu``: where Lightning's ``accelerator`` puts the model."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the device Lightning's ``accelerator=auto`` would train on (CUDA, MPS, else CPU)."""
    return torch.device(training_device("auto") if device == "auto" else device)


def choose(
    trainer_cfg: Mapping[str, Any],
    channels_last: Any = "auto",
    cuda_bf16: Callable[[], bool] | None = None,
    cpu_bf16: Callable[[], bool] | None = None,
) -> HardwareChoice:
    """Resolve ``trainer.precision`` and ``channels_last`` (``auto`` or explicit) for this machine.

    Args:
        trainer_cfg: the stage's trainer config (``accelerator``, ``precision``).
        channels_last: ``auto``, true or false.
        cuda_bf16, cpu_bf16: probes, replaceable in tests; default to the real hardware.
    """
    device = training_device(trainer_cfg.get("accelerator", "auto"))
    requested = str(trainer_cfg.get("precision", "auto"))
    if requested == "auto":
        if device == "cuda":
            native = (cuda_bf16 or _cuda_native_bf16)()
            precision = "bf16-mixed" if native else "16-mixed"
            reason = ("the GPU computes bf16 natively" if native
                      else "the GPU has no native bf16 (e.g. V100, T4): fp16 with loss scaling")
        elif device == "cpu":
            native = (cpu_bf16 or cpu_has_native_bf16)()
            precision = "bf16-mixed" if native else "32"
            found = sorted(f for f in cpu_flags() if f in (*X86_BF16_FLAGS, "bf16")) or ["probe"]
            reason = (f"the CPU has bf16 units ({', '.join(found)})" if native
                      else "the CPU has no bf16 units (no avx512_bf16 / amx_bf16 flag): bf16 would be "
                           "emulated, slower than fp32")
        else:
            precision, reason = "32", f"{device}: mixed precision is not chosen automatically there"
    else:
        if requested not in PRECISIONS:
            raise ValueError(f"trainer.precision={requested!r}; choose auto or one of {PRECISIONS}")
        precision, reason = requested, "set explicitly"
    if str(channels_last).lower() == "auto":
        nhwc = device in ("cuda", "cpu")
    else:
        nhwc = bool(channels_last)
    return HardwareChoice(device, precision, nhwc, reason)


def apply(trainer_cfg: dict[str, Any], channels_last: Any = "auto") -> HardwareChoice:
    """Resolve ``auto`` in place in ``trainer_cfg`` (what ``pl.Trainer`` receives) and log the choice."""
    choice = choose(trainer_cfg, channels_last)
    trainer_cfg["precision"] = choice.precision
    log.info("precision %s, channels_last %s on %s (%s)", choice.precision, choice.channels_last,
             choice.device, choice.reason)
    return choice


def _cuda_native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return torch.cuda.get_device_capability()[0] >= 8
