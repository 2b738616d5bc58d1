"""`make install`'s first step repairs a virtual environment an interrupted install left broken."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure_venv.sh"


def _run(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(venv)], check=False, capture_output=True, text=True,
                          timeout=300)


def _has_pip(venv: Path) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import pip"], check=False,
                          capture_output=True).returncode == 0


def test_a_venv_without_pip_is_recreated_and_a_healthy_one_kept(tmp_path):
    venv = tmp_path / ".venv"
    # What Ctrl-C during `python3 -m venv` leaves: the interpreter, no pip.
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert not _has_pip(venv)
    r = _run(venv)
    assert r.returncode == 0, r.stderr
    assert "incomplete" in r.stderr and _has_pip(venv)
    # A healthy venv is left as it is (its installed packages are not thrown away).
    keep = venv / "keep.txt"
    keep.write_text("x")
    r = _run(venv)
    assert r.returncode == 0 and r.stderr == "" and keep.is_file()
    # A venv whose interpreter is gone (a half-deleted folder) is rebuilt too.
    (venv / "bin" / "python").unlink()
    r = _run(venv)
    assert r.returncode == 0 and _has_pip(venv) and not keep.exists()
