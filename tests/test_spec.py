"""The spec model: example specs, family defaults, hashing, round trips, and every error path with its location.

Error cases are written as YAML files under tmp_path. The line an error must point at is marked in the YAML with a
trailing `#<` comment, so the expected line is read from the text rather than counted by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from specgen.model import spec as spec_mod
from specgen.model.errors import SpecError, UnsupportedSpecError
from specgen.model.spec import (FAMILY_DEFAULTS, Spec, field_reference, load_spec, replace, spec_from_mapping,
                          spec_from_yaml)

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SPECS = sorted(p for p in SPECS_DIR.glob("*.yaml") if not p.name.endswith(".sweep.yaml"))
MARK = "#<"


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _marked_line(text: str) -> int | None:
    lines = [i + 1 for i, ln in enumerate(textwrap.dedent(text).lstrip("\n").splitlines()) if MARK in ln]
    assert len(lines) <= 1, "at most one marked line per case"
    return lines[0] if lines else None


def _check_error(err: SpecError, *, cls, field: str, file: str | None, line: int | None, match: str | None = None):
    assert type(err) is cls, f"{type(err).__name__} raised, {cls.__name__} expected: {err}"
    assert err.field == field, str(err)
    assert err.file == file, str(err)
    assert err.line == line, str(err)
    assert err.message
    assert err.fix, f"no fix given: {err}"
    if file is None:
        prefix = f"{field}: "
    elif line is None:
        prefix = f"{file}: {field}: "
    else:
        prefix = f"{file}:{line}: {field}: "
    assert str(err).startswith(prefix), f"{str(err)!r} does not start with {prefix!r}"
    assert f"\n  fix: {err.fix}" in str(err)
    if match is not None:
        assert re.search(match, str(err), re.S), f"{match!r} not in {str(err)!r}"


def _load_error(tmp_path: Path, text: str, field: str, *, cls=SpecError, match: str | None = None,
                line: int | None | str = "marked") -> SpecError:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    expected_line = _marked_line(text) if line == "marked" else line
    _check_error(info.value, cls=cls, field=field, file=str(path), line=expected_line, match=match)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Example specs
# ---------------------------------------------------------------------------------------------------------------

def test_examples_exist():
    assert {p.stem for p in SPECS} >= {"nsa_paper", "nsa_small", "nsa_config_a", "nsa_mqa", "nsa_token"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_loads_and_hash_is_stable(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert re.fullmatch(r"[0-9a-f]{16}", spec.hash)
    again = load_spec(path)
    assert again == spec and again.hash == spec.hash
    assert load_spec(str(path)).hash == spec.hash  # str or Path
    assert spec_from_yaml(path.read_text()).hash == spec.hash  # the file name is not part of the identity


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_round_trips(path):
    spec = load_spec(path)
    data = spec.to_dict()
    json.dumps(data)  # plain data only
    back = spec_from_mapping(data)
    assert back == spec and back.hash == spec.hash
    assert spec_from_mapping(copy.deepcopy(data)).to_dict() == data
    # and through YAML text, in either style
    assert spec_from_yaml(yaml.safe_dump(data, default_flow_style=False)).hash == spec.hash
    assert spec_from_yaml(yaml.safe_dump(data, default_flow_style=True)).hash == spec.hash


def test_example_hashes_are_distinct():
    hashes = [load_spec(p).hash for p in SPECS]
    assert len(set(hashes)) == len(hashes)


def test_nsa_paper_spec_is_the_nsa_defaults():
    assert load_spec(next(p for p in SPECS if p.stem == "nsa_paper")) == spec_from_yaml("name: nsa_paper")


def test_hash_ignores_formatting_key_order_and_defaults_written_out():
    flow = """
    name: nsa_small
    family: nsa
    heads: {q: 4, kv: 2}
    head_dim: {qk: 48, v: 32}
    dtype: fp16
    kv: independent
    compression: {block: 8, stride: 4, pool: mean}
    selection: {block: 16, top_k: 4, initial: 1, local: 1}
    window: {size: 16}
    max_seqlen: 4096
    """
    block_reordered = """
    # comments and blank lines do not matter

    max_seqlen: 4096
    window:
      size: 16
    selection:
      local: 1
      top_k: 4
      block: 16
      initial: 1
    compression:
      pool: mean
      stride: 4
      block: 8
    dtype: fp16
    head_dim:
      v: 32
      qk: 48
    heads:
      kv: 2
      q: 4
    name: "nsa_small"
    """
    defaults_written = flow + """
    causal: true
    scale: null
    mla: false
    branches: [compression, selection, window]
    indexer: null
    """
    defaults_written = defaults_written.replace("pool: mean}", "pool: mean, position_embedding: false}")
    defaults_written = defaults_written.replace("local: 1}", "local: 1, granularity: block, scorer: compression}")
    hashes = {spec_from_yaml(textwrap.dedent(t)).hash for t in (flow, block_reordered, defaults_written)}
    assert hashes == {load_spec(next(p for p in SPECS if p.stem == "nsa_small")).hash}


def test_hash_ignores_token_and_dsa_defaults_written_out():
    token = next(p for p in SPECS if p.stem == "nsa_token")
    explicit = token.read_text().replace("scorer: indexer}", "scorer: indexer, block: 1, initial: 0, local: 0}")
    assert explicit != token.read_text()
    assert spec_from_yaml(explicit).hash == load_spec(token).hash

    short = spec_from_yaml("name: v32\nfamily: dsa\n")
    full = spec_from_yaml(textwrap.dedent("""
        name: v32
        family: dsa
        heads: {q: 128, kv: 1}
        head_dim: {qk: 576, v: 512}
        kv: shared
        mla: true
        branches: [selection]
        selection: {granularity: token, block: 1, top_k: 2048, initial: 0, local: 0, scorer: indexer}
        indexer: {heads: 64, head_dim: 128, dtype: bf16, scale: null}
        compression: null
        window: null
        max_seqlen: 65536
        """))
    assert full == short and full.hash == short.hash
    # an integer written where a float is stored
    assert spec_from_yaml("name: a\nscale: 1\n").hash == spec_from_yaml("name: a\nscale: 1.0\n").hash


SEMANTIC_CHANGES = [
    ("name", "nsa_other"), ("dtype", "fp16"), ("scale", 0.1), ("kv", "shared"), ("max_seqlen", 32768),
    ("heads.q", 32), ("heads.kv", 8), ("head_dim.qk", 128), ("head_dim.v", 192),
    ("compression.block", 64), ("compression.stride", 32), ("compression.pool", "linear"),
    ("selection.block", 32), ("selection.top_k", 8), ("selection.initial", 0), ("selection.local", 1),
    ("window.size", 256), ("branches", ["selection", "compression", "window"]),
]


@pytest.mark.parametrize("path,value", SEMANTIC_CHANGES, ids=lambda x: str(x))
def test_hash_changes_with_each_semantic_field(path, value):
    base = spec_from_yaml("name: nsa_paper")
    changed = replace(base, **{path: value})
    assert changed != base and changed.hash != base.hash


def test_hash_changes_when_a_branch_is_dropped():
    base = spec_from_yaml("name: nsa_paper")
    # replace() keeps the other sections: dropping a branch means dropping its section too
    with pytest.raises(SpecError, match="not listed"):
        replace(base, branches=["compression", "selection"])
    assert replace(base, branches=["compression", "selection"], window=None).hash != base.hash


def test_hash_changes_in_yaml_edit_and_with_indexer_fields():
    token = next(p for p in SPECS if p.stem == "nsa_token")
    text = token.read_text()
    base = load_spec(token).hash
    for old, new in (("size: 512", "size: 256"), ("heads: 4, head_dim: 64", "heads: 8, head_dim: 64"),
                     ("head_dim: 64, dtype", "head_dim: 32, dtype"), ("top_k: 1024", "top_k: 512")):
        assert old in text
        assert spec_from_yaml(text.replace(old, new)).hash != base
    assert spec_from_yaml(text.replace("dtype: bf16}", "dtype: bf16, scale: 0.5}")).hash != base
    # the compression pool's position embedding
    lin = spec_from_yaml("name: a\ncompression: {pool: linear}\n")
    assert replace(lin, **{"compression.position_embedding": True}).hash != lin.hash


# ---------------------------------------------------------------------------------------------------------------
# Family defaults
# ---------------------------------------------------------------------------------------------------------------

def test_nsa_defaults_follow_the_paper():
    s = spec_from_mapping({"name": "x"})
    assert s.family == "nsa" and s.gated
    assert (s.heads.q, s.heads.kv, s.heads.group_size) == (64, 4, 16)
    assert (s.head_dim.qk, s.head_dim.v) == (192, 128)
    assert s.branches == ("compression", "selection", "window")
    assert (s.compression.block, s.compression.stride, s.compression.pool) == (32, 16, "mean")
    assert not s.compression.position_embedding
    sel = s.selection
    assert (sel.granularity, sel.block, sel.top_k, sel.initial, sel.local, sel.scorer) == (
        "block", 64, 16, 1, 2, "compression")
    assert s.window.size == 512
    assert s.indexer is None
    assert s.kv == "independent" and not s.mla and s.causal and s.dtype == "bf16"
    assert s.scale is None and s.softmax_scale == pytest.approx(192 ** -0.5)
    assert s.max_seqlen == 65536
    assert s.has == {"compression": True, "selection": True, "window": True}
    assert s.needs_compressed_kv


def test_dsa_defaults_follow_v32():
    s = spec_from_mapping({"name": "x", "family": "dsa"})
    assert s.family == "dsa" and not s.gated
    assert (s.heads.q, s.heads.kv, s.heads.group_size) == (128, 1, 128)
    assert (s.head_dim.qk, s.head_dim.v) == (576, 512)
    assert s.mla and s.kv == "shared"
    # No family default for the scale: null means head_dim.qk^-1/2 (V3.2's 192^-1/2 is written in its spec).
    assert s.scale is None and s.softmax_scale == 576 ** -0.5
    assert s.branches == ("selection",)
    assert s.compression is None and s.window is None
    sel = s.selection
    assert (sel.granularity, sel.top_k, sel.scorer, sel.block, sel.initial, sel.local) == (
        "token", 2048, "indexer", 1, 0, 0)
    assert (s.indexer.heads, s.indexer.head_dim, s.indexer.dtype, s.indexer.scale) == (64, 128, "bf16", None)
    assert s.has == {"compression": False, "selection": True, "window": False}
    assert not s.needs_compressed_kv


def test_a_dsa_spec_without_scale_uses_its_own_head_dim():
    # null means head_dim.qk^-1/2 in both families: a GQA DSA spec with d 64 must not inherit V3.2's 192^-1/2.
    s = spec_from_yaml("name: a\nfamily: dsa\nheads: {q: 8, kv: 2}\nhead_dim: {qk: 64, v: 64}\nmla: false\n"
                       "indexer: {heads: 2, head_dim: 32}\nselection: {top_k: 16}\nmax_seqlen: 4096\n")
    assert s.scale is None and s.softmax_scale == 64 ** -0.5
    assert load_spec(SPECS_DIR / "dsa_small.yaml").softmax_scale == 64 ** -0.5
    # V3.2 writes its value (that of the 192-dim unabsorbed head) in its spec. Its hash is pinned: it changed once,
    # when the spec gained `unabsorbed` (its tuning record's entry was re-keyed: the attention kernels are the same).
    v32 = load_spec(SPECS_DIR / "dsa_v32.yaml")
    assert v32.scale == pytest.approx(192 ** -0.5, rel=1e-15) and v32.softmax_scale == v32.scale
    assert v32.hash == "f65b6f7e53e808f0"


def test_unabsorbed_dims_are_hashed_when_given_and_left_out_when_not():
    """`unabsorbed` joined the schema after specs were hashed: a spec without it keeps its hash (written out as null
    too), and its dims are part of the identity of a spec that has it."""
    v32 = load_spec(SPECS_DIR / "dsa_v32.yaml")
    assert (v32.unabsorbed.qk, v32.unabsorbed.v) == (192, 128)
    bare = replace(v32, unabsorbed=None)
    assert bare.unabsorbed is None and bare.hash == "4ef8cc6027bb7f42"          # V3.2's hash before the field
    assert spec_from_mapping({**bare.to_dict(), "unabsorbed": None}).hash == bare.hash
    hashes = {v32.hash, bare.hash, replace(v32, **{"unabsorbed.qk": 128}).hash,
              replace(v32, **{"unabsorbed.v": 192}).hash}
    assert len(hashes) == 4


def test_loading_does_not_change_the_family_defaults():
    before = copy.deepcopy(FAMILY_DEFAULTS)
    for text in ("name: a\nfamily: dsa\n", "name: a\n", "name: a\nfamily: dsa\nselection: {top_k: 64}\n",
                 "name: a\nselection: {granularity: token, scorer: indexer}\nindexer: {}\n"):
        spec_from_yaml(text)
    for path in SPECS:
        load_spec(path)
    assert FAMILY_DEFAULTS == before


def test_spec_from_mapping_leaves_its_input_alone():
    data = {"name": "a", "selection": {"granularity": "token", "scorer": "indexer"}, "indexer": {}}
    before = copy.deepcopy(data)
    spec_from_mapping(data)
    assert data == before


def test_dropped_branches_drop_their_default_sections():
    s = spec_from_yaml("name: a\nkv: shared\nbranches: [compression, selection]\n")
    assert s.window is None and s.compression is not None
    s = spec_from_yaml("name: a\nbranches: [compression, window]\n")
    assert s.selection is None
    s = spec_from_yaml("name: a\nkv: shared\nbranches: [window]\n")
    assert (s.compression, s.selection, s.indexer) == (None, None, None) and s.window.size == 512
    # token selection ranked by the indexer needs no compressed keys
    s = spec_from_yaml("name: a\nbranches: [selection, window]\nselection: {granularity: token, scorer: indexer}\n"
                       "indexer: {}\n")
    assert s.compression is None and not s.needs_compressed_kv


def test_spec_is_frozen():
    s = spec_from_yaml("name: a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.heads.q = 8


# ---------------------------------------------------------------------------------------------------------------
# Errors: reading and parsing YAML
# ---------------------------------------------------------------------------------------------------------------

def test_unreadable_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    _check_error(info.value, cls=SpecError, field="<file>", file=str(path), line=None, match="cannot read")


def test_unreadable_file_directory(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    _check_error(info.value, cls=SpecError, field="<file>", file=str(tmp_path), line=None, match="cannot read")


def test_unreadable_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    _check_error(info.value, cls=SpecError, field="<file>", file=str(path), line=1, match="UTF-8")  # the byte's line


def test_invalid_yaml(tmp_path):
    _load_error(tmp_path, """
        name: a
        heads:
          q: 4
           kv: 2 #<
        """, "<yaml>", match="not valid YAML")


def test_invalid_yaml_unclosed_flow(tmp_path):
    # the parser reports where it noticed the problem: the first `:` after the unclosed brace
    _load_error(tmp_path, """
        name: a
        heads: {q: 4, kv: 2
        window: {size: 16} #<
        """, "<yaml>", match="not valid YAML: .*expected ',' or '}'")


def test_invalid_yaml_forbidden_character(tmp_path):
    _load_error(tmp_path, "name: a\nwindow: {size: 1\x01} #<\n", "<yaml>", match="not valid YAML")


def test_invalid_yaml_two_documents(tmp_path):
    _load_error(tmp_path, """
        name: a
        --- #<
        name: b
        """, "<yaml>", match="expected a single document")


def test_key_that_is_not_a_name(tmp_path):
    _load_error(tmp_path, """
        name: a
        ? [q, kv] #<
        : 4
        """, "<spec>", match="plain name")


def test_duplicate_key_top_level(tmp_path):
    _load_error(tmp_path, """
        name: a
        max_seqlen: 1024
        dtype: fp16
        max_seqlen: 2048 #<
        """, "max_seqlen", match="given twice")


def test_duplicate_key_nested(tmp_path):
    _load_error(tmp_path, """
        name: a
        heads:
          q: 4
          kv: 2
          q: 8 #<
        """, "heads.q", match="given twice")


def test_spec_that_is_not_a_mapping(tmp_path):
    _load_error(tmp_path, """
        # a list, not a mapping
        - name: a #<
        """, "<spec>", match="mapping")


def test_spec_that_is_a_scalar(tmp_path):
    _load_error(tmp_path, "just_a_name #<\n", "<spec>", match="mapping")


def test_empty_file_needs_a_name(tmp_path):
    # a missing key stands on no line: the error points at the spec's first line (file:line: field: every time)
    _load_error(tmp_path, "# nothing here\n", "name", match="is required", line=1)


def test_missing_name(tmp_path):
    _load_error(tmp_path, """
        heads: {q: 4, kv: 2} #<
        """, "name", match="is required")


def test_spec_from_mapping_not_a_mapping():
    with pytest.raises(SpecError) as info:
        spec_from_mapping(["name", "a"])
    _check_error(info.value, cls=SpecError, field="<spec>", file=None, line=None, match="mapping")


def test_spec_from_mapping_error_without_file():
    with pytest.raises(SpecError) as info:
        spec_from_mapping({"name": "a", "heads": {"q": 6, "kv": 4}})
    _check_error(info.value, cls=SpecError, field="heads.kv", file=None, line=None)


# ---------------------------------------------------------------------------------------------------------------
# Errors: keys, types and sections (_check_keys, _typed, _build, family)
# ---------------------------------------------------------------------------------------------------------------

PARSE_CASES = [
    # id, yaml, field, class, match
    ("unknown-top-suggest", """
        name: a
        selction: {top_k: 8} #<
        """, "selction", SpecError, "did you mean `selection`"),
    ("unknown-nested-suggest", """
        name: a
        selection:
          block: 64
          topk: 8 #<
        """, "selection.topk", SpecError, "did you mean `top_k`"),
    ("unknown-nested-flow", """
        name: a
        heads: {q: 4, kvs: 2} #<
        """, "heads.kvs", SpecError, "did you mean `kv`"),
    ("unknown-no-suggestion", """
        name: a
        dtype: fp16
        zzzzzz: 1 #<
        """, "zzzzzz", SpecError, "allowed keys here: name, family, heads"),
    ("unknown-in-indexer", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          heads: 4
          head_dims: 64 #<
        """, "indexer.head_dims", SpecError, "did you mean `head_dim`"),
    ("bad-family", """
        name: a
        family: gqa #<
        """, "family", SpecError, "'gqa' is not one of nsa, dsa"),
    ("family-list", """
        name: a
        family: [nsa] #<
        """, "family", SpecError, "is not one of"),
    ("family-mapping", """
        name: a
        family: {nsa: 1} #<
        """, "family", SpecError, "is not one of"),
    ("section-scalar", """
        name: a
        heads: 4 #<
        """, "heads", SpecError, "expected a mapping"),
    ("section-list", """
        name: a
        window: [512] #<
        """, "window", SpecError, "expected a mapping"),
    ("section-list-block-style", """
        name: a
        selection: #<
          - block: 64
        """, "selection", SpecError, "expected a mapping"),
    ("required-section-null", """
        name: a
        heads: null #<
        """, "heads", SpecError, "cannot be null"),
    ("required-section-empty", """
        name: a
        head_dim: #<
        """, "head_dim", SpecError, "cannot be null"),
    ("int-given-text", """
        name: a
        max_seqlen: lots #<
        """, "max_seqlen", SpecError, "expected a whole number, got 'lots'"),
    ("int-given-bool", """
        name: a
        heads:
          q: true #<
          kv: 1
        """, "heads.q", SpecError, "expected a whole number, got True"),
    ("int-given-float", """
        name: a
        selection: {top_k: 2.5} #<
        """, "selection.top_k", SpecError, "expected a whole number"),
    ("int-given-list", """
        name: a
        window:
          size: [512] #<
        """, "window.size", SpecError, "expected a whole number"),
    ("int-negative", """
        name: a
        window:
          size: -4 #<
        """, "window.size", SpecError, "must not be negative"),
    ("int-negative-nested-flow", """
        name: a
        selection: {local: -1} #<
        """, "selection.local", SpecError, "must not be negative"),
    ("name-not-text", """
        name: 12 #<
        """, "name", SpecError, "expected text"),
    ("bool-given-int", """
        name: a
        causal: 1 #<
        """, "causal", SpecError, "expected true or false"),
    ("bool-given-text", """
        name: a
        compression: {position_embedding: "yes"} #<
        """, "compression.position_embedding", SpecError, "expected true or false"),
    ("text-given-int", """
        name: a
        dtype: 16 #<
        """, "dtype", SpecError, "expected text"),
    ("choice-dtype", """
        name: a
        dtype: int8 #<
        """, "dtype", SpecError, "'int8' is not one of bf16, fp16, fp32"),
    ("choice-kv", """
        name: a
        kv: separate #<
        """, "kv", SpecError, "not one of shared, independent"),
    ("choice-pool", """
        name: a
        compression:
          pool: max #<
        """, "compression.pool", SpecError, "not one of mean, linear"),
    ("choice-granularity", """
        name: a
        selection:
          granularity: head #<
        """, "selection.granularity", SpecError, "not one of block, token"),
    ("choice-scorer", """
        name: a
        selection: {scorer: random} #<
        """, "selection.scorer", SpecError, "not one of compression, indexer"),
    ("choice-indexer-dtype", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer: {dtype: fp4} #<
        """, "indexer.dtype", SpecError, "not one of bf16, fp8_e4m3"),
    ("float-given-text", """
        name: a
        scale: fast #<
        """, "scale", SpecError, "expected a positive number or null"),
    ("float-exponent-without-dot", """
        name: a
        scale: 1e-3 #<
        """, "scale", SpecError, r"write 1\.0e-3"),
    ("float-negative", """
        name: a
        scale: -0.5 #<
        """, "scale", SpecError, "positive number"),
    ("float-zero", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          scale: 0 #<
        """, "indexer.scale", SpecError, "positive number"),
    ("float-bool", """
        name: a
        scale: true #<
        """, "scale", SpecError, "positive number"),
    ("float-inf", """
        name: a
        scale: .inf #<
        """, "scale", SpecError, "positive number"),
    ("float-nan", """
        name: a
        scale: .nan #<
        """, "scale", SpecError, "positive number"),
    ("branches-text", """
        name: a
        branches: selection #<
        """, "branches", SpecError, "expected a list"),
    ("branches-mapping", """
        name: a
        branches: {selection: 1} #<
        """, "branches", SpecError, "expected a list"),
    ("branches-unknown", """
        name: a
        branches: [compression, selection, gating] #<
        """, "branches", SpecError, "'gating' is not a branch"),
    ("branches-twice", """
        name: a
        branches: #<
          - compression
          - selection
          - compression
        """, "branches", SpecError, "lists a branch twice"),
    ("branches-empty", """
        name: a
        branches: [] #<
        """, "branches", SpecError, "is empty"),
]


