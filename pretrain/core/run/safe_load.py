"""The one way this project reads a torch checkpoint: weights only, with errors of its own.

``torch.load(weights_only=True)`` refuses a pickle that would build arbitrary Python objects (and
so could run code while it is read), but its error advises re-running with ``weights_only=False``,
the one thing a user must not do with a file of unknown origin. :func:`load_torch_file` turns that
refusal into :class:`UnsafeCheckpointError`, which names the file, what it asked to import and the
safe way on, and a truncated or corrupt file into :class:`CorruptCheckpointError`, which resuming
runs catch to fall back to the previous checkpoint.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SAFE_WAY = (
    "If you trust the file, convert it once in a trusted environment into a plain state dict of "
    "tensors, e.g. safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), and pass "
    "that file instead."
)


class UnsafeCheckpointError(ValueError):
    """The file holds pickled Python objects beyond tensors and containers; it was not loaded."""


class CorruptCheckpointError(ValueError):
    """The file is truncated or not a torch checkpoint at all."""


def load_torch_file(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu",
                    mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with this project's errors.

    Args:
        path: the file.
        what: what the file is for, for the messages ("backbone checkpoint", "resume checkpoint").
        map_location: as torch.load's.
        mmap: memory-map the tensors instead of reading them (torch's zip format only).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle asks for globals beyond tensors and plain containers.
        CorruptCheckpointError: truncated, empty or not a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if p.stat().st_size == 0:
        raise CorruptCheckpointError(f"{what} {p} is empty (0 bytes): a write that never finished")
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text:  # a pickle that imports something beyond tensors and containers
            raise UnsafeCheckpointError(_unsafe_message(p, what, text)) from None
        # Garbage, or a raw pickle.dump file (not what torch.save writes): nothing was run either way.
        raise CorruptCheckpointError(
            f"{what} {p} is not a torch checkpoint (a raw pickle or another kind of file); nothing in it was "
            f"run. {SAFE_WAY}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        # Truncated zip archives ("failed finding central directory"), short legacy pickles (EOF),
        # text files: nothing here is loadable, and nothing was run.
        raise CorruptCheckpointError(
            f"{what} {p} is truncated or not a torch checkpoint ({_first_line(str(e))})") from None


def _unsafe_message(p: Path, what: str, text: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    asks = f" (it asks for {found.group(1)})" if found else ""
    return (f"refused to load {what} {p}: it holds pickled Python objects{asks}, and reading them could run "
            f"arbitrary code. This project reads checkpoints as weights only. {SAFE_WAY}")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["unknown error"])[0][:200]


def run_cli(main: Callable[[], Any]) -> None:
    """Run a command-line ``main``; a missing, unsafe or corrupt input file ends it with
    ``error: <message>`` on stderr and status 2 instead of a traceback."""
    try:
        main()
    except (FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
