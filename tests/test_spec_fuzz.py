"""The spec fuzz corpus (tests/spec_fuzz/cases, written by tests/spec_fuzz/make_corpus.py) and the build-time
failures: every malformed or unusual spec, and every output folder or tuning record a build cannot use, ends in
exit 2 with a one-line-located message and a fix, no traceback, and nothing written.

Fast by design: every case runs in-process through `specgen.cli.main` (no kernel is rendered for a refused
spec); a few run in a subprocess to prove that no traceback reaches the user's terminal.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specgen.compile import files, render
from specgen.cli import main
from specgen.model.errors import BuildError, SpecError
from specgen.model.spec import Spec, load_spec, spec_from_yaml

ROOT = Path(__file__).resolve().parent.parent
FUZZ = Path(__file__).resolve().parent / "spec_fuzz"
CASES = sorted((FUZZ / "cases").glob("*.yaml"))
SMALL = ROOT / "specs" / "nsa_small.yaml"
MARK = "#<"


def _expectation(path: Path) -> tuple[str, int | None]:
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    field = lines[0].removeprefix("# expect: ")
    marked = [i + 1 for i, ln in enumerate(lines) if ln.endswith(MARK)]
    return field, marked[0] if marked else None


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_clean_error(rc: int, out: str, err: str, path: Path, field: str, line: int | None) -> None:
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    assert "Traceback" not in out + err
    first = err.splitlines()[0]
    where = re.escape(f"specgen: error: {path}:") + (str(line) if line else r"\d+") + ": "
    assert re.match(where, first), first
    assert first[re.match(where, first).end():].startswith(field), f"{field!r} not the field of: {first}"
    assert re.search(r"^  fix: \S", err, re.M), err


def test_the_corpus_is_what_the_script_writes():
    """The committed cases are the script's output (regenerate with `python tests/spec_fuzz/make_corpus.py`)."""
    sys.path.insert(0, str(FUZZ))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(FUZZ))
    expected = make_corpus.cases()
    assert sorted(expected) == [p.name for p in CASES]
    for p in CASES:
        assert p.read_bytes() == expected[p.name].encode("utf-8"), p.name
    assert len(CASES) > 300


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case_check_and_build_refuse_it(path, tmp_path, capsys):
    field, line = _expectation(path)
    started = time.perf_counter()
    rc, out, err = _run(capsys, "check", path)
    _assert_clean_error(rc, out, err, path, field, line)
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, "build", path, "--out", out_dir)
    _assert_clean_error(rc, out, err, path, field, line)
    assert not out_dir.exists()                                           # nothing written, not even the folder
    assert time.perf_counter() - started < 5, "refusing a spec must be quick (an alias bomb must not expand)"


def test_list_shows_every_case_as_invalid(capsys):
    rc, out, err = _run(capsys, "list", FUZZ / "cases")
    assert rc == 0, err
    assert "Traceback" not in out + err
    rows = out.splitlines()[1:]
    assert len(rows) == len(CASES)
    assert all(" invalid: " in row for row in rows), [r for r in rows if " invalid: " not in r][:3]


@pytest.mark.parametrize("case", ["alias_billion_laughs", "tag_bool_maybe", "name_02_torch", "int_5000_digits"])
def test_no_traceback_reaches_the_terminal(case, tmp_path):
    """The real process: exit 2, the located error on stderr, nothing else."""
    path = FUZZ / "cases" / f"{case}.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "specgen.cli", "build", str(path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    field, line = _expectation(path)
    _assert_clean_error(result.returncode, result.stdout, result.stderr, path, field, line)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Names that collide, in one build and with what the generated code imports
# ---------------------------------------------------------------------------------------------------------------

def test_the_longest_name_builds(tmp_path, capsys):
    """A name of MAX_NAME characters passes check and build writes both files (236 passed check, then failed)."""
    from specgen.model.spec import MAX_NAME

    name = "n" * MAX_NAME
    spec = tmp_path / "long.yaml"
    spec.write_text(SMALL.read_text().replace("name: nsa_small", f"name: {name}"))
    rc, out, err = _run(capsys, "build", spec, "--out", tmp_path / "out")
    assert rc == 0, err
    assert _files(tmp_path / "out") == [f"{name}.py", f"test_{name}.py"]