@pytest.mark.parametrize("text,field,cls,match", [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_errors(tmp_path, text, field, cls, match):
    _load_error(tmp_path, text, field, cls=cls, match=match)


# ---------------------------------------------------------------------------------------------------------------
# Errors: validation (_validate)
# ---------------------------------------------------------------------------------------------------------------

VALIDATE_CASES = [
    ("name-not-identifier", """
        name: NSA-small #<
        """, "name", SpecError, "not a lowercase identifier"),
    ("name-leading-digit", """
        dtype: fp16
        name: 1nsa #<
        """, "name", SpecError, "not a lowercase identifier"),
    ("name-empty", """
        name: "" #<
        """, "name", SpecError, "not a lowercase identifier"),
    ("heads-q-zero", """
        name: a
        heads:
          q: 0 #<
          kv: 1
        """, "heads.q", SpecError, "at least 1"),
    ("heads-kv-zero", """
        name: a
        heads:
          q: 4
          kv: 0 #<
        """, "heads.kv", SpecError, "at least 1"),
    ("q-not-divisible-by-kv", """
        name: a
        heads:
          q: 64
          kv: 3 #<
        """, "heads.kv", SpecError, r"64 query heads do not split into 3 .*pick heads.kv dividing 64"),
    ("q-smaller-than-kv", """
        name: a
        heads: {q: 2, kv: 4} #<
        """, "heads.kv", SpecError, "do not split"),
    ("head-dim-not-multiple-of-16", """
        name: a
        head_dim:
          qk: 100 #<
          v: 128
        """, "head_dim.qk", SpecError, "multiple of 16"),
    ("head-dim-too-large", """
        name: a
        head_dim:
          qk: 192
          v: 2048 #<
        """, "head_dim.v", SpecError, "between 16 and 1024"),
    ("head-dim-zero", """
        name: a
        head_dim: {qk: 0} #<
        """, "head_dim.qk", SpecError, "not supported"),
    ("causal-false", """
        name: a
        causal: false #<
        """, "causal", UnsupportedSpecError, "non-causal"),
    ("mla-v-wider-than-k", """
        name: a
        heads: {q: 16, kv: 1}
        head_dim:
          qk: 128
          v: 256 #<
        kv: shared
        mla: true
        """, "head_dim.v", SpecError, "cannot be wider"),
    ("mla-gqa", """
        name: a
        heads: {q: 16, kv: 4}
        kv: shared
        mla: true #<
        """, "mla", SpecError, "MQA"),
    ("mla-independent-kv", """
        name: a
        heads: {q: 16, kv: 1}
        kv: independent
        mla: true #<
        """, "mla", SpecError, "kv: shared"),
    ("mla-unwritten-points-at-heads", """
        name: a
        family: dsa
        heads:
          kv: 2 #<
        """, "mla", SpecError, "set heads.kv: 1"),
    ("mla-nsa-token", """
        name: a
        heads: {q: 16, kv: 1}
        kv: shared
        mla: true #<
        selection: {granularity: token, scorer: indexer, top_k: 256}
        indexer: {heads: 4, head_dim: 64}
        """, "mla", UnsupportedSpecError, "DSA setting"),
    ("independent-kv-one-branch", """
        name: a
        branches: [window]
        kv: independent #<
        """, "kv", SpecError, "more than one branch"),
    ("independent-kv-default-points-at-branches", """
        name: a
        branches: [window] #<
        """, "kv", SpecError, "set kv: shared"),
    ("listed-branch-null", """
        name: a
        window: null #<
        """, "window", SpecError, "listed but has no settings"),
    ("listed-branch-without-default", """
        name: a
        family: dsa
        kv: shared
        branches: [selection, window] #<
        """, "window", SpecError, "listed but has no settings"),
    ("compression-section-unlisted", """
        name: a
        branches: [selection, window]
        compression: {block: 32} #<
        selection: {granularity: token, scorer: indexer, top_k: 256}
        indexer: {heads: 4, head_dim: 64}
        """, "compression", SpecError, "not listed"),
    ("window-section-unlisted", """
        name: a
        branches: [compression, selection]
        window: #<
          size: 64
        """, "window", SpecError, "not listed"),
    ("selection-section-unlisted", """
        name: a
        branches: [compression, window]
        selection: {top_k: 8} #<
        """, "selection", SpecError, "not listed"),
    ("compression-block-not-pow2", """
        name: a
        compression:
          block: 24 #<
          stride: 8
        """, "compression.block", SpecError, "24 is not a power of two.*use 32"),
    ("compression-block-zero", """
        name: a
        compression: {block: 0} #<
        """, "compression.block", SpecError, "0 is outside 1..256 .must be at least 1"),
    ("compression-stride-not-pow2", """
        name: a
        compression:
          block: 32
          stride: 12 #<
        """, "compression.stride", SpecError, "12 is not a power of two"),
    ("compression-stride-not-dividing-block", """
        name: a
        selection: {block: 64}
        compression:
          block: 16
          stride: 32 #<
        """, "compression.stride", SpecError, "stride 32 must divide the block length 16"),
    ("position-embedding-mean-pool", """
        name: a
        compression:
          pool: mean
          position_embedding: true #<
        """, "compression.position_embedding", SpecError, "linear pool"),
    ("token-with-compression-scorer", """
        name: a
        selection:
          granularity: token
          scorer: compression #<
        """, "selection.scorer", SpecError, "token granularity needs the indexer scorer"),
    ("token-default-scorer", """
        name: a
        selection: {granularity: token} #<
        """, "selection.scorer", SpecError, "indexer scorer"),
    ("compression-scorer-without-settings", """
        name: a
        kv: shared
        branches: [selection, window]
        compression: null
        selection:
          scorer: compression #<
        """, "selection.scorer", SpecError, "needs compression settings"),
    ("compression-scorer-without-branch", """
        name: a
        branches: [selection, window] #<
        """, "branches", UnsupportedSpecError, "compression branch.*must exist"),
    ("indexer-scorer-without-indexer", """
        name: a
        selection:
          granularity: token
          scorer: indexer #<
        """, "indexer", SpecError, "no indexer is described"),
    ("selection-block-not-pow2", """
        name: a
        selection:
          block: 48 #<
        """, "selection.block", SpecError, "48 is not a power of two"),
    ("stride-not-dividing-selection-block", """
        name: a
        compression: {block: 32, stride: 16}
        selection:
          block: 8 #<
          top_k: 8
        """, "selection.block", SpecError, "stride 16 must divide the selection block 8"),
    ("top-k-more-than-blocks", """
        name: a
        max_seqlen: 1024
        selection:
          block: 64
          top_k: 32 #<
        """, "selection.top_k", SpecError, "32 blocks asked .* only 16 blocks of 64.*top_k <= 16"),
    ("forced-blocks-exceed-top-k", """
        name: a
        selection:
          top_k: 2 #<
          initial: 1
          local: 2
        """, "selection.top_k", SpecError, "1 initial \\+ 2 local forced blocks exceed top_k 2"),
    ("top-k-zero-block", """
        name: a
        selection: {top_k: 0, initial: 0, local: 0} #<
        """, "selection.top_k", SpecError, "at least 1"),
    ("top-k-zero-token", """
        name: a
        selection: {granularity: token, scorer: indexer, top_k: 0} #<
        indexer: {}
        """, "selection.top_k", SpecError, "at least 1"),
    ("token-block-not-one", """
        name: a
        selection:
          granularity: token
          scorer: indexer
          block: 64 #<
        indexer: {}
        """, "selection.block", SpecError, "one token"),
    ("token-forced-initial", """
        name: a
        selection:
          granularity: token
          scorer: indexer
          initial: 1 #<
        indexer: {}
        """, "selection.initial", SpecError, "block granularity only"),
    ("token-forced-local", """
        name: a
        selection:
          granularity: token
          scorer: indexer
          local: 2 #<
        indexer: {}
        """, "selection.local", SpecError, "block granularity only"),
    ("token-top-k-beyond-max-seqlen", """
        name: a
        max_seqlen: 1024
        selection:
          granularity: token
          scorer: indexer
          top_k: 2048 #<
        indexer: {}
        """, "selection.top_k", SpecError, "2048 tokens asked but max_seqlen is 1024"),
    ("indexer-without-indexer-scorer", """
        name: a
        indexer: #<
          heads: 4
        """, "indexer", SpecError, "selection.scorer is not indexer"),
    ("indexer-without-selection", """
        name: a
        kv: shared
        branches: [compression, window]
        indexer: {heads: 4} #<
        """, "indexer", SpecError, "selection.scorer is not indexer"),
    ("indexer-head-dim-not-pow2", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          head_dim: 48 #<
        """, "indexer.head_dim", SpecError, "48 is not a power of two >= 16"),
    ("indexer-head-dim-too-small", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer: {head_dim: 8} #<
        """, "indexer.head_dim", SpecError, "8 is outside 16..256 .must be at least 16"),
    ("indexer-heads-zero", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          heads: 0 #<
        """, "indexer.heads", SpecError, "at least 1"),
    ("indexer-fp8-narrow", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          head_dim: 16
          dtype: fp8_e4m3 #<
        """, "indexer.dtype", UnsupportedSpecError, "reduction dim of at least 32"),
    ("indexer-stage", """
        name: a
        selection: {granularity: token, scorer: indexer}
        indexer:
          stage: warmup #<
        """, "indexer.stage", SpecError, "not one of dense, sparse"),
    ("window-size-zero", """
        name: a
        window:
          size: 0 #<
        """, "window.size", SpecError, "at least 1"),
    ("max-seqlen-zero", """
        name: a
        max_seqlen: 0 #<
        """, "max_seqlen", SpecError, "at least 1"),
    ("dsa-extra-branch", """
        name: a
        family: dsa #<
        branches: [selection, window]
        window: {size: 128}
        """, "family", SpecError, "indexer-scored selection branch alone"),
    ("dsa-compression-scorer", """
        name: a
        family: dsa
        selection: {granularity: block, block: 64, top_k: 16, scorer: compression} #<
        """, "selection.scorer", SpecError, "needs compression settings"),
    ("dsa-no-selection", """
        name: a
        family: dsa #<
        branches: [window]
        window: {size: 128}
        indexer: null
        """, "family", SpecError, "selection branch alone"),
    ("unabsorbed-without-mla", """
        name: a
        family: dsa
        heads: {q: 8, kv: 2}
        mla: false
        unabsorbed: {qk: 64, v: 64} #<
        """, "unabsorbed", SpecError, "not MLA"),
    ("unabsorbed-dim-not-16", """
        name: a
        family: dsa
        unabsorbed:
          qk: 100 #<
          v: 128
        """, "unabsorbed.qk", SpecError, "100 is not supported"),
    ("unabsorbed-v-missing", """
        name: a
        family: dsa
        unabsorbed: {qk: 192} #<
        """, "unabsorbed.v", SpecError, "is required"),
    ("unabsorbed-ambiguous", """
        name: a
        family: dsa
        heads: {q: 1, kv: 1}
        unabsorbed: {qk: 576, v: 128} #<
        """, "unabsorbed.qk", SpecError, "absorbed form's shape"),
]


@pytest.mark.parametrize("text,field,cls,match", [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES])
def test_validation_errors(tmp_path, text, field, cls, match):
    _load_error(tmp_path, text, field, cls=cls, match=match)


def test_unsupported_is_a_spec_error():
    assert issubclass(UnsupportedSpecError, SpecError) and issubclass(SpecError, ValueError)


def test_boundaries_that_are_allowed():
    # the edges of the checks above load
    spec_from_yaml("name: a\nmax_seqlen: 1024\nselection: {top_k: 16}\n")  # exactly max_seqlen / block blocks
    spec_from_yaml("name: a\nselection: {top_k: 3, initial: 1, local: 2}\n")  # forced blocks fill top_k
    spec_from_yaml("name: a\nmax_seqlen: 1024\nselection: {granularity: token, scorer: indexer, top_k: 1024}\n"
                   "indexer: {}\n")
    spec_from_yaml("name: a\nhead_dim: {qk: 1024, v: 16}\n")
    spec_from_yaml("name: a\ncompression: {block: 64, stride: 64}\nselection: {block: 64}\n")  # l = d = l'
    spec_from_yaml("name: a\ncompression: {pool: linear, position_embedding: true}\n")
    spec_from_yaml("name: a\nheads: {q: 7, kv: 7}\nwindow: {size: 1}\nmax_seqlen: 64\nselection: {top_k: 1, "
                   "initial: 0, local: 0}\n")
    spec_from_yaml("name: a\nkv: shared\nbranches: [window]\n")


# ---------------------------------------------------------------------------------------------------------------
# replace() and field_reference()
# ---------------------------------------------------------------------------------------------------------------

def test_replace_changes_and_validates():
    base = load_spec(next(p for p in SPECS if p.stem == "nsa_small"))
    smaller = replace(base, **{"selection.block": 32, "selection.top_k": 2, "selection.local": 1})
    assert (smaller.selection.block, smaller.selection.top_k) == (32, 2)
    assert base.selection.block == 16  # the original is untouched
    assert replace(base, dtype="fp32").dtype == "fp32"
    assert replace(base) == base

    with pytest.raises(SpecError) as info:
        replace(base, **{"selection.block": 48})
    _check_error(info.value, cls=SpecError, field="selection.block", file=None, line=None, match="power of two")

    with pytest.raises(SpecError) as info:
        replace(base, **{"heads.kv": 3})
    _check_error(info.value, cls=SpecError, field="heads.kv", file=None, line=None)

    with pytest.raises(UnsupportedSpecError) as info:
        replace(base, causal=False)
    _check_error(info.value, cls=UnsupportedSpecError, field="causal", file=None, line=None)

    with pytest.raises(SpecError) as info:
        replace(base, **{"selection.topk": 4})
    _check_error(info.value, cls=SpecError, field="selection.topk", file=None, line=None, match="did you mean")

    with pytest.raises(SpecError) as info:
        replace(base, **{"window.size": "wide"})
    _check_error(info.value, cls=SpecError, field="window.size", file=None, line=None)


def test_replace_adds_a_section_that_was_absent():
    base = load_spec(next(p for p in SPECS if p.stem == "nsa_config_a"))
    assert base.window is None
    added = replace(base, branches=["compression", "selection", "window"], **{"window.size": 128})
    assert added.window.size == 128 and added.branches[-1] == "window"
    with pytest.raises(SpecError) as info:  # settings for a branch that is not listed
        replace(base, **{"window.size": 128})
    _check_error(info.value, cls=SpecError, field="window", file=None, line=None, match="not listed")


def test_replace_can_switch_family_and_branches():
    dsa = replace(spec_from_yaml("name: a"), family="dsa", branches=["selection"], kv="shared", mla=True,
                  compression=None, window=None,
                  selection={"granularity": "token", "top_k": 2048, "scorer": "indexer", "block": 1, "initial": 0,
                             "local": 0},
                  indexer={"heads": 64, "head_dim": 128},
                  heads={"q": 128, "kv": 1}, head_dim={"qk": 576, "v": 512}, scale=None)
    assert dsa == spec_from_yaml("name: a\nfamily: dsa\n")


def _leaf_paths(cls, prefix=""):
    for f in dataclasses.fields(cls):
        section = spec_mod._section_type(f)
        yield prefix + f.name
        if section is not None:
            yield from _leaf_paths(section, prefix + f.name + ".")


def test_field_reference_lists_every_field_with_its_doc():
    rows = field_reference()
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(_leaf_paths(Spec))
    for path, default, allowed, doc in rows:
        assert doc and isinstance(doc, str), path
        if allowed == "section":
            assert default == ""
        elif default != "required":
            json.loads(default)
    by_path = {r[0]: r for r in rows}
    assert by_path["name"][1] == "required"
    assert by_path["heads"][2] == "section"
    assert by_path["dtype"][1:3] == ('"bf16"', "bf16 \\| fp16 \\| fp32")
    assert json.loads(by_path["branches"][1]) == ["compression", "selection", "window"]
    assert json.loads(by_path["selection.top_k"][1]) == 16
    assert json.loads(by_path["indexer.scale"][1]) is None
    for expected in ("heads.q", "heads.kv", "head_dim.qk", "head_dim.v", "compression.block", "compression.stride",
                     "compression.pool", "compression.position_embedding", "selection.granularity",
                     "selection.block", "selection.initial", "selection.local", "selection.scorer", "window.size",
                     "indexer.heads", "indexer.head_dim", "indexer.dtype", "max_seqlen", "mla", "kv", "causal",
                     "scale", "family"):
        assert expected in by_path


# ---------------------------------------------------------------------------------------------------------------
# The error class itself
# ---------------------------------------------------------------------------------------------------------------

def test_error_rendering_and_located():
    e = SpecError("window.size", "must be at least 1", "set a positive window")
    assert str(e) == "window.size: must be at least 1\n  fix: set a positive window"
    assert str(SpecError("a", "b")) == "a: b"
    placed = e.located("s.yaml", 7)
    assert (placed.file, placed.line) == ("s.yaml", 7)
    assert str(placed).startswith("s.yaml:7: window.size: must be at least 1")
    assert str(SpecError("a", "b", file="s.yaml")) == "s.yaml: a: b"
    # a location it already has wins; the class is kept
    u = UnsupportedSpecError("causal", "no", "set causal: true", file="x.yaml", line=3)
    moved = u.located("y.yaml", 9)
    assert type(moved) is UnsupportedSpecError and (moved.file, moved.line) == ("x.yaml", 3)


def test_error_pickles():
    for e in (SpecError("heads.kv", "bad", "fix it", file="s.yaml", line=4),
              UnsupportedSpecError("causal", "no", "set causal: true")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e)
        assert (back.field, back.message, back.fix, back.file, back.line) == (e.field, e.message, e.fix, e.file,
                                                                             e.line)
        assert str(back) == str(e)
