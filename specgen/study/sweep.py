"""Sweeps: "which sparse variant should I train?" from one command.

A sweep file (`specs/*.sweep.yaml`; `specgen build specs/` skips them) names a base spec and axes to vary. `specgen
sweep FILE` expands the grid (cartesian product, with budget-derived fields), records the points the spec model
rejects with its reason, builds each valid variant (a process pool; `specgen.load` caches by spec hash), and measures
each one: fidelity against dense attention with the float64 reference (`specgen.study.fidelity`, any machine) and speed
with the generated kernels (GPU only; on a CPU the record says "no GPU" rather than timing the interpreter).

Results are appended to `<out>/results.jsonl`, one JSON object per measurement keyed by spec hash + regime + seqlen
(+ part, + device for speed), so a rerun skips what is finished. `specgen.study.report` turns them into CSV/JSON tables,
a Markdown report and plots. docs/sweeps.md describes the file format and the metrics.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import itertools
import json
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..model.errors import SpecError
from .report import read_records, write_report
from ..model.spec import Spec, _Located, field_reference, load_spec, read_yaml_file, spec_from_mapping

PARTS = ("fidelity", "speed")
TOP_KEYS = ("name", "question", "description", "base", "set", "axes", "when", "constraints", "seqlens", "batch",
            "regimes", "fidelity", "speed")
FIDELITY_DEFAULTS = {"eval_from": 0.5, "fit_steps": 300, "fit_lr": 1e-2, "train_batch": 4, "train_T": 256,
                     "needles": 16, "seeds": 3, "min_fit_gain": 0.1, "max_seqlen": 2048, "query_chunk": 256}
SPEED_DEFAULTS = {"seqlens": None, "regimes": ["random", "structured"], "backward": True, "dense": True,
                  "min_roofline": 0.2}
# What changes a measurement's result, hence its resume key (max_seqlen and query_chunk do not: one filters tasks,
# the other only splits the same float64 computation). Bump METHOD when the measuring code changes what it returns.
METHOD = 2
FIDELITY_KEYED = ("eval_from", "fit_steps", "fit_lr", "train_batch", "train_T", "needles", "seeds", "min_fit_gain")
SPEED_KEYED = ("fit_steps", "fit_lr", "train_batch", "train_T")
# Short names of axes in point labels (the rest: the path's last part).
SHORT = {"selection.granularity": "", "selection.block": "l", "selection.top_k": "k", "selection.scorer": "",
         "selection.initial": "init", "selection.local": "loc", "compression.block": "cl", "compression.stride": "cd",
         "compression.pool": "", "window.size": "w", "heads.kv": "kv", "heads.q": "hq", "indexer.heads": "ih",
         "indexer.head_dim": "id", "budget.tokens": "b", "head_dim.qk": "dqk", "head_dim.v": "dv"}
BUDGET_AXIS = "budget.tokens"


class SweepError(SpecError):
    """A mistake in a sweep file (printed like a spec error: file:line: field: message, and a fix)."""


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep: what was saved and how to continue, in one line."""

    def __init__(self, done: int, total: int, results: Path):
        self.done, self.total, self.results = done, total, results
        super().__init__(f"interrupted: {done} of {total} measurements saved in {results}; run the same command "
                         f"again to continue from there")


# ---------------------------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Sweep:
    name: str
    path: Path | None
    base: dict                       # the base spec as a plain mapping (validated once)
    base_name: str
    axes: dict[str, list]            # path (or a bundle axis name) -> values
    set: dict[str, Any] = field(default_factory=dict)
    when: list[tuple[dict, dict]] = field(default_factory=list)
    budget_tokens: list[int] | None = None
    seqlens: list[int] = field(default_factory=lambda: [1024])
    batch: int = 2
    regimes: list[str] = field(default_factory=lambda: ["structured", "retrieval"])
    fidelity: dict = field(default_factory=lambda: dict(FIDELITY_DEFAULTS))
    speed: dict = field(default_factory=lambda: dict(SPEED_DEFAULTS))
    question: str = ""
    description: str = ""

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def speed_seqlens(self) -> list[int]:
        return list(self.speed.get("seqlens") or self.seqlens)


def _flatten(mapping: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}; lists and scalars are leaves."""
    out = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _field_paths() -> set[str]:
    return {path for path, *_ in field_reference()}


def _int_list(value, where, path, *, minimum=1) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise where.error(path, f"expected a whole number >= {minimum} or a list of them, got {value!r}",
                          f"write {path.rpartition('.')[2]}: [..]", cls=SweepError)
    return values


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; SweepError names the field and line."""
    path = Path(path)
    data, where = read_yaml_file(path, SweepError, "sweep")
    return sweep_from_mapping(data, path=path, where=where)


