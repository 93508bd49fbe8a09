"""Write the spec fuzz corpus: malformed and unusual spec files that `specgen check` and `specgen build` must refuse
with exit 2, a `file:line: field:` message with a `fix:`, no traceback, and nothing written.

Run from the repository root: `python tests/spec_fuzz/make_corpus.py` rewrites tests/spec_fuzz/cases/ (sorted,
deterministic: the same bytes every run). Each case file starts with `# expect: FIELD` (the field path the error
names, or its start for an alias's expansion path), and the line the error must point at carries `#<` (no
marker: any line, for an alias bomb whose expansion stops deep inside the aliased values, or an empty file). tests/test_spec_fuzz.py runs them.

Categories: malformed YAML; every numeric field below and above its bounds, and of the wrong type; every text and
boolean field of the wrong type; names that collide (with a test file, with imported modules, keywords, too
long); aliases (recursive, a "billion laughs" bomb, merge keys); YAML tags; huge numbers; unknown keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"

# Valid bases, one line per top-level key (flow style), so a case edits one line and marks it.
NSA = {
    "name": "fz_nsa",
    "family": "nsa",
    "heads": {"q": "4", "kv": "2"},
    "head_dim": {"qk": "48", "v": "32"},
    "dtype": "fp16",
    "kv": "independent",
    "compression": {"block": "8", "stride": "4", "pool": "mean"},
    "selection": {"block": "16", "top_k": "4", "initial": "1", "local": "1"},
    "window": {"size": "16"},
    "max_seqlen": "4096",
    "decode": {"max_q_len": "4", "page_size": "64"},
}
DSA = {
    "name": "fz_dsa",
    "family": "dsa",
    "heads": {"q": "8", "kv": "2"},
    "head_dim": {"qk": "64", "v": "64"},
    "dtype": "fp16",
    "kv": "shared",
    "mla": "false",
    "selection": {"granularity": "token", "top_k": "16", "scorer": "indexer"},
    "indexer": {"heads": "2", "head_dim": "32", "dtype": "bf16"},
    "max_seqlen": "4096",
}

# Numeric fields: (base, path, values that must be refused). Each bound is hit from below and above, plus
# absurd sizes; the bounds themselves are spec.py's.
BIG = "9" * 40
NUMERIC = [
    (NSA, "heads.q", ["0", "-1", "257", "1000000", BIG]),
    (NSA, "heads.kv", ["0", "-3", "257", "3"]),
    (NSA, "head_dim.qk", ["0", "8", "40", "1040", "2048", BIG]),
    (NSA, "head_dim.v", ["0", "24", "4096"]),
    (NSA, "compression.block", ["0", "6", "512", BIG]),
    (NSA, "compression.stride", ["0", "3", "16", "512"]),
    (NSA, "selection.block", ["0", "12", "512", "2048"]),
    (NSA, "selection.top_k", ["0", "-1", "1000", "9000", BIG]),
    (NSA, "selection.initial", ["-1", "9000"]),
    (NSA, "selection.local", ["-1", "9000"]),
    (NSA, "window.size", ["0", "-16", "2147483648", "1048577", BIG]),
    (NSA, "max_seqlen", ["0", "-1", "1048577", "2147483648", BIG]),
    (NSA, "decode.max_q_len", ["0", "65", "1000000"]),
    (NSA, "decode.page_size", ["0", "8", "48", "2048", BIG]),
    (DSA, "indexer.heads", ["0", "129", "1000000"]),
    (DSA, "indexer.head_dim", ["0", "8", "48", "512"]),
    (DSA, "selection.top_k", ["0", "4097", "9000"]),
]
# Scales: fp32's normal range, positive.
SCALES = [(NSA, "scale"), (DSA, "indexer.scale")]
HUGE = "9" * 400  # more than a float holds: float() of it overflows
SCALE_VALUES = ["0", "-0.5", "1.0e-40", "1.0e+39", ".inf", ".nan", "1e-3", "'0.1'", "[0.1]", "true", HUGE,
                "-" + HUGE, "1" + "0" * 39]
# Wrong types for every whole-number field (one representative of each kind), and a number beyond any float.
WRONG_INT = ["4.5", "'4'", "true", "null", "[4]", "{q: 4}", "four", HUGE, "-" + HUGE, "4.0e+400"]
INT_FIELDS = [(NSA, p) for p in ("heads.q", "heads.kv", "head_dim.qk", "head_dim.v", "compression.block",
                                 "compression.stride", "selection.block", "selection.top_k", "selection.initial",
                                 "selection.local", "window.size", "max_seqlen", "decode.max_q_len",
                                 "decode.page_size")] + [(DSA, "indexer.heads"), (DSA, "indexer.head_dim")]
# Text fields with choices, and booleans.
TEXT_FIELDS = [(NSA, "family", ["dsb", "7", "[nsa]", "NSA"]),
               (NSA, "dtype", ["fp64", "16", "[bf16]", "null", "BF16"]),
               (NSA, "kv", ["both", "1", "null"]),
               (NSA, "compression.pool", ["max", "1", "[mean]"]),
               (NSA, "selection.granularity", ["tile", "1"]),
               (NSA, "selection.scorer", ["random", "null"]),
               (DSA, "indexer.dtype", ["fp8", "int8", "1"]),
               (DSA, "indexer.stage", ["warm", "2"])]
BOOL_FIELDS = [(NSA, "causal", ["'yes'", "1", "null", "maybe", "false"]),
               (DSA, "mla", ["'no'", "0", "[true]"]),
               (NSA, "compression.position_embedding", ["1", "'true'", "true"])]
SECTIONS = ["heads", "head_dim", "compression", "selection", "window", "decode"]
SECTION_VALUES = ["4", "[4, 2]", "text", "true"]

# Names: collisions with a test file, with modules the generated code, its tests or Python import; keywords;
# not identifiers; too long (236 characters passed `check`, then `build` failed on the test file).
NAMES = ["test_nsa_small", "nsa_small_test", "torch", "triton", "specgen", "numpy", "sympy", "pytest", "os", "sys",
         "math", "typing", "random", "conftest", "class", "import", "None", "'1abc'", "Nsa", "nsa-small", "'nsa small'",
         "'nsa.small'", "''", "'a\"\\nimport os\\n'", "\"x'\\nimport os\"", "_private", "a" * 129, "a" * 236,
         "'caf\u00e9'", "2024-01-01", "2024-13-45", "12", "1.5", "true", "null", "[a, b]", "{a: 1}"]

# Whole files: (case name, expected field, text); `#<` marks the line the error names.
FILES = [
    ("yaml_tab_indent", "<yaml>", "name: a\nheads:\n\tq: 4 #<\n"),
    ("yaml_unclosed_flow", "<yaml>", "name: a\nheads: {q: 4, kv: 2\nwindow: {size: 4} #<\n"),
    ("yaml_bad_indent", "<yaml>", "name: a\nheads:\n  q: 4\n kv: 2 #<\n"),
    ("yaml_unclosed_quote", "<yaml>", "name: 'a\n"),  # found at the end of the file
    ("yaml_two_documents", "<yaml>", "name: a\n--- #<\nname: b\n"),
    ("yaml_control_char", "<yaml>", "name: a\x07 #<\n"),
    ("yaml_duplicate_key", "name", "name: a\nname: b #<\n"),
    ("yaml_duplicate_section_key", "heads.q", "name: a\nheads: {q: 4, q: 8} #<\n"),
    ("yaml_root_list", "<spec>", "- name: a #<\n"),
    ("yaml_root_scalar", "<spec>", "just text #<\n"),
    ("yaml_empty", "name", ""),
    ("yaml_comment_only", "name", "# nothing\n"),
    ("yaml_key_is_list", "<spec>", "name: a\n[a, b]: 1 #<\n"),
    ("yaml_key_is_mapping", "<spec>", "name: a\n{a: 1}: 2 #<\n"),
    ("yaml_deep_nesting", "<yaml>", "name: a\nx: " + "[" * 200 + "]" * 200 + " #<\n"),
    ("yaml_null_section", "heads", "name: a\nheads: #<\n"),
    ("yaml_long_key", "<spec>", "name: a\n" + "k" * 200 + ": 1 #<\n"),
    ("unknown_key_top", "heds", "name: a\nheds: {q: 4} #<\n"),
    ("unknown_key_section", "selection.topk", "name: a\nselection: {topk: 4} #<\n"),
    ("unknown_key_sweep_field", "question", "name: a\nquestion: why #<\n"),
    ("alias_recursive_list", "loop[0]", "name: a\nloop: &a [*a] #<\n"),
    ("alias_recursive_map", "loop.x", "name: a\nloop: &a {x: *a} #<\n"),
    ("alias_billion_laughs", "x",
     "name: a\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
     + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))),
    ("alias_bomb_in_section", "heads",
     "name: a\nheads:\n  q: 4\n  kv: 2\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))),
    ("alias_merge_key", "head_dim", "name: a\nheads: &b {q: 4, kv: 2}\nhead_dim: {<<: *b} #<\n"),
    ("alias_undefined", "<yaml>", "name: a\nheads: *nowhere #<\n"),
    ("alias_wrong_type", "heads.q", "name: a\nheads: {q: &n [4], kv: *n} #<\n"),
    ("tag_python_object", "heads", "name: a\nheads: !!python/object:os.system {} #<\n"),
    ("tag_python_name", "name", "name: !!python/name:os.system #<\n"),
    ("tag_custom", "name", "name: !mine a #<\n"),
    ("tag_binary", "name", "name: !!binary YWJj #<\n"),
    ("tag_set", "branches", "name: a\nbranches: !!set {selection, window} #<\n"),
    ("tag_omap", "heads", "name: a\nheads: !!omap [{q: 4}, {kv: 2}] #<\n"),
    ("tag_bool_maybe", "causal", "name: a\ncausal: !!bool maybe #<\n"),
    ("tag_int_abc", "max_seqlen", "name: a\nmax_seqlen: !!int abc #<\n"),
    ("tag_float_abc", "scale", "name: a\nscale: !!float abc #<\n"),
    ("tag_timestamp_foo", "scale", "name: a\nscale: !!timestamp foo #<\n"),
    ("tag_str_number", "max_seqlen", "name: a\nmax_seqlen: !!str 4096 #<\n"),
    ("tag_null_name", "name", "name: !!null a #<\n"),
    ("int_5000_digits", "max_seqlen", "name: a\nmax_seqlen: " + "9" * 5000 + " #<\n"),
    ("int_4000_digits", "max_seqlen", "name: a\nmax_seqlen: " + "9" * 4000 + " #<\n"),
    ("int_hex_huge", "heads.q", "name: a\nheads: {q: 0x" + "f" * 300 + ", kv: 2} #<\n"),
    ("float_overflow", "scale", "name: a\nscale: 1.0e+400 #<\n"),
    ("float_underflow", "scale", "name: a\nscale: 1.0e-400 #<\n"),
    ("branches_empty", "branches", "name: a\nbranches: [] #<\n"),
    ("branches_twice", "branches", "name: a\nbranches: [window, window] #<\n"),
    ("branches_unknown", "branches", "name: a\nbranches: [compression, sliding] #<\n"),
    ("branches_text", "branches", "name: a\nbranches: window #<\n"),
    ("branches_nested", "branches", "name: a\nbranches: [[window]] #<\n"),
]


def flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return value


def spec_text(base: dict, path: str, raw: str) -> str:
    """`base` with the field at `path` written as `raw` (YAML text), its line marked `#<`."""
    top, _, sub = path.partition(".")
    lines = []
    done = False
    for key, value in base.items():
        if key == top:
            value = {**value, sub: raw} if sub else raw
            lines.append(f"{key}: {flow(value)} #<")
            done = True
        else:
            lines.append(f"{key}: {flow(value)}")
    if not done:
        if sub:
            lines.append(f"{top}: {{{sub}: {raw}}} #<")
        else:
            lines.append(f"{top}: {raw} #<")
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text)[:24].strip("_")
    return out or "empty"


def cases() -> dict[str, str]:
    """{file name: text} of every case."""
    out: dict[str, str] = {}

    def add(name: str, field: str, text: str) -> None:
        name = name.replace(".", "_")
        assert name not in out, name
        out[f"{name}.yaml"] = f"# expect: {field}\n{text}"

    for base, path, values in NUMERIC:
        for i, v in enumerate(values):
            add(f"range_{base['family']}_{path}_{i}_{slug(v)}", path, spec_text(base, path, v))
    for base, path in SCALES:
        for i, v in enumerate(SCALE_VALUES):
            add(f"range_{base['family']}_{path}_{i}_{slug(v)}", path, spec_text(base, path, v))
    for base, path in INT_FIELDS:
        for i, v in enumerate(WRONG_INT):
            add(f"type_{base['family']}_{path}_{i}_{slug(v)}", path, spec_text(base, path, v))
    for base, path, values in TEXT_FIELDS + BOOL_FIELDS:
        for i, v in enumerate(values):
            # (`causal: false` and `position_embedding: true` have the right type: the model refuses the value)
            add(f"type_{base['family']}_{path}_{i}_{slug(v)}", path, spec_text(base, path, v))
    for section in SECTIONS:
        for i, v in enumerate(SECTION_VALUES):
            add(f"section_{section}_{i}_{slug(v)}", section, spec_text(NSA, section, v))
    for i, name in enumerate(NAMES):
        add(f"name_{i:02d}_{slug(name)}", "name", spec_text(NSA, "name", name))
    for name, field, text in FILES:
        add(name, field, text)
    return out


def main() -> None:
    if CASES.exists():
        shutil.rmtree(CASES)
    CASES.mkdir(parents=True)
    for name, text in sorted(cases().items()):
        (CASES / name).write_bytes(text.encode("utf-8"))
    print(f"{len(list(CASES.iterdir()))} cases in {CASES}")


if __name__ == "__main__":
    main()
