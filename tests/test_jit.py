"""specgen.load's cache: a hit imports without rendering, the key follows the generator, concurrent builds lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from specgen.compile import jit
from specgen.model.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "nsa_small.yaml"


def _fresh_process(code: str, cache: Path) -> str:
    env = dict(os.environ, SPECGEN_CACHE=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_cache_hit_imports_without_rendering(tmp_path):
    """The first process builds; a second one imports the cached module and never loads Jinja, sympy or the
    planner (what made a warm `specgen.load` cost a render)."""
    code = ("import sys, specgen; m = specgen.load('specs/nsa_small.yaml'); "
            "print(m.__file__, *sorted(k for k in ('jinja2', 'sympy', 'specgen.compile.render', 'specgen.compile.plan') "
            "if k in sys.modules))")
    first = _fresh_process(code, tmp_path).split()
    assert "specgen.compile.render" in first[1:]
    second = _fresh_process(code, tmp_path).split()
    assert second == [first[0]], f"a cache hit rendered again or imported the generator: {second[1:]}"


def test_the_key_names_spec_record_and_generator():
    spec = load_spec(SPEC)
    key = jit.cache_key(spec, SPEC)
    name, spec_hash, record, digest = key.rsplit("_", 3)
    assert (name, spec_hash, record) == (spec.name, spec.hash, "none")
    assert digest == jit.generator_digest() and len(digest) == 12


def test_a_given_plan_changes_the_key():
    """A caller's plan (a variant's) is keyed by its contents: two plans of one spec never share a cached module."""
    import dataclasses

    from specgen.compile.plan import make_plan

    spec = load_spec(SPEC)
    plan = make_plan(spec)
    other = dataclasses.replace(plan, score_unmasked_trips=not plan.score_unmasked_trips)
    plain, keyed, keyed_again, keyed_other = (jit.cache_key(spec, SPEC), jit.cache_key(spec, SPEC, plan),
                                              jit.cache_key(spec, SPEC, make_plan(spec)),
                                              jit.cache_key(spec, SPEC, other))
    assert keyed.startswith(plain + "_p") and keyed == keyed_again
    assert keyed_other != keyed


def test_a_changed_template_changes_the_key(tmp_path, monkeypatch):
    """A template edit must not serve the module rendered before it: the digest covers every template file."""
    package = tmp_path / "specgen"
    real = Path(jit.__file__).resolve().parent.parent
    for path in jit.generator_files(real):
        target = package / path.relative_to(real)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    monkeypatch.setattr(jit, "__file__", str(package / "compile" / "jit.py"))
    jit.generator_digest.cache_clear()
    try:
        before = jit.generator_digest()
        assert before == (jit.generator_digest.cache_clear() or jit.generator_digest())
        edited = package / "compile" / "templates" / "kernels" / "attention.j2"
        edited.write_text(edited.read_text() + "\n")
        jit.generator_digest.cache_clear()
        after_template = jit.generator_digest()
        assert after_template != before
        # Every module of the compile layer counts, not a chosen list (loop_order and variants once went unseen).
        for name in ("loop_order", "variants"):
            module = package / "compile" / f"{name}.py"
            module.write_text(module.read_text() + "\n")
            jit.generator_digest.cache_clear()
            assert jit.generator_digest() != after_template, name
            after_template = jit.generator_digest()
    finally:
        monkeypatch.undo()
        jit.generator_digest.cache_clear()


def test_concurrent_first_calls_build_once(tmp_path, monkeypatch):
    """Threads (standing in for processes: the lock is a file lock) asking for one key at once: one builds, the
    others wait and import its module."""
    from specgen.compile import render

    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path))
    builds = []
    real_build = render.build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(render, "build", counting_build)
    spec = load_spec(SPEC)
    key = jit.cache_key(spec, SPEC)
    folder = jit.cache_folder(key)
    errors = []

    def first_call():
        try:
            with jit._build_lock(folder):  # the same path load() takes on a miss, minus the import
                module = folder / f"{spec.name}.py"
                if not module.is_file():
                    render.build(spec, folder, spec_path=SPEC)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1
    assert not list(folder.glob(".*.tmp"))


def test_each_interpreter_mode_gets_its_own_module_from_one_cache_folder(monkeypatch):
    """Triton decorates a module's kernels for its CPU interpreter or not as TRITON_INTERPRET is when the module is
    imported: a module imported under one mode is never handed to a caller in the other. Same files on disk. Under
    TRITON_INTERPRET=0 the module is only imported (decorating needs no GPU), never called."""
    monkeypatch.setattr(jit, "_loaded", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # first: a first import registers the spec's custom ops
    interpreted = jit.load(SPEC)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = jit.load(SPEC)
    assert compiled is not interpreted and compiled.__name__ != interpreted.__name__
    assert type(compiled._dot).__name__ == "JITFunction"
    assert type(interpreted._dot).__name__ == "InterpretedFunction"
    assert jit.load(SPEC) is compiled
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert jit.load(SPEC) is interpreted
    assert compiled.__file__ == interpreted.__file__
    assert Path(compiled.__file__).parent == jit.cache_folder(jit.cache_key(load_spec(SPEC), SPEC))


def test_a_module_that_turns_the_interpreter_on_as_it_imports_is_filed_under_that_mode(monkeypatch):
    """specgen.runtime's first import sets TRITON_INTERPRET=1 where it is unset and no GPU is visible, before the
    module imports triton: the module is interpreted, and is cached and named as such."""
    monkeypatch.setattr(jit, "_loaded", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    real = jit.import_path

    def runtime_turns_it_on(path, name):
        os.environ["TRITON_INTERPRET"] = "1"        # monkeypatch restores the variable (deleted above)
        return real(path, name)

    monkeypatch.setattr(jit, "import_path", runtime_turns_it_on)
    module = jit.load(SPEC)
    assert module.__name__.endswith("_interp") and type(module._dot).__name__ == "InterpretedFunction"
    assert list(jit._loaded) == [jit.cache_key(load_spec(SPEC), SPEC) + "_interp"]
    assert module.__name__.removesuffix("_interp") not in sys.modules


def test_a_partial_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    """A folder holding only the lock (a build killed before its renames) is a miss, not a broken hit."""
    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(jit, "_loaded", {})  # a new process: an earlier test's module must not answer
    spec = load_spec(SPEC)
    folder = jit.cache_folder(jit.cache_key(spec, SPEC))
    folder.mkdir(parents=True)
    (folder / ".lock").touch()
    (folder / f".{spec.name}.py.123.tmp").write_text("half")
    module = jit.load(SPEC)
    assert Path(module.__file__) == folder / f"{spec.name}.py"
    assert not list(folder.glob(".*.tmp"))


def test_a_module_of_another_runtime_schema_is_refused_with_the_fix(tmp_path):
    """A committed or cached module rendered for another runtime schema fails at import with one line saying to
    rebuild, not deep inside a call."""
    import specgen
    from specgen import runtime
    from specgen.compile.render import render_module

    source = render_module(load_spec(SPEC))
    stale = tmp_path / "stale_nsa_small.py"
    stale.write_text(source.replace(f"runtime.require_schema({specgen.RUNTIME_SCHEMA},",
                                    f"runtime.require_schema({specgen.RUNTIME_SCHEMA + 1},", 1))
    try:
        jit.import_path(stale, "specgen_generated.stale_nsa_small")
    except runtime.SchemaMismatch as exc:
        message = str(exc)
    else:
        raise AssertionError("a module of another schema imported")
    assert "\n" not in message and "rebuild" in message and "nsa_small" in message
    fresh = tmp_path / "fresh_nsa_small.py"
    fresh.write_text(source)
    assert jit.import_path(fresh, "specgen_generated.fresh_nsa_small").SPEC_NAME == "nsa_small"
