"""`specgen.load`: build a spec on first use, cache it by spec hash, and import it (FlashInfer-style JIT).

The module is rendered by the same code as `specgen build`, so both give the same bytes. The cache lives in
$SPECGEN_CACHE (default ~/.cache/specgen), one folder per spec hash and specgen version; a second call with an equal
spec returns the already imported module.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from . import __version__
from .render import build
from .spec import Spec, load_spec, validated

_loaded: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECGEN_CACHE", Path.home() / ".cache" / "specgen"))


def import_path(path: Path, name: str) -> ModuleType:
    """Import a generated module from a file under a unique name (two specs never share a module object)."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load(spec: Spec | str | os.PathLike, spec_path: str | os.PathLike | None = None) -> ModuleType:
    """The generated module of a spec (a Spec or a path to its YAML), built into the cache on first use.

    The tuning record beside the YAML (`<name>.tune.json`) is baked in; for a Spec object, pass `spec_path` to
    locate its record (without one, kernels with no tuned config autotune on the GPU)."""
    spec_path = Path(spec_path) if spec_path is not None else None
    if not isinstance(spec, Spec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    else:
        spec = validated(spec)  # exactly as a file is validated: a Spec built in Python skipped those checks
    from .tuning import load_records, records_hash

    key = f"{spec.name}_{spec.hash}_{records_hash(load_records(spec, spec_path))}"
    if key in _loaded:
        return _loaded[key]
    folder = cache_dir() / f"v{__version__}" / key
    built = build(spec, folder, spec_path=spec_path)
    module = import_path(built.module, f"specgen_generated.{key}")
    _loaded[key] = module
    return module
