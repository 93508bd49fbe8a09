"""The spec model: YAML parsed into typed, frozen dataclasses, validated, and hashed.

A spec is the single source of truth for a sparse-attention variant. Everything downstream (analysis, rendering,
tuning, benchmarks, sweeps) reads a `Spec`, never the YAML. Each field carries its documentation and allowed values
in its dataclass metadata, so the README's reference table and the error messages come from one place.

Defaults depend on the family: `nsa` follows the NSA paper (arXiv 2502.11089), `dsa` DeepSeek-V3.2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import SpecError, UnsupportedSpecError

SCHEMA_VERSION = 1

BRANCHES = ("compression", "selection", "window")
DTYPES = ("bf16", "fp16", "fp32")
INDEXER_DTYPES = ("bf16", "fp8_e4m3")
INDEXER_STAGES = ("dense", "sparse")
LOOP_ORDERS = ("auto", "query", "kv")
# The block-outer selection kernel attends one selected block per tile: its keys are the dot's columns.
KV_ORDER_MIN_BLOCK = 16
# The largest head dim the kernels split into power-of-two parts (576 = 512 + 64 for MLA).
MAX_HEAD_DIM = 1024
# Bounds of the numeric fields: what the kernels can run. Positions, lengths and block counts are int32 inside the
# kernels (and top-k sort keys hold a position in 32 bits): 2^20 tokens keeps every sum of positions (t + window,
# t + q_len, a page's first token) far from 2^31. Head counts: a kv group's query heads are the rows of one tile
# (V3.2: 128), grids hold batch x kv heads. Top-k: the selection is one register row per query (V3.2: 2048 tokens).
MAX_SEQLEN = 1 << 20
MAX_HEADS = 256
MAX_BLOCK = 256
MAX_TOP_K = 8192
MAX_INDEXER_HEADS = 128
MAX_INDEXER_HEAD_DIM = 256
MAX_PAGE_SIZE = 1024
# Scales are fp32 inside the kernels: outside its normal range they flush to 0 or overflow to inf.
FP32_MIN_NORMAL = 1.1754943508222875e-38
FP32_MAX = 3.4028234663852886e38
POSITIONS = "positions are int32 in the kernels"


def _f(doc: str, default: Any = dataclasses.MISSING, choices: tuple | None = None,
       bounds: tuple | None = None, **kw) -> Any:
    """A field with its doc, and its allowed values: `choices`, or `bounds` (low, high, why) of a number."""
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = choices
    if bounds is not None:
        meta["bounds"] = bounds
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Heads:
    q: int = _f("query heads", 64, bounds=(1, MAX_HEADS, "a kv group's query heads are the rows of one tile"))
    kv: int = _f("key/value heads (q = kv: MHA, 1: MQA, else GQA); query heads of one kv head form a group", 4,
                 bounds=(1, MAX_HEADS, "kv heads divide the query heads"))

    @property
    def group_size(self) -> int:
        return self.q // self.kv


@dataclass(frozen=True)
class HeadDims:
    # Bounds (16..MAX_HEAD_DIM, multiples of 16) are checked in _validate, with the kernels' reason.
    qk: int = _f("head dim of queries and keys; a multiple of 16 up to 1024, split into power-of-two parts", 192)
    v: int = _f("head dim of values and outputs; a multiple of 16 up to 1024", 128)


@dataclass(frozen=True)
class Compression:
    block: int = _f("compression block length l (tokens pooled into one compressed key); a power of two", 32,
                    bounds=(1, MAX_BLOCK, "a block is one tile of the pooling kernel"))
    stride: int = _f("compression stride d between block starts; d divides l and the selection block", 16,
                     bounds=(1, MAX_BLOCK, "at most the block length"))
    pool: str = _f("how a block's tokens are pooled: mean, or a learned linear map of the flattened block",
                   "mean", choices=("mean", "linear"))
    position_embedding: bool = _f("linear pool only: add a learned [l, D] intra-block position embedding first",
                                  False)


@dataclass(frozen=True)
class Selection:
    granularity: str = _f("select blocks of `block` tokens, or single tokens", "block", choices=("block", "token"))
    block: int = _f("selection block length l' (1 at token granularity)", 64,
                    bounds=(1, MAX_BLOCK, "a selected block is read as whole key tiles"))
    top_k: int = _f("blocks (block granularity) or tokens (token granularity) attended per query and kv group", 16,
                    bounds=(1, MAX_TOP_K, "a query's selection is one register row"))
    initial: int = _f("leading blocks always selected (counted within top_k); block granularity only", 1,
                      bounds=(0, MAX_TOP_K, "counted within top_k"))
    local: int = _f("most recent blocks always selected (counted within top_k); block granularity only", 2,
                    bounds=(0, MAX_TOP_K, "counted within top_k"))
    scorer: str = _f("what ranks the candidates: the compression branch's probabilities, or a lightning indexer",
                     "compression", choices=("compression", "indexer"))
    loop_order: str = _f("the selected-block attention's loop order, forward and backward: auto (the plan decides per "
                         "pass), query (query outer: each query gathers its blocks), or kv (block outer: each selected "
                         "block attends the queries that chose it); blocks of 16+ tokens only (docs/selection_order.md)",
                         "auto", choices=LOOP_ORDERS)


@dataclass(frozen=True)
class Window:
    size: int = _f("sliding window w: keys with t - w < s <= t", 512, bounds=(1, MAX_SEQLEN, POSITIONS))


@dataclass(frozen=True)
class Indexer:
    heads: int = _f("indexer heads H_I", 4, bounds=(1, MAX_INDEXER_HEADS, "the score tile holds 128 rows"))
    head_dim: int = _f("indexer head dim d_I (a power of two, at least 16)", 64,
                       bounds=(16, MAX_INDEXER_HEAD_DIM, "one dot's reduction dim"))
    dtype: str = _f("dtype the top-k scores in: bf16, or fp8_e4m3 (q_I per (token, head) and k_I per token scaled "
                    "by amax/448; needs a GPU with fp8, sm89+)", "bf16", choices=INDEXER_DTYPES)
    scale: float | None = _f("index score scale; null means d_I^-1/2 * H_I^-1/2", None,
                             bounds=(FP32_MIN_NORMAL, FP32_MAX, "fp32's normal range"))
    stage: str = _f("training stage distill_loss defaults to: dense (warm-up, target over all s <= t) or sparse "
                    "(target over the selected set)", "sparse", choices=INDEXER_STAGES)


@dataclass(frozen=True)
class Unabsorbed:
    """The per-head dims of an MLA spec's attention before absorption (DeepSeek-V3: each query head has its own key
    of 128 "nope" + 64 rope dims and its own value of 128 dims; absorbing the key and value up-projections into the
    queries and outputs gives the MQA form of head_dim.qk / head_dim.v that the sparse kernels run). The dense
    warm-up stage of distill_loss takes q and k in this form (a key per query head: a third of the absorbed form's
    main-logit work at V3.2's dims; docs/distill.md), and the benchmarks compare MLA specs with dense attention of
    these heads."""
    qk: int = _f("per-head query/key dims of the unabsorbed attention (DeepSeek-V3: 192 = 128 + 64 rope); a "
                 "multiple of 16 up to 1024, split into power-of-two parts")
    v: int = _f("per-head value dims of the unabsorbed attention (DeepSeek-V3: 128); a multiple of 16 up to 1024")


@dataclass(frozen=True)
class Decode:
    max_q_len: int = _f("decode: new queries per sequence and step, 1 up to this (speculative / multi-token)", 4,
                        bounds=(1, 64, "a step's queries are rows of one tile"))
    page_size: int = _f("decode: tokens per page of a paged KV cache (a power of two >= 16)", 64,
                        bounds=(16, MAX_PAGE_SIZE, "a page is read as key tiles"))


@dataclass(frozen=True)
class Spec:
    name: str = _f("identifier of the variant: names the generated module and its functions; lowercase letters, "
                   "digits and _, at most 128 characters, not a Python keyword, not test_* or *_test, and not a "
                   "module the generated code or Python imports (torch, triton, os, ...)")
    family: str = _f("nsa (gated compression/selection/window branches) or dsa (indexer + token-sparse attention)",
                     "nsa", choices=("nsa", "dsa"))
    heads: Heads = _f("head counts", default_factory=Heads)
    head_dim: HeadDims = _f("head dims", default_factory=HeadDims)
    dtype: str = _f("dtype of q, k, v and outputs; accumulation is fp32", "bf16", choices=DTYPES)
    causal: bool = _f("causal attention (the only mode the selection rules are defined for)", True)
    scale: float | None = _f("softmax scale; null (or left out) means head_dim.qk^-1/2 for both families "
                             "(DeepSeek-V3.2 writes 192^-1/2, its unabsorbed head's, in its spec)", None,
                             bounds=(FP32_MIN_NORMAL, FP32_MAX, "fp32's normal range"))
    kv: str = _f("shared: one k/v feeds every branch; independent: each branch gets its own k/v (the paper)",
                 "independent", choices=("shared", "independent"))
    mla: bool = _f("MLA in MQA mode: V is the first head_dim.v dims of K (read once, dV added into dK)", False)
    unabsorbed: Unabsorbed | None = _f("MLA only: the head dims of the attention before absorption (one key per "
                                       "query head), the dense distillation stage's other form of q and k and "
                                       "the dense baseline of the benchmarks", None)
    branches: tuple[str, ...] = _f("which branches exist, in the order of the gate channels",
                                   ("compression", "selection", "window"))
    compression: Compression | None = _f("compression branch settings", None)
    selection: Selection | None = _f("selection branch settings", None)
    window: Window | None = _f("sliding-window branch settings", None)
    indexer: Indexer | None = _f("lightning indexer (selection.scorer: indexer)", None)
    max_seqlen: int = _f("longest sequence the kernels are planned for (bounds top_k and grid sizes)", 65536,
                         bounds=(1, MAX_SEQLEN, POSITIONS))
    decode: Decode = _f("decoding from a contiguous or paged KV cache", default_factory=Decode)

    # -- derived facts every consumer needs; the analysis module derives the rest --------------------------------
    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim.qk ** -0.5

    @property
    def scale_text(self) -> str:
        """The effective softmax scale and where it comes from, for `specgen explain` and `specgen list`."""
        if self.scale is not None:
            return f"{self.scale:.6g} (written)"
        return f"{self.softmax_scale:.6g} (head_dim.qk^-1/2 = {self.head_dim.qk}^-1/2)"

    @property
    def gated(self) -> bool:
        """NSA mixes its branches with gates; DSA has one branch and no gates."""
        return self.family == "nsa"

    @property
    def has(self) -> dict[str, bool]:
        return {b: b in self.branches for b in BRANCHES}

    @property
    def needs_compressed_kv(self) -> bool:
        return "compression" in self.branches or (
            self.selection is not None and self.selection.scorer == "compression")

    def to_dict(self) -> dict:
        return _plain(self)

    def written(self) -> dict:
        """to_dict() without the top-level fields left out of the hash at their default (`unabsorbed: null`): what a
        generated module writes as its SPEC, so the modules of specs that leave a later field out render as
        before. spec_from_mapping(spec.written()) == spec."""
        plain = self.to_dict()
        return {k: v for k, v in plain.items() if _HASH_OMITS_DEFAULT.get((None, k), ...) != v}

    @property
    def hash(self) -> str:
        """Identity of the spec: what it computes, independent of YAML formatting and of defaults written out."""
        blob = json.dumps({"schema": SCHEMA_VERSION, "spec": _hashed(self.to_dict())}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTION_TYPES = {"heads": Heads, "head_dim": HeadDims, "unabsorbed": Unabsorbed, "compression": Compression,
                 "selection": Selection, "window": Window, "indexer": Indexer, "decode": Decode}

_SECTIONS_BY_TYPE = {cls.__name__: cls for cls in SECTION_TYPES.values()}

# Family defaults, written as YAML would be; the user's mapping is merged over them.
FAMILY_DEFAULTS: dict[str, dict] = {
    "nsa": {
        "heads": {"q": 64, "kv": 4}, "head_dim": {"qk": 192, "v": 128}, "kv": "independent", "mla": False,
        "branches": ["compression", "selection", "window"],
        "compression": {}, "selection": {}, "window": {},
    },
    "dsa": {
        "heads": {"q": 128, "kv": 1}, "head_dim": {"qk": 576, "v": 512}, "kv": "shared", "mla": True,
        # No scale: null means head_dim.qk^-1/2 for every family. V3.2 scales by its 192-dim unabsorbed head
        # (128 nope + 64 rope), not 576^-1/2: specs/dsa_v32.yaml writes that value out.
        "branches": ["selection"],
        "selection": {"granularity": "token", "top_k": 2048, "scorer": "indexer"},
        "indexer": {"heads": 64, "head_dim": 128, "dtype": "bf16"},
    },
}


def _section_type(f: dataclasses.Field):
    """The dataclass a field holds, if it is a section (`heads: Heads`, `window: Window | None`)."""
    name = (f.type if isinstance(f.type, str) else f.type.__name__).removesuffix(" | None")
    return _SECTIONS_BY_TYPE.get(name)


# Fields added after specs were hashed, left out of the hash at their default: an existing spec keeps its hash (its
# tuning records and cache keys), and writing the default out changes nothing either. (section, name), or
# (None, name) for a top-level field; set to anything else, a field is hashed as every other one.
_HASH_OMITS_DEFAULT = {("selection", "loop_order"): "auto", (None, "unabsorbed"): None}


def _hashed(plain: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plain.items()}
    for (section, name), default in _HASH_OMITS_DEFAULT.items():
        if section is None:
            if name in out and out[name] == default:
                del out[name]
        elif isinstance(out.get(section), dict) and out[section].get(name) == default:
            del out[section][name]
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------------------------

class _Located:
    """Where each field path stands in the source file."""

    def __init__(self, file: str | None):
        self.file = file
        self.lines: dict[str, int] = {}

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None

    def error(self, path: str, message: str, fix: str = "", cls=SpecError, near: str | None = None) -> SpecError:
        """`near`: where to point when `path` is not written in the file (a default the user's choice conflicts with)."""
        line = self.line(path) or (self.line(near) if near else None)
        if line is None and self.file is not None:
            # Not written in the file (a required field, a default in conflict): point at the spec's first line.
            line = self.lines.get("<spec>", 1)
        return cls(path, message, fix, file=self.file, line=line)


# A spec is a few dozen values: these bounds refuse an alias bomb ("billion laughs"), a file of megabytes or a deeply
# nested value at once, instead of growing memory until the process is killed.
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
# The tags a spec's plain values resolve to; anything else (`!!python/...`, `!custom`, `!!binary`) is refused.
_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "timestamp")}


