"""What every benchmark report carries: the machine, the threads, what ``auto`` chose, medians,
and a ``--json`` file that other scripts (``scripts/bench_report.py``) read."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from pretrain.core.run.precision import ENV_CPU_BF16, choose, cpu_flags

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


def describe(info: dict[str, Any], run: Mapping[str, Any] | None = None) -> str:
    """One line for a ledger or a report. ``run``: a finished run's own hardware record (its
    metrics.json ``hardware``), which says what that run used: fine-tuning trains NCHW whatever
    ``channels_last=auto`` would pick for pretraining, and a run may have had other threads."""
    where = info.get("gpu") or f"{info['cpu']} [{' '.join(info['cpu_flags']) or 'no avx512/bf16 flags'}]"
    if run:
        return (f"{where}, {run.get('torch_threads', info['torch_threads'])} torch threads, torch {info['torch']}; "
                f"the run used precision {run.get('precision')}, channels_last {run.get('channels_last')} "
                f"({run.get('reason', 'as configured')})")
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


def sync(device: torch.device | None) -> None:
    """Wait for the GPU's queued work (a no-op on a CPU), so that a clock reading means what it says."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of this process is what a step costs, whatever else runs on the cores."""
    return time.perf_counter(), time.process_time()


def batch_images(batch: Any) -> int:
    """Images in a training batch: ``(images, targets)``, a list of view tensors, or the semi stage's
    ``{"labeled": (images, targets), ...}`` (its labeled images)."""
    if isinstance(batch, dict):
        batch = batch["labeled"]
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


class StepTimer(pl.Callback):
    """The one step timer of the benchmarks: wall and CPU time from the start of step ``warmup`` (its
    batch fetched) to the end of the last step, as the plain loops are timed. The later batches'
    loading, the callbacks and the logging between steps are inside, as they are in a real run."""

    def __init__(self, warmup: int, device: torch.device | None = None) -> None:
        self.warmup, self.device = warmup, device
        self.t0 = self.t1 = (0.0, 0.0)
        self.steps = self.images = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.steps == 0:
            sync(self.device)
            self.t0 = clocks()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > self.warmup:
            self.images += batch_images(batch)
            self.steps += 1
            sync(self.device)
            self.t1 = clocks()

    @property
    def per_step(self) -> float:
        """Wall seconds per timed step."""
        if not self.steps:
            raise RuntimeError(f"no step was timed (the run ended before step {self.warmup + 1})")
        return (self.t1[0] - self.t0[0]) / self.steps

    @property
    def rate(self) -> tuple[float, float]:
        """Images/s by the wall clock and by this process's CPU clock."""
        return self.images / (self.t1[0] - self.t0[0]), self.images / (self.t1[1] - self.t0[1])


def fingerprint(recipe: Mapping[str, Any]) -> str:
    """A short hash of what decides a run's result (never of paths, which differ between machines)."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def load_ledger(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def update_ledger(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the ledger file and write it back (after every run: a killed benchmark loses
    one run), re-read under a file lock, so that several benchmark processes (other arms or label
    counts) keep each other's runs; the write is atomic (a temporary file renamed)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = load_ledger(path)
        change(ledger)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(ledger, indent=1))
        tmp.replace(path)
    return ledger


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``run_dir`` while training into it: yields False when
    another process holds it (two benchmark processes over overlapping seeds never share a run
    directory). The OS drops the lock when its holder dies, so a killed run is resumable at once."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".bench.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def finetune_config(overrides: Sequence[str]) -> Any:
    """The composed fine-tuning config of ``overrides`` (the batch size and LR the protocol scales from)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf" / "finetune"), version_base=None):
        return compose("finetune", overrides=list(overrides))


def steps_per_epoch(num_images: int, batch: int) -> int:
    return -(-num_images // batch)  # the labeled loader keeps its last partial batch
