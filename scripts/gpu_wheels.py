"""The wheels a lent GPU machine needs to run the project, and the size check of what travels there.

The device machine (``run`` tool; /work/.library/device/KINDS.md) has Python 3.12 with torch 2.11,
torchvision 0.26, pytorch-lightning 2.6.6, safetensors, numpy, pillow, matplotlib, tqdm, PyYAML,
packaging and protobuf, and no network. Everything else the project imports travels as wheels for
Python 3.12 manylinux x86-64 in ``wheels/gpu/`` (git-ignored), listed in the tracked manifest
``wheels/gpu.txt``; ``scripts/gpu_check.sh`` installs them with ``pip install --no-deps --no-index``.

    python scripts/gpu_wheels.py download     # make gpu-wheels: fetch what the manifest needs, rewrite it
    python scripts/gpu_wheels.py check        # every wheel present and intact, tree + wheels under 64 MiB

Which wheels: the pinned ``install_requires`` of setup.cfg and what they need (read from the installed
packages' metadata, markers evaluated for Python 3.12 on Linux x86-64), less what the device has,
each at the version installed here. An sdist-only pure-Python package (antlr4-python3-runtime 4.9.3,
omegaconf's parser runtime) is built into a ``py3-none-any`` wheel here.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "wheels" / "gpu"
MANIFEST = REPO / "wheels" / "gpu.txt"
LIMIT_BYTES = 64 * 2**20  # what one device call carries: tracked + untracked-not-ignored files + carried paths
# The device image's packages that the project's requirements reach (KINDS.md's list, read 2026-11-17):
# not carried. The closure stops at them.
ON_DEVICE = frozenset(canonicalize_name(n) for n in (
    "torch", "torchvision", "pytorch-lightning", "lightning-utilities", "torchmetrics", "safetensors", "numpy",
    "pillow", "matplotlib", "tqdm", "packaging", "pyyaml", "protobuf", "typing-extensions", "fsspec"))
# Optional extras of the project that the GPU check does not use (eval.backend=pycocotools is the default).
NOT_NEEDED = frozenset({canonicalize_name("faster-coco-eval")})
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")


@dataclass(frozen=True)
class Wheel:
    """One manifest line: ``name version file bytes sha256``."""

    name: str
    version: str
    file: str
    size: int
    sha256: str

    def line(self) -> str:
        return f"{self.name} {self.version} {self.file} {self.size} {self.sha256}"


def project_requirements(setup_cfg: Path = REPO / "setup.cfg") -> list[Requirement]:
    """setup.cfg's ``install_requires`` (the runtime dependencies, without extras)."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    return [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]


def needed(requirements: Iterable[Requirement], on_device: frozenset[str] = ON_DEVICE) -> dict[str, str]:
    """``{canonical name: version}`` of every package to carry: ``requirements`` and what they need,
    at the versions installed here, less ``on_device`` (whose own needs the device has)."""
    out: dict[str, str] = {}
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate(DEVICE_MARKERS)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in out or name in on_device or name in NOT_NEEDED:
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"{req.name} is not installed here (make install first): its version decides "
                             "the wheel") from e
        if not req.specifier.contains(version, prereleases=True):
            raise SystemExit(f"{req.name} {version} is installed here but {req} is required")
        out[name] = version
        for dep in metadata.requires(req.name) or []:
            r = Requirement(dep)
            if r.marker is None or r.marker.evaluate(DEVICE_MARKERS):
                todo.append(r)
    return dict(sorted(out.items()))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path = MANIFEST) -> list[Wheel]:
    rows = []
    for ln in path.read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, version, file, size, digest = ln.split()
            rows.append(Wheel(name, version, file, int(size), digest))
    return rows


