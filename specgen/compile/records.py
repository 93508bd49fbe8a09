"""Tuning records on disk: where a spec's record lives, reading and checking it, and the hash that keys a build.

Kept apart from `tuning` (which derives candidates and defaults from the plan) so that a cache hit in
`specgen.load` can key its module without importing the plan, the analysis or sympy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..model.errors import BuildError
from ..model.spec import Spec


def record_path(spec_path: Path) -> Path:
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name.removesuffix(".yaml") + ".tune.json")


def load_records(spec: Spec, spec_path: Path | None) -> list[dict]:
    """The entries of the spec's tuning record that match its hash (other hashes are stale and ignored).

    A record that is not valid JSON, not shaped like one, or holds a value the generated module cannot hold (NaN,
    Infinity, a config value that is not a whole number) raises BuildError naming the file: baking it in would
    break the module at import."""
    if spec_path is None:
        return []
    path = record_path(spec_path)
    if not path.exists():
        return []
    data = read_record(path)
    return [e for e in data["entries"] if e["spec_hash"] == spec.hash]


def _no_constant(name: str):
    raise ValueError(f"{name}, which a generated module cannot hold")


def read_record(path: Path) -> dict:
    """A tuning record's data, checked (BuildError naming the file otherwise)."""
    fix = f"correct or delete {path.name} (`specgen tune` writes a new one)"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(path, f"cannot read the tuning record: {getattr(exc, 'strerror', None) or exc}", fix) from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}:{exc.lineno}", f"the tuning record is not valid JSON ({exc.msg})", fix) from None
    except (ValueError, RecursionError) as exc:
        raise BuildError(path, f"the tuning record holds {str(exc) or 'a value nested too deeply'}", fix) from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BuildError(path, 'a tuning record is {"entries": [...]}', fix)
    for i, entry in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("spec_hash", "gpu", "triton")):
            raise BuildError(path, f"{where}: an entry needs spec_hash, gpu and triton (text)", fix)
        if not isinstance(entry.get("date", ""), str):
            raise BuildError(path, f"{where}.date: expected text", fix)
        configs = entry.get("configs")
        if not isinstance(configs, dict):
            raise BuildError(path, f"{where}.configs: expected a mapping of kernel configs", fix)
        for kernel, cfg in configs.items():
            if not isinstance(cfg, dict):
                raise BuildError(path, f"{where}.configs.{kernel}: expected a mapping of launch parameters", fix)
            for key, value in cfg.items():
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
                    raise BuildError(path, f"{where}.configs.{kernel}.{key}: {str(value)[:40]} is not a whole "
                                     "number of a launch config", fix)
    return data


def records_hash(records: list[dict]) -> str:
    if not records:
        return "none"
    blob = json.dumps(records, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