def sweep_from_mapping(data: Mapping, *, path: Path | None = None, where: _Located | None = None) -> Sweep:
    where = where or _Located(str(path) if path else None)
    err = where.error
    if not isinstance(data, Mapping):
        raise err("<sweep>", "a sweep is a mapping of keys", "start with `name:` and `base:`", cls=SweepError)
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise err(str(key), "unknown key", f"did you mean `{close[0]}`?" if close else
                      f"allowed keys: {', '.join(TOP_KEYS)}", cls=SweepError)
    for required in ("name", "base", "axes"):
        if required not in data:
            raise err(required, "is required", f"add `{required}:` to the sweep", cls=SweepError)
    name = data["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise err("name", f"{name!r} is not a lowercase identifier", "use letters, digits and _", cls=SweepError)

    base_dir = path.parent if path else Path.cwd()
    base = data["base"]
    if isinstance(base, str):
        try:
            base_spec = load_spec(base_dir / base)
        except SpecError as exc:
            raise err("base", f"the base spec {base} is not valid: {exc.message}", exc.fix or "fix the base spec",
                      cls=SweepError) from None
    elif isinstance(base, Mapping):
        base_spec = spec_from_mapping({"name": name, **base})
    else:
        raise err("base", "expected a spec file path (relative to the sweep) or an inline spec mapping",
                  "write base: nsa_small.yaml", cls=SweepError)

    known = _field_paths()

    def check_paths(mapping: Mapping, section: str) -> dict:
        flat = _flatten(mapping)
        for p in flat:
            if p not in known and not any(k.startswith(p + ".") for k in known):
                close = difflib.get_close_matches(p, sorted(known), n=1)
                raise err(f"{section}.{p}", "is not a spec field", f"did you mean `{close[0]}`?" if close
                          else "see the spec reference in README.md", cls=SweepError)
            if p == "name":
                raise err(f"{section}.name", "variant names are derived from the sweep name and the point",
                          "remove it", cls=SweepError)
        return flat

    fixed = check_paths(data.get("set") or {}, "set")
    axes_in = data["axes"]
    if not isinstance(axes_in, Mapping) or not axes_in:
        raise err("axes", "expected a mapping of axis -> list of values", "write axes: {selection.block: [8, 16]}",
                  cls=SweepError)
    axes: dict[str, list] = {}
    for axis, values in axes_in.items():
        if not isinstance(values, list) or not values:
            raise err(f"axes.{axis}", f"expected a non-empty list of values, got {values!r}",
                      f"write {axis}: [a, b]", cls=SweepError)
        if all(isinstance(v, Mapping) for v in values):          # a bundle axis: each value sets several fields
            for v in values:
                check_paths({k: x for k, x in v.items() if k != "label"}, f"axes.{axis}")
        elif axis not in known:
            close = difflib.get_close_matches(axis, sorted(known), n=1)
            raise err(f"axes.{axis}", "is not a spec field (and its values are not all mappings, so it is not a "
                      "bundle axis either)", f"did you mean `{close[0]}`?" if close else "name a spec field",
                      cls=SweepError)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise err(f"axes.{axis}", "lists a value twice", "list each value once", cls=SweepError)
        axes[str(axis)] = list(values)

    when = []
    for i, rule in enumerate(data.get("when") or []):
        if not isinstance(rule, Mapping) or set(rule) != {"if", "set"}:
            raise err(f"when[{i}]", "each rule is {if: {field: value}, set: {field: value}}",
                      "write - {if: {selection.granularity: token}, set: {indexer.heads: 4}}", cls=SweepError)
        when.append((check_paths(rule["if"], f"when[{i}].if"), check_paths(rule["set"], f"when[{i}].set")))

    budget = None
    constraints = data.get("constraints") or {}
    if not isinstance(constraints, Mapping) or set(constraints) - {"budget"}:
        raise err("constraints", "the only constraint is budget: {tokens: N or [N, ...]}",
                  "write constraints: {budget: {tokens: 1024}}", cls=SweepError)
    if "budget" in constraints:
        b = constraints["budget"]
        if not isinstance(b, Mapping) or set(b) != {"tokens"}:
            raise err("constraints.budget", "expected {tokens: N}: selected tokens per query and kv group "
                      "(top_k x selection block)", "write budget: {tokens: 1024}", cls=SweepError)
        budget = _int_list(b["tokens"], where, "constraints.budget.tokens")
        if "selection.top_k" in axes or "selection.top_k" in fixed:
            raise err("constraints.budget", "selection.top_k is derived from the budget (tokens / selection block)",
                      "remove selection.top_k from axes and set", cls=SweepError)

    seqlens = _int_list(data.get("seqlens", [1024]), where, "seqlens")
    batch = _int_list(data.get("batch", 2), where, "batch")[0]
    regimes = data.get("regimes", ["structured", "retrieval"])
    if isinstance(regimes, str):
        regimes = [regimes]
    from .capture_format import CaptureError, layers_of, parse_regime, resolve
    from .fidelity import REGIMES
    for r in regimes:
        if not isinstance(r, str) or not (r in REGIMES or r.startswith("file:")):
            raise err("regimes", f"{r!r} is not a regime", f"use {', '.join(REGIMES)} or file:PATH.safetensors",
                      cls=SweepError)
        if r.startswith("file:"):
            try:
                file_path, _ = parse_regime(r)
            except CaptureError as exc:
                raise err("regimes", str(exc), "write file:PATH or file:PATH#layer=N", cls=SweepError) from None
            if not resolve(file_path, base_dir).is_file():
                raise err("regimes", f"{r}: no such file {resolve(file_path, base_dir)} (paths are relative to the "
                          f"sweep file)", "write one with `specgen capture` (docs/sweeps.md) or fix the path",
                          cls=SweepError)
            try:
                held = layers_of(file_path, base_dir)
            except CaptureError as exc:
                raise err("regimes", str(exc), "point it at a capture written by `specgen capture`",
                          cls=SweepError) from None
            layer = parse_regime(r)[1]
            if layer is not None and layer not in (held or []):
                raise err("regimes", f"{r}: the file holds " + (f"layers {held}" if held else "one layer (q, k, v)"),
                          f"write file:{file_path}" + (f"#layer={held[0]}" if held else ""), cls=SweepError)
    fid = dict(FIDELITY_DEFAULTS)
    for key, value in (data.get("fidelity") or {}).items():
        if key not in FIDELITY_DEFAULTS:
            raise err(f"fidelity.{key}", "unknown key", f"allowed: {', '.join(FIDELITY_DEFAULTS)}", cls=SweepError)
        if key in ("fit_steps",):
            value = _int_list(value, where, f"fidelity.{key}", minimum=0)[0]
        elif key in ("seeds", "train_batch", "train_T", "needles", "max_seqlen", "query_chunk"):
            value = _int_list(value, where, f"fidelity.{key}")[0]
        elif key in ("fit_lr", "min_fit_gain", "eval_from") and (isinstance(value, bool) or
                                                                 not isinstance(value, (int, float)) or value < 0):
            raise err(f"fidelity.{key}", f"expected a number >= 0, got {value!r}",
                      f"write {key}: {FIDELITY_DEFAULTS[key]}", cls=SweepError)
        fid[key] = value
    speed = dict(SPEED_DEFAULTS)
    for key, value in (data.get("speed") or {}).items():
        if key not in SPEED_DEFAULTS:
            raise err(f"speed.{key}", "unknown key", f"allowed: {', '.join(SPEED_DEFAULTS)}", cls=SweepError)
        speed[key] = value
    if isinstance(speed["min_roofline"], bool) or not isinstance(speed["min_roofline"], (int, float)) \
            or not 0 <= speed["min_roofline"] <= 1:
        raise err("speed.min_roofline", f"expected a fraction in [0, 1], got {speed['min_roofline']!r}",
                  "write min_roofline: 0.2", cls=SweepError)
    for r in speed["regimes"]:
        if r not in REGIMES:
            raise err("speed.regimes", f"{r!r} is not a synthetic regime", f"use {', '.join(REGIMES)}",
                      cls=SweepError)
    if speed["seqlens"] is not None:
        speed["seqlens"] = _int_list(speed["seqlens"], where, "speed.seqlens")
    return Sweep(name=name, path=path, base=base_spec.to_dict(), base_name=base_spec.name, axes=axes, set=fixed,
                 when=when, budget_tokens=budget, seqlens=seqlens, batch=batch, regimes=list(regimes),
                 fidelity=fid, speed=speed, question=str(data.get("question") or "").strip(),
                 description=str(data.get("description") or "").strip())


# ---------------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Point:
    index: int
    label: str
    values: dict                     # axis -> value as written in the sweep (plus budget.tokens)
    effective: dict                  # the same axes as the variant really has them (after the rules below)
    status: str                      # valid | invalid | duplicate
    reason: str = ""                 # why invalid (the SpecError), or which point it duplicates
    notes: list = field(default_factory=list)
    spec: Spec | None = None
    top_k: int | None = None

    @property
    def hash(self) -> str | None:
        return self.spec.hash if self.spec is not None else None

    def summary(self) -> dict:
        return {"index": self.index, "label": self.label, "status": self.status, "reason": self.reason,
                "notes": self.notes, "values": self.values, "effective": self.effective, "top_k": self.top_k,
                "spec_name": self.spec.name if self.spec else None, "spec_hash": self.hash,
                "spec": self.spec.to_dict() if self.spec else None}


def _get(data: Mapping, path: str):
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict, path: str, value) -> None:
    node = data
    *parents, last = path.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = copy.deepcopy(value)


