"""What every benchmark report carries: the machine, the threads, what ``auto`` chose, medians,
and a ``--json`` file that other scripts (``scripts/bench_report.py``) read."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.core.precision import ENV_CPU_BF16, choose, cpu_flags

# The flags that decide precision and kernel choice on x86 (lscpu shows many more).
KEY_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_info(accelerator: str = "auto") -> dict[str, Any]:
    """CPU model and its precision-relevant flags (or the GPU), torch threads and versions, and what
    ``trainer.precision=auto`` / ``channels_last=auto`` resolve to on this machine."""
    flags = cpu_flags()
    auto = choose({"accelerator": accelerator, "precision": "auto"}, "auto")
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": [f for f in KEY_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "auto": auto.as_dict(),
        # FEWLABEL_CPU_BF16=0 runs a bf16 CPU down the fp32 path of a CPU without bf16 units.
        "cpu_bf16_override": os.environ.get(ENV_CPU_BF16),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} [{' '.join(info['cpu_flags']) or 'no avx512/bf16 flags'}]"
    auto = info["auto"]
    return (f"{where}, {info['torch_threads']} torch threads, torch {info['torch']}; auto chose precision "
            f"{auto['precision']}, channels_last {auto['channels_last']} ({auto['reason']})")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``values`` (fractions, times ``scale``) as "mean +- std" for a table; one value says so, none is "-"."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.1f} (1 seed)"
    return f"{scale * statistics.mean(values):.1f} +- {scale * statistics.stdev(values):.1f}"


def write_json(path: str | Path, bench: str, info: dict[str, Any], rows: dict[str, dict[str, Any]],
               settings: dict[str, Any]) -> Path:
    """One benchmark's figures: ``{"bench", "date", "command", "machine", "settings", "rows": {mode: {...}}}``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": bench,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": info,
        "settings": settings,
        "rows": rows,
    }, indent=2))
    return out


def run_mode_process(script: str | Path, argv: Sequence[str], mode: str) -> dict[str, Any]:
    """Run ``script argv --one MODE`` in a fresh interpreter (so that its peak memory is its own) and
    return the JSON it prints on its ``RESULT `` line."""
    out = subprocess.run([sys.executable, str(script), *argv, "--one", mode], capture_output=True, text=True,
                         check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"mode {mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def put_section(md: Path, body: str, kind: str, key: str, heading: str, intro: str,
                empty: str = "# Benchmarks\n") -> None:
    """Write ``body`` into the markdown file ``md`` between the markers ``<!-- kind: key -->`` and
    ``<!-- /kind: key -->``.

    It replaces the text between the markers when the file has them; otherwise the marked block goes
    at the end of the ``heading`` section, or, without that heading, at the end of the file after
    ``intro`` (the heading and its explanation). A missing file starts as ``empty``. Other sections
    stay as they are.
    """
    begin, end = f"<!-- {kind}: {key} -->", f"<!-- /{kind}: {key} -->"
    block = begin + "\n" + body + ("" if body.endswith("\n") else "\n") + end
    old = md.read_text() if md.exists() else empty
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    elif heading in old:
        i = old.index(heading)
        nxt = old.find("\n## ", i + 1)
        nxt = len(old) if nxt < 0 else nxt
        new = old[:nxt].rstrip() + "\n\n" + block + "\n" + old[nxt:]
    else:
        new = old.rstrip() + "\n\n" + intro + "\n" + block + "\n"
    md.write_text(new if new.endswith("\n") else new + "\n")
