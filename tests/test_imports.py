"""Dependencies run one way, as the data flows: pretrain.core <- pretrain <- finetune.

Every import is read from the source (module level and inside functions alike, since a
function-level import is still a dependency), and so are the ``_target_`` strings of each
stage's configs, which Hydra imports at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Layers, upstream first: a module may import its own layer and the ones before it.
LAYERS = ("pretrain.core", "pretrain", "finetune")


def layer_of(module: str) -> int | None:
    for i in reversed(range(len(LAYERS))):  # most specific prefix first: pretrain.core before pretrain
        name = LAYERS[i]
        if module == name or module.startswith(name + "."):
            return i
    return None


def imports_of(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file, relative imports resolved."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found += [(node.lineno, f"{base}.{a.name}" if node.module is None else base) for a in node.names]
    return found


def violations(root: Path = REPO) -> list[str]:
    bad = []
    for pkg in ("pretrain", "finetune"):
        for path in sorted((root / pkg).rglob("*.py")):
            own = layer_of(".".join(path.relative_to(root).with_suffix("").parts))
            for line, target in imports_of(path, root):
                other = layer_of(target)
                if own is not None and other is not None and other > own:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target} ({LAYERS[own]} -> {LAYERS[other]})")
    for layer, conf in ((1, "conf/pretrain"),):
        for path in sorted((root / conf).rglob("*.yaml")):
            for m in re.finditer(r"_target_:\s*([\w.]+)", path.read_text()):
                other = layer_of(m.group(1))
                if other is not None and other > layer:
                    bad.append(f"{path.relative_to(root)} targets {m.group(1)} (pretrain config -> {LAYERS[other]})")
    return bad


def test_imports_run_one_way() -> None:
    assert violations() == []


def test_the_scan_catches_a_backwards_import(tmp_path: Path) -> None:
    """The checker itself: a function-level import of finetune inside pretrain.core is reported."""
    for pkg in ("pretrain/core", "finetune"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "core" / "x.py").write_text("def f():\n    from finetune.y import z\n    return z\n")
    (tmp_path / "pretrain" / "rel.py").write_text("from ..finetune import y\n")
    (tmp_path / "finetune" / "ok.py").write_text("from pretrain.core import x\nimport pretrain\n")
    (tmp_path / "conf" / "pretrain").mkdir(parents=True)
    (tmp_path / "conf" / "pretrain" / "cb.yaml").write_text("cb:\n  _target_: finetune.pipeline.Thing\n")
    found = violations(tmp_path)
    assert any("pretrain/core/x.py:2 imports finetune.y" in v for v in found), found
    assert any("pretrain/rel.py:1 imports finetune" in v for v in found), found
    assert any("conf/pretrain/cb.yaml targets finetune.pipeline.Thing" in v for v in found), found
    assert not any("finetune/ok.py" in v for v in found), found