def _normalise(data: dict, axis_paths: set[str]) -> list[str]:
    """Fields that do not apply to a point take the only value they may have there, as a spec written by hand would
    leave them out: at token granularity a selection unit is one token with no forced blocks and the indexer scores;
    an indexer section goes with the indexer scorer only; a branch's settings go with the branch. Axis values
    overridden this way are noted (such points then usually duplicate another and are measured once)."""
    notes = []
    sel = data.get("selection")
    if isinstance(sel, dict) and sel.get("granularity") == "token":
        for key, only in (("block", 1), ("initial", 0), ("local", 0)):
            if sel.get(key, only) != only:
                if f"selection.{key}" in axis_paths:
                    notes.append(f"selection.{key}={sel[key]} does not apply at token granularity (set to {only})")
                sel[key] = only
        if sel.get("scorer") != "indexer" and "selection.scorer" not in axis_paths:
            sel["scorer"] = "indexer"
    scorer = sel.get("scorer") if isinstance(sel, dict) else None
    if scorer == "indexer" and not isinstance(data.get("indexer"), dict):
        data["indexer"] = {}
    if scorer != "indexer" and data.get("indexer") is not None:
        dropped = sorted(p for p in axis_paths if p.startswith("indexer."))
        if dropped:
            notes.append(f"{', '.join(dropped)} do(es) not apply without the indexer scorer")
        data["indexer"] = None
    branches = data.get("branches")
    if isinstance(branches, list):
        for section in ("window", "compression"):
            needed = section in branches or (section == "compression" and scorer == "compression")
            if not needed and data.get(section) is not None:
                dropped = sorted(p for p in axis_paths if p.startswith(section + "."))
                if dropped:
                    notes.append(f"{', '.join(dropped)} do(es) not apply without the {section} branch")
                data[section] = None
    return notes


def _label_part(axis: str, value) -> str:
    if isinstance(value, Mapping):
        value = value.get("label", "x")
    if isinstance(value, bool):
        value = "on" if value else "off"
    if isinstance(value, list):
        value = "".join(str(v)[:3] for v in value)
    short = SHORT.get(axis, axis.rpartition(".")[2][:4])
    return re.sub(r"[^a-z0-9]", "", f"{short}{value}".lower()) or "x"