def test_two_specs_of_one_name_in_one_build(tmp_path, capsys):
    other = tmp_path / "copy.yaml"
    other.write_text(SMALL.read_text())
    rc, out, err = _run(capsys, "build", SMALL, other, "--out", tmp_path / "out")
    assert rc == 2 and "is also used by" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_spec_named_like_another_specs_test_is_refused(tmp_path, capsys):
    clash = tmp_path / "clash.yaml"
    clash.write_text(SMALL.read_text().replace("name: nsa_small", "name: test_nsa_small"))
    rc, out, err = _run(capsys, "build", SMALL, clash, "--out", tmp_path / "out")
    assert rc == 2 and f"{clash}:" in err and "test file a build writes for a spec named 'nsa_small'" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Sweep files named with the specs (`specgen check specs/*.yaml`)
# ---------------------------------------------------------------------------------------------------------------

def test_sweep_files_named_on_the_command_line_are_skipped_with_a_note(capsys, tmp_path):
    files = sorted((ROOT / "specs").glob("*.yaml"))
    assert any(p.name.endswith(".sweep.yaml") for p in files)
    rc, out, err = _run(capsys, "check", *files)
    assert rc == 0, err
    assert "nsa_vs_dsa.sweep.yaml: a sweep file, skipped (run it with `specgen sweep" in err
    assert out.count(": ok (hash") == len([p for p in files if not p.name.endswith(".sweep.yaml")])
    rc, out, err = _run(capsys, "check", ROOT / "specs" / "nsa_vs_dsa.sweep.yaml")
    assert rc == 2 and "only sweep files" in err


# ---------------------------------------------------------------------------------------------------------------
# Spec objects built in Python: validated as files are; strings pasted through one escaping function
# ---------------------------------------------------------------------------------------------------------------

def test_a_spec_object_with_code_in_its_name_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import dataclasses

    import specgen

    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path / "cache"))
    good = load_spec(SMALL)
    evil = dataclasses.replace(good, name='x"\nimport os; os.environ["SPECGEN_PWNED"] = "1"\n#')
    with pytest.raises(SpecError, match="name: .* is not a lowercase identifier"):
        specgen.load(evil)
    with pytest.raises(SpecError, match="name"):
        render.render_module(evil)
    huge = dataclasses.replace(good, heads=dataclasses.replace(good.heads, q=1_000_000))
    with pytest.raises(SpecError, match=r"heads.q: 1000000 is outside 1..256"):
        specgen.load(huge)
    with pytest.raises(SpecError, match="expected a whole number"):
        specgen.load(dataclasses.replace(good, max_seqlen="4096"))
    assert "SPECGEN_PWNED" not in os.environ
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("text", ["plain", 'a"b', "a'b", "line\nbreak", "back\\slash", "tab\there", "\u2028", "é{x}"])
def test_pystr_is_a_python_literal_of_the_same_text(text):
    assert eval(render.pystr(text)) == text                                     # noqa: S307 - a literal
    assert "\n" not in render.pystr(text)


@pytest.mark.parametrize("text", ['a"b', "a\nb", "a'b", "a{b}"])
def test_pytext_refuses_what_would_need_escaping(text):
    with pytest.raises(ValueError, match="would need escaping"):
        render.pytext(text)