def _compose(text: str, where: _Located) -> Any:
    import yaml  # the generator may import yaml; generated modules never do

    if len(text) > MAX_SPEC_BYTES:
        raise SpecError("<file>", f"{len(text)} characters: too long for a spec (at most {MAX_SPEC_BYTES})",
                        "a spec is a short list of fields: check that this is the right file", file=where.file, line=1)
    try:
        _check_depth(text, where)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return {}
        where.lines["<spec>"] = node.start_mark.line + 1
        return _node_value(node, "", where, _Budget())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError (a forbidden character) has no mark
        line = mark.line + 1 if mark else text.count("\n", 0, position) + 1 if position is not None else None
        problem = " ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None))))
        if isinstance(exc, yaml.reader.ReaderError):
            code = exc.character if isinstance(exc.character, int) else ord(exc.character)
            problem = f"the character U+{code:04X} is not allowed in YAML (a control character or a stray byte)"
        problem = " ".join(str(problem or exc).split())  # one line
        raise SpecError("<yaml>", f"not valid YAML: {problem}",
                        "check indentation and quoting near that line", file=where.file, line=line or 1) from None


def _check_depth(text: str, where: _Located) -> None:
    """Refuse deep nesting before composing: the YAML composer recurses once per level (a RecursionError)."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise SpecError("<yaml>", f"nested more than {MAX_YAML_DEPTH} levels deep", "a spec nests sections "
                                "two levels deep: write `key:` followed by indented keys", file=where.file,
                                line=event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _Budget:
    """Nodes visited so far: aliases re-visit their anchor's nodes, so this bounds what an alias bomb expands to."""

    def __init__(self):
        self.nodes = 0
        self.open: set[int] = set()  # ids of the collections being expanded: an alias to one of them is a cycle


