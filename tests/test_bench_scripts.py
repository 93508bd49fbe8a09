"""The scripts under bench/ run on the GPU machine only, where a wrong call costs a device session: each call they
make into specgen is checked here against the callee's signature (names imported from specgen, called with
keywords it does not take or more positional arguments than it has)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _imported_callables(tree: ast.Module) -> dict:
    """{local name: object} for `from specgen... import name` at the script's top level (and in its functions)."""
    names = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "specgen"
                and not node.level):
            module = importlib.import_module(node.module)
            for alias in node.names:
                obj = getattr(module, alias.name, None)
                if obj is not None and callable(obj) and not inspect.isclass(obj):
                    names[alias.asname or alias.name] = obj
    return names


def _bad_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    callables = _imported_callables(tree)
    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in callables):
            continue
        try:
            sig = inspect.signature(callables[node.func.id])
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        params = sig.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params) or any(isinstance(k.value, ast.Dict) and k.arg is None
                                                               for k in node.keywords):
            continue
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in names:
                problems.append(f"{path.name}:{node.lineno}: {node.func.id}() takes no keyword {kw.arg!r}")
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        starred = any(isinstance(a, ast.Starred) for a in node.args)
        if not starred and not any(p.kind is p.VAR_POSITIONAL for p in params) and len(node.args) > len(positional):
            problems.append(f"{path.name}:{node.lineno}: {node.func.id}() takes {len(positional)} positional "
                            f"arguments, given {len(node.args)}")
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_scripts_call_specgen_as_it_is(path):
    assert _bad_calls(path) == []


def test_the_check_sees_a_wrong_keyword(tmp_path):
    script = tmp_path / "wrong.py"
    script.write_text("from specgen.perf.bench import dense_forward_ms\n"
                      "dense_forward_ms(None, 1, nonsense=2)\n")
    assert _bad_calls(script) == ["wrong.py:2: dense_forward_ms() takes no keyword 'nonsense'"]
