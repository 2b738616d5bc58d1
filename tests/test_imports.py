"""Dependencies run one way, as the data flows: pretrain.core <- pretrain <- finetune <- finetune.semi
<- the entry points (finetune.run, ``python -m finetune``) <- scripts; and no import circle anywhere.

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
LAYERS = ("pretrain.core", "pretrain", "finetune", "finetune.semi", "finetune.run", "scripts")
# Modules that belong to a later layer than their package: the entry points that may dispatch to the
# semi stage (most specific prefix wins, as for pretrain.core).
ENTRY = {"finetune.__main__": "finetune.run"}
PACKAGES = ("pretrain", "finetune", "scripts")


def layer_of(module: str) -> int | None:
    module = ENTRY.get(module, module)
    if module.split(".")[0] in ("bench_common",):  # scripts' own helper, imported by its bare name
        return LAYERS.index("scripts")
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
    for pkg in PACKAGES:
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


def module_of(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``
    when that is a module; scripts import each other by bare name)."""
    files = {module_of(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    bare = {m.split(".", 1)[1]: m for m in files if m.startswith("scripts.")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                t = bare.get(t, t)
                while t and t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != module:
                    graph[module].add(t)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way() -> None:
    assert violations() == []


def test_no_import_circle() -> None:
    graph = import_graph()
    assert {"finetune.train", "finetune.semi.plan", "scripts.demo"} <= set(graph)
    assert "finetune.train" in graph["finetune.semi.plan"]  # the semi stage is a layer on fine-tuning
    assert import_cycles(graph) == []


def test_the_cycle_scan_finds_a_circle(tmp_path: Path) -> None:
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "__init__.py").write_text("")
    (tmp_path / "finetune" / "a.py").write_text("from finetune.b import x\n")
    (tmp_path / "finetune" / "b.py").write_text("def f():\n    from finetune import a\n")
    (tmp_path / "finetune" / "c.py").write_text("import finetune.a\n")
    assert import_cycles(import_graph(tmp_path)) == [["finetune.a", "finetune.b"]]


def test_fine_tuning_knows_nothing_of_the_semi_stage() -> None:
    """finetune.train, the fine-tuning module and what they build on never name the semi stage."""
    for name in ("train.py", "module.py", "finish.py", "checkpoint.py", "fit_plan.py"):
        text = (REPO / "finetune" / name).read_text()
        assert "semi" not in text.lower() and "teacher" not in text.lower(), name


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