def _line(node) -> int:
    return node.start_mark.line + 1


def _node_value(node, path: str, where: _Located, budget: _Budget | None = None, depth: int = 0) -> Any:
    import yaml

    budget = budget or _Budget()
    budget.nodes += 1
    here = path or "<spec>"
    if budget.nodes > MAX_YAML_NODES:
        # The node itself stands where its anchor was written: point at the key being expanded instead.
        line = where.line(here.partition("[")[0]) or _line(node)
        raise SpecError(here, f"expands to more than {MAX_YAML_NODES} YAML values (aliases repeat what they name)",
                        "write the values out; a spec needs no aliases that expand this far",
                        file=where.file, line=line)
    if depth > MAX_YAML_DEPTH:
        raise SpecError(here, f"nested more than {MAX_YAML_DEPTH} levels deep", "flatten the value",
                        file=where.file, line=_line(node))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in budget.open:
            raise SpecError(here, "a recursive alias: the value contains itself", "remove the alias (`*name`) "
                            "that points back into its own anchor (`&name`)", file=where.file, line=_line(node))
        budget.open.add(id(node))
        try:
            return _collection_value(node, path, where, budget, depth)
        finally:
            budget.open.discard(id(node))
    if node.tag not in _PLAIN_TAGS:
        raise SpecError(here, f"the YAML tag {_tag_text(node.tag)} is not supported in a spec",
                        "remove the tag and write a plain value", file=where.file, line=_line(node))
    # Construct the scalar directly: re-serialising it fails for an empty value (`key:` with nothing after it).
    try:
        value = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except Exception:  # a tagged value the tag cannot read (`!!int abc`, `!!bool maybe`), a date like 2024-13-45,
        # or an integer of thousands of digits: the constructor raises whatever its parser raised
        tag = node.tag.rpartition(":")[2]
        fix = {"int": "write a whole number within the field's range", "float": "write a number like 0.125",
               "bool": "write true or false", "timestamp": "quote it to write text (YAML reads it as a date)"}.get(
            tag, "write a plain value")
        if _explicit_tag(node):
            fix += f", without the `!!{tag}` tag"
        raise SpecError(here, f"YAML cannot read {_short(node.value)} as {'an' if tag == 'int' else 'a'} {tag}",
                        fix, file=where.file, line=_line(node)) from None
    return value


