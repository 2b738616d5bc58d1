"""Where the Hydra configs are, in a checkout and after ``pip install``.

The configs live in the repository's top-level ``conf/`` (one folder per stage), which a source
checkout or an editable install reads; a wheel carries a copy in ``pretrain/_conf/`` (setup.py's
build step), used when there is no checkout beside the package.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parents[2] / "_conf"
CHECKOUT = Path(__file__).resolve().parents[3] / "conf"


def config_dir(stage: str) -> str:
    """The absolute folder of ``stage``'s configs (``pretrain`` or ``finetune``), holding ``<stage>.yaml``.

    Raises:
        FileNotFoundError: neither a packaged copy nor a checkout's ``conf/`` has it.
    """
    for base in (CHECKOUT, PACKAGED):
        if (base / stage / f"{stage}.yaml").is_file():
            return str(base / stage)
    raise FileNotFoundError(f"no Hydra configs for {stage!r} in {PACKAGED} (a wheel's copy) or {CHECKOUT} "
                            "(a checkout): reinstall the package or run from the repository")
