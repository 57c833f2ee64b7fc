"""The layering of docs/architecture.md, checked on the source: imports (also those inside
functions) form no cycle, and each layer imports only what it may."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "pipelines", "model", "storage", "infra")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party packages) that ``name`` imports anywhere."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    project, external = set(), set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            project.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                add(target)
            else:
                external.add(target.split(".")[0])
    project.discard(name)
    return project, external


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _parent_packages(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    # a package's __init__ is imported on the way to its modules; that edge is not a cycle
    graph = {name: {t for t in project if t not in _parent_packages(name)} for name, (project, _) in GRAPH.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("layer, allowed", [
    ("model", {"model"}),
    ("storage", {"storage"}),
    ("flows", {"flows", "pipelines"}),
    ("pipelines.formats", {"pipelines.formats", "storage", "model"}),
])
def test_layer_imports_only_what_it_may(layer, allowed):
    bad = {name: sorted(t for t in project if not any(t == a or t.startswith(a + ".") for a in allowed)
                        and t not in _parent_packages(name))
           for name, (project, _) in GRAPH.items() if name == layer or name.startswith(layer + ".")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_storage_does_not_import_torch():
    assert {name: "torch" for name, (_, ext) in GRAPH.items()
            if name.split(".")[0] == "storage" and "torch" in ext} == {}


def test_checks_see_real_edges():
    """The graph is not empty by accident: known edges are found, relative ones too."""
    assert "storage.manifest_swap" in GRAPH["storage.manifest"][0]  # from .manifest_swap import ...
    assert "torch" in GRAPH["model.opqn"][1]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
