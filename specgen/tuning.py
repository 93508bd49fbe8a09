"""Tuning records: the launch configs `specgen tune` measured best, kept beside the spec.

A record lives in `specs/<name>.tune.json`, keyed by spec hash, GPU name and Triton version; it is not part of the
spec's hash. `specgen build` bakes the configs of the records matching the spec's hash into the generated module
(one entry per GPU name; the module picks by device name at its first call, and falls back to the plan's defaults),
so nothing is tuned at import or first call. The generated header names the record's hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .plan import Plan
from .spec import Spec

KERNELS_WITH_TILES = ("compression", "selection", "window")


def record_path(spec_path: Path) -> Path:
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name.removesuffix(".yaml") + ".tune.json")


def load_records(spec: Spec, spec_path: Path | None) -> list[dict]:
    """The entries of the spec's tuning record that match its hash (other hashes are stale and ignored)."""
    if spec_path is None:
        return []
    path = record_path(spec_path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [e for e in data.get("entries", []) if e.get("spec_hash") == spec.hash]


def default_configs(plan: Plan) -> dict:
    configs = {}
    for kind in KERNELS_WITH_TILES:
        tile = getattr(plan, kind)
        if tile is not None:
            configs[kind] = {"bt": tile.bt, "block_n": tile.block_n, "num_warps": tile.num_warps,
                             "num_stages": tile.num_stages}
    if plan.spec.selection is not None:
        rows = plan.score_bt * plan.score_gp if plan.spec.selection.scorer == "compression" else 16
        configs["select"] = {"num_warps": 8 if rows >= 256 else 4}
    return configs


def configs_for(plan: Plan, records: list[dict]) -> dict:
    """{"default": plan defaults, "<GPU name>": {kernel: config}} with the tuned entries (newest wins per GPU)."""
    out = {"default": default_configs(plan)}
    for entry in sorted(records, key=lambda e: e.get("date", "")):
        out[entry["gpu"]] = {k: dict(v) for k, v in entry["configs"].items()}
    return out


def records_hash(records: list[dict]) -> str:
    if not records:
        return "none"
    blob = json.dumps(records, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_entry(spec_path: Path, entry: dict) -> Path:
    """Add or replace the entry for (spec hash, GPU, Triton version), atomically."""
    from .render import write_if_changed

    path = record_path(spec_path)
    data = json.loads(path.read_text()) if path.exists() else {"entries": []}
    key = (entry["spec_hash"], entry["gpu"], entry["triton"])
    data["entries"] = [e for e in data["entries"] if (e["spec_hash"], e["gpu"], e["triton"]) != key] + [entry]
    write_if_changed(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
