"""`make install`'s first step repairs a virtual environment an interrupted install left broken."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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


def _sh(args: list[str], **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow  # builds a wheel (about a minute)
def test_a_non_editable_install_finds_its_configs(tmp_path):
    """The wheel carries conf/ (setup.py's build step): from a folder outside the checkout, with the
    installed copy first on the path, both entry points compose their configs."""
    import sys

    repo = SCRIPT.parents[1]
    build = _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(tmp_path / "dist"), str(repo)])
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("fewlabel_det-*.whl"))
    target = tmp_path / "site"
    inst = _sh([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    assert inst.returncode == 0, inst.stderr
    assert (target / "pretrain" / "_conf" / "finetune" / "semi" / "unbiased_teacher.yaml").is_file()
    # The checkout's symlinked folder arrives as files.
    assert not (target / "pretrain" / "_conf" / "finetune" / "synthetic").is_symlink()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    where = _sh([sys.executable, "-c", "import pretrain, finetune; print(pretrain.__file__, finetune.__file__)"],
                cwd=tmp_path, env=env)
    assert where.stdout.count(str(target)) == 2, where.stdout + where.stderr
    for stage, key in (("pretrain", "method:"), ("finetune", "detector:")):
        r = _sh([sys.executable, "-m", stage, "experiment=smoke", "--cfg", "job"], cwd=tmp_path, env=env)
        assert r.returncode == 0 and key in r.stdout and "synthetic_dir" in r.stdout, r.stderr[-2000:]