def write_manifest(wheels: Sequence[Wheel], path: Path = MANIFEST) -> None:
    total = sum(w.size for w in wheels)
    head = ["# Wheels for the lent GPU machine (Python 3.12, manylinux x86-64), made by `make gpu-wheels`",
            "# (scripts/gpu_wheels.py) into wheels/gpu/ (git-ignored). name version file bytes sha256.",
            f"# {len(wheels)} wheels, {total} bytes ({total / 2**20:.1f} MiB)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*head, *(w.line() for w in wheels)]) + "\n")


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


def fetch(name: str, version: str, dest: Path) -> Path:
    """The wheel of ``name==version`` for the device in ``dest``: a binary one from the registry, or,
    for a package published as an sdist only, a pure-Python wheel built here."""
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        r = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                 "--implementation", "cp", *platforms, "-d", tmp, f"{name}=={version}")
        if r.returncode != 0:
            r = _pip("wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", tmp, f"{name}=={version}")
            if r.returncode != 0:
                raise SystemExit(f"no wheel for {name}=={version}:\n{r.stderr[-2000:]}")
            built = next(Path(tmp).glob("*.whl"))
            if not built.name.endswith("-py3-none-any.whl") and not built.name.endswith("-py2.py3-none-any.whl"):
                raise SystemExit(f"{name}=={version} has no binary wheel for the device and builds into "
                                 f"{built.name}, which is not pure Python")
        wheel = next(Path(tmp).glob("*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target


def download(dest: Path = WHEELS, manifest: Path = MANIFEST) -> list[Wheel]:
    """Fetch every needed wheel into ``dest`` (others there are removed: two versions of one package
    stop ``pip install``) and rewrite the manifest."""
    wheels = []
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in needed(project_requirements()).items():
        have = [w for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name
                and w.name.split("-")[1] == version]
        path = have[0] if have else fetch(name, version, dest)
        print(f"  {path.name} ({path.stat().st_size / 2**20:.2f} MiB)", flush=True)
        wheels.append(Wheel(name, version, path.name, path.stat().st_size, sha256(path)))
    for stale in set(dest.glob("*.whl")) - {dest / w.file for w in wheels}:
        print(f"  removed {stale.name} (not needed)", flush=True)
        stale.unlink()
    write_manifest(wheels, manifest)
    return wheels


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked files and untracked files
    that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    files = {repo / p for p in out.decode().split("\0") if p}
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def check(dest: Path = WHEELS, manifest: Path = MANIFEST, repo: Path = REPO, limit: int = LIMIT_BYTES) -> dict:
    """Every manifest wheel in ``dest`` with its size and hash, nothing else there, and the working tree
    plus the wheels under ``limit``. Returns the figures and the problems found (``ok``: none)."""
    rows = read_manifest(manifest)
    problems = []
    names = [canonicalize_name(w.name) for w in rows]
    if set(names) != set(needed(project_requirements())):
        problems.append(f"the manifest lists {sorted(names)} but the project needs "
                        f"{sorted(needed(project_requirements()))}: run make gpu-wheels")
    for w in rows:
        p = dest / w.file
        if not p.is_file():
            problems.append(f"{p} is missing: run make gpu-wheels")
        elif p.stat().st_size != w.size or sha256(p) != w.sha256:
            problems.append(f"{p} differs from the manifest (size or sha256): run make gpu-wheels")
    extra = sorted(p.name for p in dest.glob("*.whl")) if dest.is_dir() else []
    extra = [f for f in extra if f not in {w.file for w in rows}]
    if extra:
        problems.append(f"{dest} holds wheels the manifest does not list: {extra}")
    wheels, tree = sum(w.size for w in rows), tree_bytes(repo)
    if tree + wheels >= limit:
        problems.append(f"the working tree ({tree / 2**20:.1f} MiB) and the wheels ({wheels / 2**20:.1f} MiB) are "
                        f"{(tree + wheels) / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a device call carries")
    return {"ok": not problems, "problems": problems, "wheels": len(rows), "wheel_bytes": wheels,
            "tree_bytes": tree, "total_bytes": tree + wheels, "limit_bytes": limit}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("download", "check", "list"))
    a = p.parse_args(argv)
    if a.action == "list":
        for name, version in needed(project_requirements()).items():
            print(f"{name}=={version}")
        return 0
    if a.action == "download":
        download()
    r = check()
    print(f"{r['wheels']} wheels, {r['wheel_bytes'] / 2**20:.1f} MiB; working tree {r['tree_bytes'] / 2**20:.1f} MiB; "
          f"together {r['total_bytes'] / 2**20:.1f} of {r['limit_bytes'] / 2**20:.0f} MiB")
    for problem in r["problems"]:
        print("PROBLEM:", problem)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