def _explicit_tag(node) -> bool:
    """Whether the file wrote the tag (`!!int abc`) rather than YAML resolving a plain value to it."""
    import yaml

    if node.style is not None:  # quoted: implicitly text
        return node.tag != "tag:yaml.org,2002:str"
    return node.tag != yaml.SafeLoader.resolve(yaml.SafeLoader, yaml.ScalarNode, node.value, (True, False))


def _collection_value(node, path: str, where: _Located, budget: _Budget, depth: int) -> Any:
    import yaml

    standard = "tag:yaml.org,2002:map" if isinstance(node, yaml.MappingNode) else "tag:yaml.org,2002:seq"
    if node.tag != standard:
        raise SpecError(path or "<spec>", f"the YAML tag {_tag_text(node.tag)} is not supported in a spec",
                        "remove the tag and write a plain mapping or list", file=where.file, line=_line(node))
    if isinstance(node, yaml.SequenceNode):
        return [_node_value(v, f"{path}[{i}]", where, budget, depth + 1) for i, v in enumerate(node.value)]
    out = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError(path or "<spec>", "a key must be a plain name, not a list or mapping",
                            "write `key: value` with a plain key", file=where.file, line=_line(key_node))
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise SpecError(path or "<spec>", "merge keys (`<<:`) are not supported in a spec",
                            "write the keys out", file=where.file, line=_line(key_node))
        key = key_node.value
        if len(key) > 100 or "\n" in key:
            raise SpecError(path or "<spec>", f"{_short(key)} is not a key of a spec", "write `key: value` with a "
                            "field name from the spec reference", file=where.file, line=_line(key_node))
        sub = f"{path}.{key}" if path else key
        if key in out:
            raise SpecError(sub, "given twice", "keep one", file=where.file, line=_line(key_node))
        where.lines[sub] = _line(key_node)
        out[key] = _node_value(value_node, sub, where, budget, depth + 1)
    return out