def _config_key(data: Mapping) -> str:
    blob = json.dumps({k: v for k, v in data.items() if k != "name"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(sweep: Sweep) -> list[Point]:
    """Every point of the grid: the cartesian product of the axes (and of the budgets), each made into a spec by
    applying, in order, `set`, the axis values, the matching `when` rules, the applicability rules (_normalise) and
    the budget (top_k = tokens / unit). A point the spec model rejects is `invalid` with the SpecError's text; one
    equal to an earlier point (same spec but for the name) is a `duplicate` and is measured once."""
    axes = dict(sweep.axes)
    if sweep.budget_tokens is not None:
        axes[BUDGET_AXIS] = sweep.budget_tokens
    axis_paths = set()
    for axis, values in sweep.axes.items():
        if all(isinstance(v, Mapping) for v in values):
            axis_paths |= {k for v in values for k in _flatten({k: x for k, x in v.items() if k != "label"})}
        else:
            axis_paths.add(axis)
    points: list[Point] = []
    seen: dict[str, Point] = {}
    for index, combo in enumerate(itertools.product(*axes.values())):
        values = dict(zip(axes, combo))
        data = copy.deepcopy(sweep.base)
        for path, value in sweep.set.items():
            _set(data, path, value)
        for axis, value in values.items():
            if axis == BUDGET_AXIS:
                continue
            if isinstance(value, Mapping):
                for path, v in _flatten({k: x for k, x in value.items() if k != "label"}).items():
                    _set(data, path, v)
            else:
                _set(data, axis, value)
        for cond, changes in sweep.when:
            if all(_get(data, p) == v for p, v in cond.items()):
                for path, value in changes.items():
                    _set(data, path, value)
        notes = _normalise(data, axis_paths)
        effective = {a: (v if isinstance(v, Mapping) or a == BUDGET_AXIS else _get(data, a))
                     for a, v in values.items()}
        label = "_".join(_label_part(a, v) for a, v in effective.items())
        data["name"] = f"{sweep.name}_{label}"
        point = Point(index, label, values, effective, "valid", notes=notes)
        sel = data.get("selection")
        if sweep.budget_tokens is not None:
            tokens = values[BUDGET_AXIS]
            unit = 1 if not isinstance(sel, dict) or sel.get("granularity") == "token" else sel.get("block")
            if not isinstance(sel, dict):
                point.status, point.reason = "invalid", "a budget needs a selection branch"
            elif not isinstance(unit, int) or unit < 1 or tokens % unit:
                point.status = "invalid"
                point.reason = (f"constraints.budget: {tokens} tokens is not a whole number of selection blocks "
                                f"of {unit}; fix: use a block size dividing {tokens}")
            else:
                sel["top_k"] = tokens // unit
        if point.status == "valid":
            try:
                point.spec = spec_from_mapping(data)
            except SpecError as exc:
                point.status = "invalid"
                point.reason = f"{exc.field}: {exc.message}" + (f"; fix: {exc.fix}" if exc.fix else "")
        if point.spec is not None:
            point.top_k = point.spec.selection.top_k if point.spec.selection else None
            key = _config_key(point.spec.to_dict())
            if key in seen:
                point.status = "duplicate"
                point.reason = f"same variant as point {seen[key].index} ({seen[key].label})"
            else:
                seen[key] = point
        points.append(point)
    return points


# ---------------------------------------------------------------------------------------------------------------
# Tasks, records and resuming
# ---------------------------------------------------------------------------------------------------------------

def task_key(spec_hash: str, regime: str, seqlen: int, part: str, device: str | None = None,
             settings: str = "") -> str:
    """spec hash | regime | seqlen | part | settings (a hash of everything else that changes the result) [| device]."""
    key = f"{spec_hash}|{regime}|{seqlen}|{part}|s={settings}"
    return f"{key}|{device}" if part == "speed" and device else key


def settings_hash(sweep: "Sweep", part: str, regime: str, file_hashes: dict[str, str] | None = None) -> str:
    """A short hash of the settings that change a measurement besides the variant, regime and length: the fitting
    recipe, seeds, eval split, the batch, the measuring code's METHOD, and a captured file's content. A rerun with
    any of them changed measures again instead of finding an old result under the same key."""
    cfg = sweep.fidelity if part == "fidelity" else {**sweep.fidelity, **sweep.speed}
    keyed = FIDELITY_KEYED if part == "fidelity" else SPEED_KEYED + ("backward", "dense")
    blob = {k: cfg.get(k) for k in keyed}
    blob.update({"method": METHOD, "batch": sweep.batch if part == "fidelity" else 1})
    if regime.startswith("file:"):
        blob["file"] = (file_hashes or {}).get(regime) or _file_hash(sweep, regime)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


def _file_hash(sweep: "Sweep", regime: str) -> str:
    from .capture_format import content_hash, parse_regime

    return content_hash(parse_regime(regime)[0], sweep.base_dir)


def fidelity_regimes(sweep: "Sweep") -> list[str]:
    """The sweep's regimes with every multi-layer capture (`file:PATH`) split into one regime per layer
    (`file:PATH#layer=N`): each layer is fitted and measured on its own, and the report adds them up."""
    from .capture_format import layers_of, parse_regime

    out = []
    for regime in sweep.regimes:
        if regime.startswith("file:") and parse_regime(regime)[1] is None:
            layers = layers_of(parse_regime(regime)[0], sweep.base_dir)
            if layers:
                out += [f"{regime}#layer={i}" for i in layers]
                continue
        out.append(regime)
    return out


def finished_keys(records: list[dict]) -> set[str]:
    return {r["key"] for r in records if r.get("status") == "ok"}


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:                     # an interrupted append: end its line so this record is not glued onto it
            with path.open("a", encoding="utf-8") as f:
                f.write("\n")
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(x):
    try:
        return float(x)
    except Exception:
        return str(x)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def make_tasks(sweep: Sweep, points: list[Point], device: str) -> list[dict]:
    """Fidelity for every valid point x regime x seqlen (up to fidelity.max_seqlen); speed (GPU) for every valid point
    x speed regime x speed seqlen."""
    tasks = []
    regimes = fidelity_regimes(sweep)
    files = {r: _file_hash(sweep, r) for r in regimes if r.startswith("file:")}
    fid_settings = {r: settings_hash(sweep, "fidelity", r, files) for r in regimes}
    speed_settings = settings_hash(sweep, "speed", "random")
    for p in points:
        if p.status != "valid":
            continue
        common = {"spec": p.spec.to_dict(), "spec_hash": p.hash, "label": p.label, "index": p.index,
                  "values": p.values, "effective": p.effective, "top_k": p.top_k, "sweep": sweep.name,
                  "base_dir": str(sweep.base_dir), "batch": sweep.batch, "fidelity_cfg": sweep.fidelity,
                  "speed_cfg": sweep.speed, "device": device}
        for regime in regimes:
            # A captured file has its own length: one measurement, recorded at the file's T (key: seqlen 0).
            for T in ([0] if regime.startswith("file:") else sweep.seqlens):
                if T <= sweep.fidelity["max_seqlen"]:
                    tasks.append({**common, "part": "fidelity", "regime": regime, "seqlen": T,
                                  "settings": fid_settings[regime],
                                  "key": task_key(p.hash, regime, T, "fidelity", settings=fid_settings[regime])})
        for regime in sweep.speed["regimes"]:
            for T in sweep.speed_seqlens:
                tasks.append({**common, "part": "speed", "regime": regime, "seqlen": T, "settings": speed_settings,
                              "key": task_key(p.hash, regime, T, "speed", None, speed_settings)})
    return tasks


def _commit() -> str:
    from ..perf.bench import _commit as commit

    try:
        return commit()
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Work done in the workers
# ---------------------------------------------------------------------------------------------------------------

_STARTED = None                      # in a pool worker: where it announces each task it starts (see _run_local)


def init_worker(device: str, gpu_queue=None, threads: int | None = None, started=None) -> None:
    """Process-pool initializer: pin one GPU per worker (CUDA_VISIBLE_DEVICES, before CUDA starts in the process)
    or share the CPU cores; without a GPU, kernels run under Triton's interpreter. `started` (a SimpleQueue) is
    where the worker says which task it begins, so that the driver knows which points a dead worker was running."""
    global _STARTED
    _STARTED = started
    if started is not None:
        import signal

        signal.signal(signal.SIGTERM, _terminated_by_pool)
        # Ctrl-C reaches the whole process group: the driver alone handles it (and terminates the pool), so the
        # workers do not print a traceback each.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if threads:          # torch reads it when a task first imports it (a worker starts without torch: faster restarts)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


# What init_worker may set in a process's environment.
_WORKER_ENV = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


@contextlib.contextmanager
def _worker_env_here(device: str):
    """init_worker's settings in the calling process, for one in-process run only (`_run_local` with jobs <= 1),
    then the environment as it was. A pool worker keeps them for its life, but the calling process goes on: a
    TRITON_INTERPRET=1 left behind would have every generated module it imports later decorated for Triton's CPU
    interpreter (Triton reads the variable at each @triton.jit), on a GPU too."""
    saved = {name: os.environ.get(name) for name in _WORKER_ENV}
    try:
        init_worker(device, None, None)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def gpu_identity() -> dict:
    """Which GPU this process measures on: its physical index as CUDA_VISIBLE_DEVICES gives it (a pinned pool worker
    or a Ray task sees exactly one; otherwise the current device's entry of the list, or the CUDA ordinal when the
    variable is unset), the device name and the host."""
    import torch

    ordinal = torch.cuda.current_device()
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    physical = visible[ordinal] if ordinal < len(visible) else str(ordinal)
    return {"gpu": physical, "device": torch.cuda.get_device_name(ordinal), "host": socket.gethostname()}


def build_task(spec_dict: dict) -> dict:
    """Render and import one variant through specgen.load (cached by spec hash)."""
    start = time.time()
    spec_hash = None
    try:
        from .. import load

        spec = spec_from_mapping(spec_dict)
        spec_hash = spec.hash
        module = load(spec)
        return {"hash": spec_hash, "ok": True, "seconds": time.time() - start, "module": module.__name__}
    except SpecError as exc:
        return {"hash": spec_hash, "ok": False, "error": f"{exc.field}: {exc.message}"}
    except Exception as exc:  # a render or import failure of one variant must not stop the sweep
        return {"hash": spec_hash, "ok": False,
                "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}


def measure_task(task: dict) -> dict:
    """One measurement (fidelity or speed) of one variant; never raises: failures come back as status "error"."""
    import torch

    start = time.time()
    spec = spec_from_mapping(task["spec"])
    device = task["device"]
    rec = {k: task.get(k) for k in ("key", "sweep", "label", "index", "values", "effective", "top_k", "regime",
                                    "seqlen", "part", "commit", "settings")}
    if task.get("build_error"):
        rec["build_error"] = task["build_error"]
    rec.update({"spec_name": spec.name, "spec_hash": spec.hash, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch": torch.__version__, "host": socket.gethostname()})
    try:
        if task["part"] == "fidelity":
            from .fidelity import evaluate_variant

            cfg = task["fidelity_cfg"]
            dev = "cuda" if device == "cuda" else "cpu"
            out = evaluate_variant(spec, task["regime"], task["seqlen"], batch=task["batch"],
                                   train_batch=cfg["train_batch"], train_T=cfg["train_T"], fit_steps=cfg["fit_steps"],
                                   fit_lr=cfg["fit_lr"], seeds=cfg["seeds"], eval_from=cfg["eval_from"],
                                   n_needles=cfg["needles"], device=dev, base_dir=Path(task["base_dir"]),
                                   query_chunk=cfg["query_chunk"], min_fit_gain=cfg["min_fit_gain"])
            rec.update(out)
            rec["device"] = device_name(dev)
            if task["regime"].startswith("file:"):
                rec["seqlen"] = out["metrics"]["T"]
        else:
            if device != "cuda" or not torch.cuda.is_available():
                rec.update({"status": "skipped", "speed": "no GPU", "device": "cpu",
                            "seconds": time.time() - start})
                return rec
            rec.update(gpu_identity())          # which GPU of which host measured it (gpu, device, host)
            rec["speed"] = measure_speed(spec, task["regime"], task["seqlen"], task["speed_cfg"],
                                         task["fidelity_cfg"], base_dir=Path(task["base_dir"]))
            rec["key"] = task_key(spec.hash, task["regime"], task["seqlen"], "speed", rec["device"],
                                  task.get("settings", ""))
        rec["status"] = "ok"
    except Exception as exc:
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=6)
    rec["seconds"] = time.time() - start
    return rec


_PEAKS: dict = {}


def _machine_peaks() -> dict:
    """This GPU's measured matmul peak and copy bandwidth, once per worker (bench.machine_peaks)."""
    if not _PEAKS:
        from ..perf.bench import machine_peaks

        _PEAKS.update(machine_peaks())
    return dict(_PEAKS)


def measure_speed(spec: Spec, regime: str, T: int, cfg: dict, fid_cfg: dict, *, base_dir: Path | None = None,
                  device: str = "cuda") -> dict:
    """GPU timing of the generated forward (and forward+backward when the module has `<family>_attention`) on the
    regime's inputs (selection locality depends on them), against dense SDPA in the same run (bench.dense_forward_ms,
    bench.dense_training_ms); medians of triton.testing.do_bench. An indexer is fitted first (as for fidelity) so
    that it selects like a trained one. `device` is "cuda" but for the plumbing test under the interpreter."""
    import torch

    from ..perf import bench
    from . import fidelity
    from .. import load
    from ..compile.analysis import flops

    module = load(spec)
    fwd = getattr(module, f"{spec.family}_forward")
    dt = module.DTYPE
    x = fidelity.make_regime(regime, B=1, T=T, seed=fidelity.seed_of(regime, T, "speed"),
                             model_seed=fidelity.seed_of(regime, "model", *fidelity.shapes_of(spec).values()),
                             device=device, dtype=torch.float32, base_dir=base_dir, **fidelity.shapes_of(spec))
    fitted = None
    if spec.selection is not None and spec.selection.scorer == "indexer" or (
            spec.needs_compressed_kv and spec.compression.pool == "linear"):
        train, _ = fidelity.splits(spec, regime, min(T, fid_cfg["train_T"]), batch=1,
                                   train_batch=fid_cfg["train_batch"], device=device, base_dir=base_dir,
                                   train_T=fid_cfg["train_T"])
        _, fitted = fidelity.fit_scorers(spec, train, None, steps=fid_cfg["fit_steps"],
                                         lr=fid_cfg.get("fit_lr", 1e-2))
    kw = {n: (t.to(dt) if t.is_floating_point() else t)
          for n, t in fidelity.variant_inputs(spec, fidelity.Inputs(x.q, x.k, x.v), fitted).items()}
    if spec.gated:
        kw["gates"] = torch.sigmoid(torch.randn_like(kw["gates"], dtype=torch.float32)).to(dt)
    out = torch.empty((1, T, spec.heads.q, spec.head_dim.v), dtype=dt, device=device)
    fwd(**kw, out=out)
    if device == "cuda":
        torch.cuda.synchronize()
    ms = bench._median_ms(lambda: fwd(**kw, out=out))
    row: dict = {"forward_ms": ms, "forward_flops": flops(spec, T), "forward_tflops": flops(spec, T) / ms / 1e9}
    if device == "cuda":
        row["machine"] = _machine_peaks()        # the ceilings the report's roofline fraction uses
    if cfg.get("dense", True):
        row["dense_forward_ms"] = bench.dense_forward_ms(spec, T)
        row["forward_speedup"] = {k: v / ms for k, v in row["dense_forward_ms"].items() if isinstance(v, float)}
    attention = getattr(module, f"{spec.family}_attention", None)
    if cfg.get("backward", True) and attention is not None:
        diff = set(getattr(module, "DIFF_ARGUMENTS", ()))
        leaf = {n: (t.detach().clone().requires_grad_() if n in diff else t) for n, t in kw.items()}
        grad_out = torch.randn_like(out)

        def step():
            attention(**leaf).backward(grad_out)

        step()
        import triton

        row["fwd_bwd_ms"] = triton.testing.do_bench(step, warmup=5, rep=30, return_mode="median",
                                                    grad_to_none=[leaf[n] for n in diff if n in leaf])
        if cfg.get("dense", True):
            row["dense_fwd_bwd_ms"] = bench.dense_training_ms(spec, T)
    elif attention is None:
        row["fwd_bwd_ms"] = "module has no backward"
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def _gpu_ids() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = torch.cuda.device_count()
    if visible:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
        return ids[:n] if n else ids
    return [str(i) for i in range(n)]


class Progress:
    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.start, self.log = total, 0, time.time(), log

    def __call__(self, rec: dict) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        self.log(f"[{self.done:>3}/{self.total}] {_clock(elapsed)} elapsed, ~{_clock(left)} left  "
                 f"{rec['label']:<28} {rec['part']:<8} {rec['regime']:<10} T={rec['seqlen']:<6} {_brief(rec)}")


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def _brief(rec: dict) -> str:
    if rec.get("status") == "error":
        return f"ERROR {rec.get('error', '')[:120]}"
    if rec.get("status") == "skipped":
        return f"skipped: {rec.get('speed')}"
    if rec["part"] == "speed":
        s = rec["speed"]
        return f"fwd {s['forward_ms']:.3f} ms" + (f", fwd+bwd {s['fwd_bwd_ms']:.3f} ms"
                                                  if isinstance(s.get("fwd_bwd_ms"), float) else "")
    m = rec["metrics"]
    text = f"recall {m.get('recall', float('nan')):.3f} (oracle {m.get('recall_oracle', float('nan')):.3f}) " \
           f"err_gated {m['err_gated']:.3f}"
    if "needle_hit" in m:
        text += f" needle {m['needle_hit']:.2f}"
    if rec.get("unfitted"):
        text += f" [{rec['scorer']}; unfitted recall {rec['unfitted'].get('recall', float('nan')):.3f}]"
    return text + f"  ({rec['seconds']:.1f}s)"


def gpu_slots(ids: list[str], jobs: int) -> list[str]:
    """The GPUs a pool of `jobs` workers pins, one each: the first `jobs` of the visible ids, each at most once (a
    repeated id in CUDA_VISIBLE_DEVICES would put two workers on one GPU)."""
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"CUDA_VISIBLE_DEVICES names a GPU twice ({','.join(ids)}): two workers would share it")
    return list(ids[:jobs])


def _pool(jobs: int, device: str, pin_gpus: bool, started=None):
    """A spawn-context process pool: one worker per GPU or `jobs` CPU workers sharing the cores.

    With GPUs, the pool has exactly as many workers as there are slots (gpu_slots) and a queue holding each slot
    once; a worker takes one slot in its initializer, before CUDA starts in it, and keeps it for its life. A
    ProcessPoolExecutor never starts more than `jobs` processes (a dead worker breaks the pool instead of being
    replaced) and runs one task at a time per worker, so no two points are ever timed on one GPU at once."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    if device == "cuda" and pin_gpus:
        slots = gpu_slots(_gpu_ids(), jobs)
        queue = ctx.Queue()
        for gpu in slots:
            queue.put(gpu)
        return ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=init_worker,
                                   initargs=(device, queue, None, started))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return ProcessPoolExecutor(jobs, mp_context=ctx, initializer=init_worker, initargs=(device, None, threads, started))


_CURRENT = None                      # in a pool worker: the index of the task it is running


def _announced(fn, index: int, item):
    """Runs in a pool worker: say which task starts (synchronously: a SimpleQueue writes to its pipe at once, so the
    word is out even if the task then kills the process), then run it."""
    global _CURRENT
    if _STARTED is not None:
        import signal

        # SIGTERM waits until the word is out (its handler writes to the same queue: it must not find it locked).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _STARTED.put(("start", index))
        _CURRENT = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    else:
        _CURRENT = index
    try:
        return fn(item)
    finally:
        _CURRENT = None


def _terminated_by_pool(signum, frame):
    """SIGTERM in a pool worker: a broken pool terminates its surviving workers. Say which task this one was running
    (it did not kill the pool) and exit."""
    if _STARTED is not None and _CURRENT is not None:
        _STARTED.put(("terminated", _CURRENT))
    os._exit(128 + signum)


def _run_local(fn, items: list, jobs: int, device: str, on_result: Callable[[Any], None], *,
               pin_gpus: bool = True, retries: int = 2, on_lost: Callable[[Any, str], Any] | None = None,
               log: Callable[[str], None] = lambda s: None) -> None:
    """Run fn over items, in this process (jobs <= 1) or in a pool, passing each result to on_result as it comes.

    A worker that dies mid-task (a segfault, the OOM killer, os._exit) breaks the whole pool: every unfinished task
    then fails with BrokenProcessPool. The pool is restarted and the unfinished tasks resubmitted. Each break is
    charged to the task the dead worker was running: workers announce each task they start, and the survivors that
    the broken pool terminates (SIGTERM) say which task they were running, so their tasks are re-run uncharged. A
    task charged more than `retries` times is given up: on_result(on_lost(item, reason)), or a RuntimeError
    without on_lost."""
    if jobs <= 1:
        with _worker_env_here(device):
            for item in items:
                on_result(fn(item))
        return
    import functools
    import multiprocessing as mp
    import threading
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    pending = dict(enumerate(items))
    charged = {i: 0 for i in pending}
    while pending:
        started = mp.get_context("spawn").SimpleQueue()
        begun, terminated = set(), set()

        stop = threading.Event()

        def listen(started=started, begun=begun, terminated=terminated, stop=stop):
            # Read the announcements as they come (a pipe holds ~64 KB: unread, it would block the workers).
            while not (stop.is_set() and started.empty()):
                if started.empty():
                    time.sleep(0.02)
                    continue
                what, i = started.get()
                (begun if what == "start" else terminated).add(i)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        finished: set[int] = set()
        broken = None
        with _pool(min(jobs, len(pending)), device, pin_gpus, started) as pool:
            futures = {pool.submit(functools.partial(_announced, fn, i), item): i for i, item in pending.items()}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        result = fut.result()
                    except BrokenProcessPool as exc:
                        broken = broken or f"{type(exc).__name__}: {exc}"
                        continue
                    finished.add(i)
                    del pending[i]
                    on_result(result)
            except KeyboardInterrupt:
                # Leaving the `with` would wait for the running points: stop them now (their results are lost,
                # a rerun measures them).
                workers = list((getattr(pool, "_processes", None) or {}).values())   # shutdown() forgets them
                for proc in workers:
                    proc.kill()          # SIGTERM would wait for a worker's running C call (a torch import)
                pool.shutdown(wait=False, cancel_futures=True)
                stop.set()
                raise
        stop.set()                       # the pool is shut down: every worker's words are in the pipe
        listener.join()
        if broken is None:
            break
        running = (begun - finished) & set(pending)
        # The task whose worker died: running, and not one of those the pool terminated afterwards. If that leaves
        # none (the dead worker was itself sent SIGTERM), every running task is charged; if none had started
        # (a worker died in its initializer), every unfinished one.
        suspects = running - terminated or running or set(pending)
        log(f"a worker died ({broken}); restarting the pool for {len(pending)} unfinished task(s)")
        for i in sorted(suspects):
            charged[i] += 1
            if charged[i] > retries:
                reason = (f"worker process died while running this task ({charged[i]} attempts, retries={retries}): "
                          f"{broken}")
                item = pending.pop(i)
                if on_lost is None:
                    raise RuntimeError(reason)
                on_result(on_lost(item, reason))


def _run_ray(fn, items: list, device: str, on_result: Callable[[Any], None], *, retries: int = 2,
             on_lost: Callable[[Any, str], Any] | None = None) -> None:
    """The same tasks as Ray remote functions: one GPU each on a cluster (Ray sets CUDA_VISIBLE_DEVICES per task, so
    a task's record names its physical GPU and host), or one CPU each (under Triton's interpreter). Connects to the
    cluster named by RAY_ADDRESS, or starts a local one. Every node needs specgen installed; each task builds its
    variant through specgen.load (cached per node by spec hash) and returns its record to this process, which alone
    writes results.jsonl. A task whose worker dies is retried by Ray (`max_retries`); after that its point is
    recorded as failed with Ray's reason. Ray is optional."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--backend ray needs ray (pip install 'ray[default]'); it is not a dependency") from None
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    options: dict = {"num_gpus": 1 if device == "cuda" else 0, "num_cpus": 1, "max_retries": retries}
    if device == "cpu":
        options["runtime_env"] = {"env_vars": {"TRITON_INTERPRET": "1"}}
    remote = ray.remote(fn).options(**options)
    pending = [(remote.remote(item), item) for item in items]
    while pending:
        done, _ = ray.wait([ref for ref, _ in pending], num_returns=1)
        at = next(i for i, (ref, _) in enumerate(pending) if ref is done[0])    # ray.wait hands back our refs
        item = pending.pop(at)[1]
        try:
            result = ray.get(done[0])
        except Exception as exc:        # ray.exceptions.RayError: the worker died past its retries, or the node
            if on_lost is None:
                raise
            result = on_lost(item, f"Ray task failed after {retries} retries: {type(exc).__name__}: {exc}")
        on_result(result)


def _lost_measurement(task: dict, reason: str) -> dict:
    """The record of a measurement whose worker died on every attempt."""
    rec = {k: task.get(k) for k in ("key", "sweep", "label", "index", "values", "effective", "top_k", "regime",
                                    "seqlen", "part", "commit")}
    rec.update({"spec_name": task["spec"].get("name"), "spec_hash": task["spec_hash"], "status": "error",
                "error": reason, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()})
    return rec


def _lost_build(spec_dict: dict, reason: str) -> dict:
    try:
        spec_hash = spec_from_mapping(spec_dict).hash
    except Exception:
        spec_hash = None
    return {"hash": spec_hash, "ok": False, "error": reason}


def run_sweep(sweep: Sweep, out_dir: Path, *, jobs: int | None = None, device: str = "cpu", backend: str = "local",
              build: bool = True, log: Callable[[str], None] = print) -> dict:
    """Expand, build, measure what is not finished yet, and write the report. Returns counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    ids = _gpu_ids() if device == "cuda" else []
    if device == "cuda" and backend == "ray":
        jobs = jobs or 1                 # Ray places the tasks on the cluster's GPUs; the driver may have none
    elif device == "cuda":
        if not ids:
            raise RuntimeError("--device cuda but no GPU is visible")
        jobs = min(jobs or len(ids), len(ids))
    else:
        jobs = jobs or 1
    points = expand(sweep)
    (out_dir / "points.json").write_text(json.dumps([p.summary() for p in points], indent=1, default=_json_default)
                                         + "\n", encoding="utf-8")
    counts = {s: sum(p.status == s for p in points) for s in ("valid", "invalid", "duplicate")}
    log(f"sweep {sweep.name}: {len(points)} points: {counts['valid']} valid, {counts['invalid']} invalid, "
        f"{counts['duplicate']} duplicates  (out: {out_dir})")
    for p in points:
        if p.status == "invalid":
            log(f"  invalid  {p.label}: {p.reason}")

    records = read_records(results)
    done = finished_keys(records)
    # Speed is keyed by the GPU's name: resuming skips what this machine's GPU model has measured. A Ray driver
    # without a GPU cannot know which model its tasks land on: a measurement on any GPU counts as done.
    speed_device = device_name(device) if device == "cuda" and ids else None
    done_anywhere = {k.rsplit("|", 1)[0] for k in done if k.count("|") == 5 and "|speed|" in k}
    tasks = []
    skipped_speed = 0
    for t in make_tasks(sweep, points, device):
        key = t["key"] if t["part"] == "fidelity" else task_key(t["spec_hash"], t["regime"], t["seqlen"], "speed",
                                                               speed_device, t["settings"])
        if key in done or (t["part"] == "speed" and device == "cuda" and speed_device is None
                           and key in done_anywhere):
            continue
        if t["part"] == "speed" and device != "cuda":
            skipped_speed += 1
            continue
        tasks.append(t)
    n_all = len(make_tasks(sweep, points, device))
    if device != "cuda":
        _note_no_gpu(results, records, sweep, points)
        log(f"speed: not measured ({skipped_speed} measurements need a GPU: run with --device cuda on one)")
    log(f"{n_all - skipped_speed - len(tasks)} measurements already in {results.name}; {len(tasks)} to run on "
        + (f"Ray tasks ({'one GPU' if device == 'cuda' else 'one CPU'} each)" if backend == "ray" else
           f"{jobs} {'GPU' if device == 'cuda' else 'CPU'} worker(s)"))

    if build and tasks and backend == "local":     # with Ray, each task builds on its own node
        specs = {t["spec_hash"]: t["spec"] for t in tasks}
        log(f"building {len(specs)} variant(s) (specgen.load, cached by spec hash)")
        failed = {}

        def built(r):
            if not r["ok"]:
                failed[r.get("hash")] = r["error"]
                log(f"  build failed: {r['error']}")

        items = list(specs.values())
        _run_local(build_task, items, min(jobs, len(items)), device, built, pin_gpus=False, on_lost=_lost_build,
                   log=log)
        if failed:
            log(f"{len(failed)} build(s) failed: their fidelity (reference) is still measured and the report marks "
                f"them; their speed cannot be")
            for t in tasks:
                if t["spec_hash"] in failed:
                    t["build_error"] = failed[t["spec_hash"]]

    commit = _commit()
    for t in tasks:
        t["commit"] = commit
    # Longest first: fitted scorers take the most time.
    tasks.sort(key=lambda t: (t["part"] != "speed", t["spec"]["selection"] is not None and
                              t["spec"]["selection"]["scorer"] == "indexer"), reverse=True)
    progress = Progress(len(tasks), log)
    errors = 0

    def finished(rec: dict) -> None:
        nonlocal errors
        append_record(results, rec)
        errors += rec.get("status") == "error"
        progress(rec)

    try:
        if tasks:
            if backend == "ray":
                _run_ray(measure_task, tasks, device, finished, on_lost=_lost_measurement)
            else:
                _run_local(measure_task, tasks, jobs, device, finished, on_lost=_lost_measurement, log=log)
    except KeyboardInterrupt:
        # Every finished measurement is already in results.jsonl (appended and synced one by one): the folder is
        # resumable as it is; the report is left for the run that finishes.
        raise SweepInterrupted(progress.done, len(tasks), results) from None

    paths = report(out_dir, sweep, points)
    log(f"report: {paths['report']}")
    return {"points": len(points), **counts, "ran": len(tasks), "errors": errors, "report": str(paths["report"])}


def _note_no_gpu(results: Path, records: list[dict], sweep: Sweep, points: list[Point]) -> None:
    """On a CPU, speed is recorded as "no GPU" once per (variant, regime, seqlen), never as a time."""
    have = {r["key"] for r in records if r.get("part") == "speed"}
    for t in make_tasks(sweep, points, "cpu"):
        if t["part"] != "speed":
            continue
        key = task_key(t["spec_hash"], t["regime"], t["seqlen"], "speed", "cpu", t["settings"])
        if key in have:
            continue
        rec = {k: t[k] for k in ("sweep", "label", "index", "values", "effective", "top_k", "regime", "seqlen",
                                 "part", "settings")}
        rec.update({"key": key, "spec_name": t["spec"]["name"], "spec_hash": t["spec_hash"], "status": "skipped",
                    "speed": "no GPU", "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        append_record(results, rec)


def current_keys(sweep: Sweep, points: list[Point]) -> tuple[set[str], set[str]]:
    """(fidelity keys, speed keys without the device) of the sweep as it is now: what its report shows."""
    tasks = make_tasks(sweep, points, "cpu")
    return ({t["key"] for t in tasks if t["part"] == "fidelity"}, {t["key"] for t in tasks if t["part"] == "speed"})


def report(out_dir: Path, sweep: Sweep, points: list[Point] | None = None, plot_format: str = "png") -> dict:
    """Write the report of the sweep's current settings (specgen.study.report.write_report)."""
    points = expand(sweep) if points is None else points
    return write_report(out_dir, sweep=sweep, points=points, plot_format=plot_format,
                        keys=current_keys(sweep, points))


def default_out(sweep: Sweep) -> Path:
    return Path("bench") / "sweeps" / sweep.name


__all__ = ["Point", "Sweep", "SweepError", "SweepInterrupted", "append_record", "current_keys", "report", "fidelity_regimes", "settings_hash", "build_task", "default_out", "expand", "finished_keys",
           "gpu_identity", "gpu_slots", "load_sweep", "make_tasks", "measure_speed", "measure_task", "read_records",
           "run_sweep", "sweep_from_mapping", "task_key"]
