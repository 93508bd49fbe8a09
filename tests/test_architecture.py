"""The package's layering, read from its source: no import cycles (function-local imports included), and the runtime
that generated modules import depends on nothing of the generator."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specgen"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """specgen module -> the specgen modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from . import x` / `from .pkg import mod` name modules; otherwise the base is the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:   # `specgen.reference.nsa.x` -> the module that holds x
                    target = target.rpartition(".")[0]
                if target.startswith("specgen") and target != name:
                    graph[name].add(target)
    return graph


def _is_ancestor_package(a: str, b: str) -> bool:
    """`specgen` is imported by every submodule's import machinery; a package and its own modules are one unit."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycles():
    graph = import_graph()
    edges = {m: {t for t in ts if not _is_ancestor_package(m, t)} for m, ts in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_runtime_imports_nothing_of_the_generator():
    """Generated modules import torch, triton and specgen.runtime only: the runtime must not pull in the spec model,
    the planner, the renderer or sympy (a cache hit and a generated module's import stay light)."""
    graph = import_graph()
    runtime = [m for m in graph if m == "specgen.runtime" or m.startswith("specgen.runtime.")]
    assert runtime
    for m in runtime:
        outside = {t for t in graph[m] if t != "specgen" and not t.startswith("specgen.runtime")}
        assert not outside, f"{m} imports {sorted(outside)}"
    for path in (PACKAGE / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not names & {"sympy", "jinja2", "yaml"}, f"{path.name} imports {sorted(names & {'sympy', 'jinja2', 'yaml'})}"


def test_the_graph_sees_function_local_imports():
    """The walker must count imports inside functions, or a lazy import would hide a cycle from the test above."""
    graph = import_graph()
    assert "specgen.compile.render" in graph["specgen.compile.jit"]          # jit imports render inside load() (the miss path)


# What each layer may import (besides itself and the package root's constants): the folders are the layers, and
# data flows one way, spec model -> compiler -> generated module -> runtime, with the consumers on top.
LAYERS = {
    "model": set(),
    "runtime": set(),
    "reference": {"model", "runtime"},
    "compile": {"model"},
    "perf": {"model", "compile", "reference", "runtime"},
    "study": {"model", "compile", "reference", "runtime", "perf"},
    "testing": {"model", "compile", "reference", "runtime"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_layer_imports_only_the_layers_below_it():
    graph = import_graph()
    wrong = []
    for m, targets in sorted(graph.items()):
        layer = _layer(m)
        if layer is None:
            continue  # cli, docs, the pytest plugin and the package root sit on top of everything
        for t in sorted(targets):
            other = _layer(t)
            if t == "specgen" or other == layer:
                continue
            if other is None or other not in LAYERS[layer]:
                wrong.append(f"{m} ({layer}) imports {t} ({other or 'top level'})")
    assert not wrong, "\n".join(wrong)


def test_the_test_kit_is_imported_by_nothing_in_the_package():
    """specgen.testing serves tests and generated tests; production code (bench, tune, the renderer) must not need it."""
    graph = import_graph()
    users = sorted(m for m, ts in graph.items() if _layer(m) != "testing" and any(_layer(t) == "testing" for t in ts))
    assert not users, f"the test kit is imported by {users}"