def test_templates_paste_no_raw_string_literals():
    """Every `"{{ ... }}"` in a template is a string literal pasted raw: they go through `| pystr` instead."""
    raw = []
    for path in sorted((ROOT / "specgen" / "templates").rglob("*.j2")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["']\{\{(?:(?!\}\}).)*\}\}["']""", line) and "pytext" not in line:
                raw.append(f"{path.name}:{n}: {line.strip()}")
    assert not raw, "\n".join(raw)


# ---------------------------------------------------------------------------------------------------------------
# Build-time failures: one line naming the path and the fix, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------------------------

def _build(capsys, out_dir, *specs) -> tuple[int, str]:
    rc, out, err = _run(capsys, "build", *(specs or (SMALL,)), "--out", out_dir)
    assert "Traceback" not in out + err
    return rc, err


def _one_line_error(rc: int, err: str, path, *words: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"specgen: error: {path}") and "; fix: " in lines[0], err
    for w in words:
        assert w in lines[0], err


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _two_specs(tmp_path) -> list[Path]:
    """nsa_small and a copy under another name: a build of two specs, four files."""
    other = tmp_path / "specs" / "nsa_other.yaml"
    other.parent.mkdir()
    other.write_text(SMALL.read_text().replace("name: nsa_small", "name: nsa_other"))
    return [SMALL, other]


def test_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    calls = []

    def full(f, data):
        calls.append(f.name)
        if len(calls) == 3:  # the third of four files: two temporary files already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write raises it: no file name
        f.write(data)

    monkeypatch.setattr(files, "_write", full)
    out = tmp_path / "out"
    rc, err = _build(capsys, out, *_two_specs(tmp_path))
    _one_line_error(rc, err, out, "no space left on the device", "free space")
    assert not out.exists()                                               # the folder it created is gone too


def test_full_disk_keeps_the_previous_build(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    specs = _two_specs(tmp_path)
    rc, err = _build(capsys, out, *specs)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    specs[1].write_text(specs[1].read_text().replace("max_seqlen: 4096", "max_seqlen: 2048"))

    def full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write", full)
    rc, err = _build(capsys, out, *specs)
    _one_line_error(rc, err, out, "no space left")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before        # old files intact, no temporary files


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EPERM])
def test_read_only_output(tmp_path, capsys, monkeypatch, code):
    # Tests run as root in CI, where chmod does not stop writes: the refusal is simulated where the OS raises it.
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    rc, err = _build(capsys, out)
    _one_line_error(rc, err, out, "cannot write", "writable")
    assert _files(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (covered by the monkeypatched test)")
def test_read_only_output_by_chmod(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc, err = _build(capsys, out)
    finally:
        out.chmod(0o755)
    _one_line_error(rc, err, out, "cannot write")
    assert _files(out) == []


def test_output_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    rc, err = _build(capsys, blocker / "sub")
    _one_line_error(rc, err, blocker / "sub", "is a file, not a folder")
    rc, err = _build(capsys, blocker)
    assert rc == 2 and "exists and is not a folder" in err
    assert blocker.read_text() == "not a folder\n"


def test_module_path_is_a_folder(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "nsa_small.py").mkdir(parents=True)
    rc, err = _build(capsys, out)
    _one_line_error(rc, err, out / "nsa_small.py", "a folder stands where a generated file must go", "remove")
    assert _files(out) == ["nsa_small.py"] and (out / "nsa_small.py").is_dir()


def test_stale_temporary_files_of_a_killed_build_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".nsa_small.py.k1ll3d.tmp", out / ".test_nsa_small.py.abc.tmp"]
    for p in stale:
        p.write_text("half a module")
    keep = out / ".other_spec.py.xyz.tmp"                                 # another spec's: not this build's to remove
    keep.write_text("x")
    rc, err = _build(capsys, out)
    assert rc == 0, err
    assert _files(out) == [keep.name, "nsa_small.py", "test_nsa_small.py"]


def _spec_with_record(tmp_path, record: str) -> Path:
    spec = tmp_path / "nsa_small.yaml"
    spec.write_text(SMALL.read_text())
    (tmp_path / "nsa_small.tune.json").write_text(record)
    return spec


@pytest.mark.parametrize("record, words", [
    ('{"entries": [', "not valid JSON"),
    ("[]", '{"entries": [...]}'),
    ('{"entries": [{"gpu": "H100"}]}', "spec_hash, gpu and triton"),
    ('{"entries": [{"spec_hash": "HASH", "gpu": "g", "triton": "t", "configs": {"window": {"bt": NaN}}}]}', "NaN"),
    ('{"entries": [{"spec_hash": "HASH", "gpu": "g", "triton": "t", "configs": {"window": {"bt": Infinity}}}]}',
     "Infinity"),
    ('{"entries": [{"spec_hash": "HASH", "gpu": "g", "triton": "t", "configs": {"window": {"bt": 1.5}}}]}',
     "configs.window.bt"),
    ('{"entries": [{"spec_hash": "HASH", "gpu": "g", "triton": "t", "configs": {"window": [1]}}]}',
     "configs.window"),
    ('{"entries": [{"spec_hash": "HASH", "gpu": "g", "triton": "t", "configs": 3}]}', "configs"),
], ids=["truncated", "not-a-record", "no-hash", "nan", "infinity", "float-config", "config-list", "configs-int"])
def test_malformed_tuning_record(tmp_path, capsys, record, words):
    spec = _spec_with_record(tmp_path, record.replace("HASH", load_spec(SMALL).hash))
    out = tmp_path / "out"
    rc, err = _build(capsys, out, spec)
    _one_line_error(rc, err, tmp_path / "nsa_small.tune.json", words, "fix: correct or delete nsa_small.tune.json")
    assert not out.exists()


def test_build_error_from_the_api(tmp_path, monkeypatch):
    """specgen.load raises the same BuildError (a user-facing error, not an OSError traceback)."""
    import specgen
    from specgen.compile import jit

    monkeypatch.setattr(jit, "_loaded", {})  # a new process: an earlier test's module must not answer
    (tmp_path / "cache").write_text("a file where the cache folder goes")
    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BuildError, match="is a file, not a folder"):
        specgen.load(SMALL)


def test_a_spec_object_in_python_matches_its_file():
    spec = load_spec(SMALL)
    assert isinstance(spec, Spec) and spec_from_yaml(SMALL.read_text()) == spec