def _tag_text(tag: str) -> str:
    return _short(tag.replace("tag:yaml.org,2002:", "!!"))


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value for a message, cut to `limit` characters (a spec may hold a 5000-digit number)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" if text[0] in "'\"" else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Parsing: mapping -> dataclasses, with type checks
# ---------------------------------------------------------------------------------------------------------------

def _merge(base: Mapping, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(cls, data: Mapping, path: str, where: _Located) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            sub = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"allowed keys here: {', '.join(allowed)}"
            raise where.error(sub, "unknown key", hint)


def _typed(value: Any, f: dataclasses.Field, path: str, where: _Located) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    choices = f.metadata.get("choices")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(path, f"expected a whole number, got {_short(value)}", f"write {f.name}: <integer>")
        if value < 0:
            raise where.error(path, f"must not be negative, got {_short(value)}", "use a positive whole number")
        _check_bounds(value, f, path, where)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise where.error(path, f"expected true or false, got {_short(value)}", f"write {f.name}: true|false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise where.error(path, f"expected text, got {_short(value)}",
                              f'write {f.name}: "<text>" (quoted, so that YAML reads it as text)')
        if choices and value not in choices:
            raise where.error(path, f"{_short(value)} is not one of {', '.join(choices)}", f"pick one of {', '.join(choices)}")
        return value
    if kind == "float | None":
        if value is None:
            return None
        # (isfinite only on floats: an int of hundreds of digits overflows float(); the bounds below refuse it)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or isinstance(value, float) and not math.isfinite(value) or value <= 0):
            fix = "write a number > 0, or null"
            if isinstance(value, str) and re.fullmatch(r"[0-9.]+[eE][-+]?[0-9]+", value.strip()):
                fix += " (YAML reads 1e-3 as text: write 1.0e-3)"
            raise where.error(path, f"expected a positive number or null, got {_short(value)}", fix)
        _check_bounds(value, f, path, where)
        return float(value)
    if kind == "tuple[str, ...]":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise where.error(path, f"expected a list, got {_short(value)}", f"write {f.name}: [compression, selection, window]")
        for item in value:
            if item not in BRANCHES:
                raise where.error(path, f"{_short(item)} is not a branch", f"branches are {', '.join(BRANCHES)}")
        if len(set(value)) != len(value):
            raise where.error(path, "lists a branch twice", "name each branch once")
        if not value:
            raise where.error(path, "is empty", "name at least one branch")
        return tuple(value)
    raise AssertionError(f"unhandled field type {kind}")  # pragma: no cover - schema bug


def _check_bounds(value, f: dataclasses.Field, path: str, where: _Located) -> None:
    bounds = f.metadata.get("bounds")
    if bounds is None:
        return
    lo, hi, why = bounds
    if not lo <= value <= hi:
        rule = f"must be at least {_number(lo)}" if value < lo else f"at most {_number(hi)}: {why}"
        raise where.error(path, f"{_short(value)} is outside {_number(lo)}..{_number(hi)} ({rule})",
                          f"use a value between {_number(lo)} and {_number(hi)}")


def _number(x) -> str:
    return f"{x:.9g}" if isinstance(x, float) else str(x)


def _build(cls, data: Mapping, path: str, where: _Located):
    if not isinstance(data, Mapping):
        raise where.error(path, f"expected a mapping of keys, got {_short(data)}", f"write `{path}:` followed by indented keys")
    _check_keys(cls, data, path, where)
    values = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise where.error(sub, "is required", f"add `{f.name}:` to the spec")
            continue
        value = data[f.name]
        section = _section_type(f)
        if section is not None:
            if value is None and f.default is not None:
                raise where.error(sub, "cannot be null", f"remove `{f.name}:` to use the defaults, or give its keys")
            values[f.name] = None if value is None else _build(section, value, sub, where)
        else:
            values[f.name] = _typed(value, f, sub, where)
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Validation: the combinations the kernels support, each refusal with its reason and fix
# ---------------------------------------------------------------------------------------------------------------

def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# A spec's name names its module (NAME.py), its test (test_NAME.py), its cache folder and its torch ops.
# NAME.py, test_NAME.py, a build's .test_NAME.py.XXXXXXXX.tmp and specgen.load's cache folder NAME_<hash>_<record>
# stay far below the 255 bytes a file name may have.
MAX_NAME = 128
# Modules the generated code, its tests and pytest import: a generated NAME.py beside its tests would shadow them.
RESERVED_NAMES = frozenset({"torch", "triton", "specgen", "numpy", "sympy", "pytest", "jinja2", "yaml", "conftest",
                            "pluggy", "setuptools", "pkg_resources", "typing_extensions", "filelock", "networkx",
                            "fsspec", "mpmath"})


def _name_problem(name: str) -> tuple[str, str] | None:
    """Why `name` cannot name a generated module (message, fix), or None."""
    import keyword
    import sys

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        return f"{_short(name)} is not a lowercase identifier", "use letters, digits and _ , e.g. nsa_small"
    if len(name) > MAX_NAME:
        return (f"{len(name)} characters: a name is at most {MAX_NAME} (it names files and folders)",
                "use a shorter name")
    if keyword.iskeyword(name):
        return f"{name!r} is a Python keyword: the module could not be imported by name", "pick another name"
    if name.startswith("test_"):
        return (f"{name}.py is the test file a build writes for a spec named {name.removeprefix('test_')!r}: "
                "the two would overwrite each other", "drop the test_ prefix")
    if name.endswith("_test"):
        return f"pytest would collect {name}.py as a test file", "drop the _test suffix"
    if name in RESERVED_NAMES or name in sys.stdlib_module_names:
        return (f"{name!r} is a module the generated code, its tests or Python import: {name}.py in the build "
                "folder would shadow it, and every test there would fail to import", f"use e.g. {name}_spec")
    return None


def _validate(spec: Spec, where: _Located) -> None:
    err = where.error
    if not isinstance(spec.name, str):
        raise err("name", f"expected text, got {_short(spec.name)}", 'write name: "<text>"')
    problem = _name_problem(spec.name)
    if problem is not None:
        raise err("name", *problem)
    h = spec.heads
    if h.q < 1 or h.kv < 1:
        raise err("heads.q" if h.q < 1 else "heads.kv", "head counts must be at least 1",
                  "set heads.q and heads.kv to positive numbers")
    if spec.max_seqlen < 1:  # before the checks that divide by it
        raise err("max_seqlen", "must be at least 1", "set the longest sequence you will run")
    if h.q % h.kv:
        raise err("heads.kv", f"{h.q} query heads do not split into {h.kv} equal groups",
                  f"pick heads.kv dividing {h.q} (e.g. {', '.join(str(d) for d in _divisors(h.q)[:6])})")
    for name, dim in (("qk", spec.head_dim.qk), ("v", spec.head_dim.v)):
        if dim % 16 or not 16 <= dim <= MAX_HEAD_DIM:
            raise err(f"head_dim.{name}", f"{dim} is not supported: the kernels split a head dim into power-of-two "
                      f"parts of at least 16 (the matrix unit's smallest K)",
                      f"use a multiple of 16 between 16 and {MAX_HEAD_DIM} (pad the projection if needed)")
    if not spec.causal:
        raise err("causal", "non-causal attention is not supported: compression visibility, selection candidates and "
                  "forced local blocks are defined for causal attention only", "set causal: true",
                  cls=UnsupportedSpecError)
    if spec.mla:
        if spec.head_dim.v > spec.head_dim.qk:
            raise err("head_dim.v", "with mla, V is the first head_dim.v dims of K, so it cannot be wider",
                      "set head_dim.v <= head_dim.qk")
        if spec.kv != "shared" or h.kv != 1:
            raise err("mla", "MLA mode shares one latent K/V across all heads (MQA) and all branches",
                      "set heads.kv: 1 and kv: shared, or mla: false", near="heads.kv" if h.kv != 1 else "kv")
    un = spec.unabsorbed
    if un is not None:
        if not spec.mla:
            raise err("unabsorbed", "the unabsorbed head dims describe an MLA spec's attention before absorption; "
                      "this spec is not MLA (its q and k are already per-head)",
                      "remove the `unabsorbed` section, or set mla: true", near="mla")
        for name, dim in (("qk", un.qk), ("v", un.v)):
            if dim % 16 or not 16 <= dim <= MAX_HEAD_DIM:
                raise err(f"unabsorbed.{name}", f"{dim} is not supported: the kernels split a head dim into "
                          f"power-of-two parts of at least 16 (the matrix unit's smallest K)",
                          f"use a multiple of 16 between 16 and {MAX_HEAD_DIM}")
        if h.q == h.kv and un.qk == spec.head_dim.qk:
            # distill_loss tells the two forms of q and k apart by k's head count and dim.
            raise err("unabsorbed.qk", f"with one query head and unabsorbed.qk = head_dim.qk = {un.qk}, unabsorbed "
                      "q and k would have the absorbed form's shape", "remove the `unabsorbed` section (one head "
                      "gains nothing from it), or fix its dims")
    if spec.kv == "independent" and len(spec.branches) == 1:
        raise err("kv", "independent k/v needs more than one branch", "set kv: shared", near="branches")

    present = set(spec.branches)
    for section in ("compression", "selection", "window"):
        value = getattr(spec, section)
        if section in present and value is None:
            raise err(section, f"branch {section!r} is listed but has no settings", f"add a `{section}:` section",
                      near="branches")
    sel, cmp_, win, idx = spec.selection, spec.compression, spec.window, spec.indexer
    if spec.compression is not None and not spec.needs_compressed_kv:
        raise err("compression", "settings given for a compression branch that is not listed and feeds no scorer",
                  "add compression to branches, or remove the section")
    if spec.window is not None and "window" not in present:
        raise err("window", "settings given for a branch that is not listed", "add window to branches, or remove it")
    if spec.selection is not None and "selection" not in present:
        raise err("selection", "settings given for a branch that is not listed", "add selection to branches")

    if cmp_ is not None:
        l, d = cmp_.block, cmp_.stride
        for key, val in (("block", l), ("stride", d)):
            if not _pow2(val):
                raise err(f"compression.{key}", f"{val} is not a power of two (kernel tiles are powers of two)",
                          f"use {_pow2_near(val)}")
        if d > l or l % d:
            raise err("compression.stride", f"stride {d} must divide the block length {l}",
                      f"use a stride among {', '.join(str(x) for x in _divisors(l) if _pow2(x))}")
        if cmp_.position_embedding and cmp_.pool != "linear":
            raise err("compression.position_embedding", "a position embedding only applies to the linear pool",
                      "set pool: linear, or position_embedding: false")
    if sel is not None:
        if sel.granularity == "token" and sel.scorer != "indexer":
            raise err("selection.scorer", "token granularity needs the indexer scorer: compression scores are constant "
                      "over d-token chunks, so a token top-k over them is only tie-breaking",
                      "set selection.scorer: indexer (and add an indexer section), or granularity: block")
        if sel.scorer == "compression" and cmp_ is None:
            raise err("selection.scorer", "the compression scorer needs compression settings",
                      "add a compression section (and the branch), or use scorer: indexer")
        if sel.scorer == "compression" and "compression" not in present:
            raise err("branches", "the compression scorer ranks blocks with the compression branch's attention "
                      "probabilities, so that branch must exist", "add compression to branches, or use scorer: indexer",
                      cls=UnsupportedSpecError)
        if sel.scorer == "indexer" and idx is None:
            raise err("indexer", "selection.scorer is indexer but no indexer is described", "add an `indexer:` section",
                      near="selection.scorer")
        if sel.loop_order == "kv" and (sel.granularity != "block" or sel.block < KV_ORDER_MIN_BLOCK):
            raise err("selection.loop_order", f"the block-outer order attends one selected block per tile, so a block "
                      f"needs at least {KV_ORDER_MIN_BLOCK} tokens (matrix-unit rows); this selection has "
                      f"{'single tokens' if sel.granularity != 'block' else f'blocks of {sel.block}'}",
                      "use loop_order: auto or query")
        if sel.granularity == "block":
            if not _pow2(sel.block):
                raise err("selection.block", f"{sel.block} is not a power of two", f"use {_pow2_near(sel.block)}")
            if cmp_ is not None and sel.scorer == "compression" and sel.block % cmp_.stride:
                raise err("selection.block", f"the compression stride {cmp_.stride} must divide the selection block "
                          f"{sel.block}: scores are spread over d-token chunks", f"use a multiple of {cmp_.stride}")
            n_blocks = -(-spec.max_seqlen // sel.block)
            if sel.top_k > n_blocks:
                raise err("selection.top_k", f"{sel.top_k} blocks asked but a context of max_seqlen={spec.max_seqlen} "
                          f"has only {n_blocks} blocks of {sel.block}", f"use top_k <= {n_blocks}, or raise max_seqlen")
            if sel.initial + sel.local > sel.top_k:
                raise err("selection.top_k", f"{sel.initial} initial + {sel.local} local forced blocks exceed top_k "
                          f"{sel.top_k}", f"use top_k >= {sel.initial + sel.local}")
        else:
            if sel.block != 1:
                raise err("selection.block", "at token granularity a selection unit is one token",
                          "remove selection.block (or set it to 1), or use granularity: block")
            if sel.initial or sel.local:
                raise err("selection.initial" if sel.initial else "selection.local",
                          "forced blocks apply at block granularity only (the window branch covers local tokens)",
                          "set initial: 0 and local: 0")
            if sel.top_k > spec.max_seqlen:
                raise err("selection.top_k", f"{sel.top_k} tokens asked but max_seqlen is {spec.max_seqlen}",
                          f"use top_k <= {spec.max_seqlen}")
        if sel.top_k < 1:
            raise err("selection.top_k", "must be at least 1", "set top_k to a positive number")
    if idx is not None:
        if sel is None or sel.scorer != "indexer":
            raise err("indexer", "an indexer is described but selection.scorer is not indexer",
                      "set selection.scorer: indexer, or remove the section")
        if not _pow2(idx.head_dim) or idx.head_dim < 16:
            raise err("indexer.head_dim", f"{idx.head_dim} is not a power of two >= 16", "use 32, 64 or 128")
        if idx.heads < 1:
            raise err("indexer.heads", "must be at least 1", "set a positive number of indexer heads")
        if idx.dtype == "fp8_e4m3" and idx.head_dim < 32:
            raise err("indexer.dtype", f"fp8 dots need a reduction dim of at least 32 on the GPU; head_dim is "
                      f"{idx.head_dim}", "use indexer.head_dim >= 32, or dtype: bf16", cls=UnsupportedSpecError)
    dec = spec.decode
    if dec.max_q_len < 1 or dec.max_q_len > 64:
        raise err("decode.max_q_len", f"{dec.max_q_len} new queries per step is outside 1..64",
                  "use a small number such as 1, 2 or 4 (speculative decoding drafts)")
    if not _pow2(dec.page_size) or dec.page_size < 16:
        raise err("decode.page_size", f"{dec.page_size} is not a power of two >= 16 (pages are key tiles)",
                  f"use {max(16, _pow2_near(dec.page_size))}")
    if win is not None and win.size < 1:
        raise err("window.size", "must be at least 1", "set a positive window")
    if spec.family == "dsa" and (sel is None or sel.scorer != "indexer" or present != {"selection"}):
        raise err("family", "dsa is the indexer-scored selection branch alone",
                  "use branches: [selection] with scorer: indexer, or family: nsa", near="branches")
    if spec.family == "nsa" and "selection" in present and sel.granularity == "token" and spec.mla:
        raise err("mla", "MLA mode is a DSA setting", "set family: dsa", cls=UnsupportedSpecError)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_near(x: int) -> int:
    return 1 << max(0, round(math.log2(max(x, 1))))


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def spec_from_mapping(data: Mapping, *, file: str | None = None, lines: dict[str, int] | None = None) -> Spec:
    where = _Located(file)
    where.lines.update(lines or {})
    if not isinstance(data, Mapping):
        raise where.error("<spec>", "a spec is a mapping of keys", "start the file with `name: my_variant`")
    family = data.get("family", "nsa")
    if not isinstance(family, str) or family not in FAMILY_DEFAULTS:
        raise where.error("family", f"{_short(family)} is not one of {', '.join(FAMILY_DEFAULTS)}", "use nsa or dsa")
    # A deep copy: the merge below fills sections in place and must not change the defaults of later specs.
    merged = _merge(copy.deepcopy(FAMILY_DEFAULTS[family]), data)
    # Sections for branches the user dropped fall away with them, unless the user wrote them.
    branches = merged.get("branches", [])
    if isinstance(branches, (list, tuple)):
        for section in ("compression", "window"):
            if section not in branches and section not in data:
                merged.pop(section, None)
        if "selection" not in branches and "selection" not in data:
            merged.pop("selection", None)
    sel = merged.get("selection")
    if isinstance(sel, Mapping) and sel.get("granularity") == "token":
        user_sel = data.get("selection", {}) if isinstance(data.get("selection"), Mapping) else {}
        # A token is a selection block of one: the kernels and the analysis treat both granularities alike.
        for key, token_default in (("initial", 0), ("local", 0), ("block", 1)):
            if key not in user_sel:
                sel[key] = token_default
    if (isinstance(sel, Mapping) and sel.get("scorer", "compression") == "compression" and family == "nsa"
            and "compression" not in merged):
        merged["compression"] = {}
    spec = _build(Spec, merged, "", where)
    _validate(spec, where)
    return spec


def validated(spec: Spec) -> Spec:
    """`spec` checked exactly as a spec file is (types, bounds, combinations, name); raises SpecError.

    A `Spec` built in Python (dataclasses.replace, the constructor) skips the file's checks: everything that renders
    or loads one calls this first. Returns the spec rebuilt from its fields (equal to `spec` when valid)."""
    if not isinstance(spec, Spec):
        raise SpecError("<spec>", f"expected a specgen Spec, got {type(spec).__name__}",
                        "pass specgen.load_spec(path) or a path to the YAML")
    return spec_from_mapping(spec.to_dict(), file="<Spec object>")


def read_yaml_file(path: Path, cls: type[SpecError] = SpecError, what: str = "spec") -> tuple[Any, _Located]:
    """A YAML file's data and where each field path stands in it; unreadable files raise `cls` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise cls("<file>", f"cannot read {path}: {exc.strerror}", "check the path", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise cls("<file>", f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                  f"save the {what} as UTF-8 text", file=str(path), line=exc.object.count(b"\n", 0, exc.start) + 1
                  ) from None
    where = _Located(str(path))
    return _compose(text, where), where


def load_spec(path: str | Path) -> Spec:
    """Parse and validate a spec file; raises SpecError naming the field, file and line."""
    path = Path(path)
    data, where = read_yaml_file(path)
    return spec_from_mapping(data, file=str(path), lines=where.lines)


def spec_from_yaml(text: str, file: str | None = None) -> Spec:
    where = _Located(file)
    data = _compose(text, where)
    return spec_from_mapping(data, file=file, lines=where.lines)


def replace(spec: Spec, **changes: Any) -> Spec:
    """A validated copy with top-level or dotted-path fields changed, e.g. replace(s, **{"selection.block": 16})."""
    data = spec.to_dict()
    for path, value in changes.items():
        node = data
        *parents, last = path.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return spec_from_mapping(data)


def field_reference() -> list[tuple[str, str, str, str]]:
    """(path, default, allowed, doc) rows for every spec field: the README's reference table."""
    rows = []

    def walk(cls, prefix: str, defaults: Mapping):
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            section = _section_type(f)
            if section is not None:
                rows.append((path, "", "section", f.metadata["doc"]))
                walk(section, path + ".", {})
                continue
            if f.default is not dataclasses.MISSING:
                default = json.dumps(_plain(f.default))
            else:
                default = "required"
            choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
            allowed = " \\| ".join(choices) if choices else f"{_number(bounds[0])} to {_number(bounds[1])}" if bounds else ""
            rows.append((path, default, allowed, f.metadata["doc"]))

    walk(Spec, "", {})
    return rows
