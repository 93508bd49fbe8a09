"""`specgen.load`: build a spec on first use, cache it, and import it (FlashInfer-style JIT).

The module is rendered by the same code as `specgen build`, so both give the same bytes. The cache lives in
$SPECGEN_CACHE (default ~/.cache/specgen), one folder per key: the spec's name and hash, its tuning record's hash,
the specgen version and runtime schema, and a digest of the generator (templates and the modules that render them), so a changed
template or planner never serves a stale module. A cache hit imports the module without rendering: no Jinja, no
planner, no sympy. Concurrent first calls of one key (several processes of a job) take a file lock, and one builds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .. import RUNTIME_SCHEMA, __version__
from .files import build_error
from .records import load_records, records_hash
from ..model.spec import Spec, load_spec, validated

_loaded: dict[str, ModuleType] = {}   # by cache key and interpreter mode (see interpreter_mode)

# What decides a generated module's bytes besides the spec and its record: the templates and every module of the
# compile layer and the spec model (a list of chosen modules went stale once: loop_order and variants were missing).
_GENERATOR_PACKAGES = ("compile", "model")


def cache_dir() -> Path:
    return Path(os.environ.get("SPECGEN_CACHE", Path.home() / ".cache" / "specgen"))


def generator_files(package: Path) -> list[Path]:
    """The files whose bytes decide a rendered module: the templates and the compile and model layers' modules."""
    files = sorted((package / "compile" / "templates").rglob("*.j2"))
    for folder in _GENERATOR_PACKAGES:
        files += sorted((package / folder).glob("*.py"))
    return files


@functools.lru_cache(maxsize=None)
def generator_digest() -> str:
    """A digest of everything that renders a module: the template files and the generator's own modules."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in generator_files(package):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def cache_folder(key: str) -> Path:
    """Where the module of a cache key lives: per specgen version and runtime schema (a newer runtime never imports
    a module rendered for another schema; it builds its own)."""
    return cache_dir() / f"v{__version__}-s{RUNTIME_SCHEMA}" / key


def cache_key(spec: Spec, spec_path: Path | None, plan=None) -> str:
    """`<name>_<spec hash>_<record hash>_<generator digest>`, with `_p<plan digest>` where a caller's plan replaces
    the spec's own (two plans of one spec and name never share a module)."""
    key = f"{spec.name}_{spec.hash}_{records_hash(load_records(spec, spec_path))}_{generator_digest()}"
    if plan is not None:
        key += "_p" + hashlib.sha256(repr(plan).encode()).hexdigest()[:12]
    return key


# The values of TRITON_INTERPRET that Triton (3.6, triton.knobs' env_bool) reads as on, in any case. Read here as
# Triton reads it, not through specgen.runtime.interpreting(): the compile layer imports only the spec model, and
# what matters is how Triton decorates (interpreting() also counts "2" or "off" as on).
_TRITON_ON = ("1", "true", "yes", "on", "y")


def interpreter_mode() -> str:
    """"_interp" where Triton would decorate a module imported now for its CPU interpreter, else "". Triton reads
    TRITON_INTERPRET at each @triton.jit, so a module's kernels are interpreted or compiled as the variable was when
    the module was imported, and stay so. The in-process cache and the module's name carry the mode: a module
    imported under the interpreter is never handed to a caller running without it, nor the reverse (a sweep's
    in-process run sets the interpreter for its duration). The files on disk are the same either way."""
    return "_interp" if os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_ON else ""


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


@contextlib.contextmanager
def _build_lock(folder: Path):
    """An exclusive lock on one cache folder across processes (a no-op where fcntl is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: builds are still atomic (renames), only possibly repeated
        yield
        return
    with open(folder / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(spec: Spec | str | os.PathLike, spec_path: str | os.PathLike | None = None, *, plan=None) -> ModuleType:
    """The generated module of a spec (a Spec or a path to its YAML), built into the cache on first use.

    The tuning record beside the YAML (`<name>.tune.json`) is baked in; for a Spec object, pass `spec_path` to
    locate its record (without one, kernels with no tuned config autotune on the GPU). `plan` (a
    specgen.compile.plan.Plan) replaces the spec's own plan when the module is built; the cache key then carries a
    digest of the plan, and a caller gives the spec a name of its own (specgen.compile.variants does) so the
    module's custom ops are named apart from the default's."""
    spec_path = Path(spec_path) if spec_path is not None else None
    if not isinstance(spec, Spec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    else:
        spec = validated(spec)  # exactly as a file is validated: a Spec built in Python skipped those checks
    key = cache_key(spec, spec_path, plan)
    mode = interpreter_mode()
    if key + mode in _loaded:
        return _loaded[key + mode]
    folder = cache_folder(key)
    # A build renames its files into place only once all are written, so an existing module is a whole one.
    module_path = folder / f"{spec.name}.py"
    if not module_path.is_file():
        from . import render  # the miss path alone pays for Jinja, the planner and sympy

        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the cache folder cannot be made: the same one-line error as a build's
            raise build_error(exc, module_path) from None
        with _build_lock(folder):
            if not module_path.is_file():  # another process may have built it while this one waited
                module_path = render.build(spec, folder, spec_path=spec_path, plan=plan).module
    module = import_path(module_path, f"specgen_generated.{key}{mode}")
    if interpreter_mode() != mode:
        # The module's import turned the interpreter on before it imported triton (specgen.runtime's first import,
        # no visible GPU, TRITON_INTERPRET unset): its kernels are interpreted. Imported again under that mode's
        # name, so that the other mode's name and cache entry never hold it (its custom ops are reused by name).
        sys.modules.pop(f"specgen_generated.{key}{mode}", None)
        mode = interpreter_mode()
        if key + mode in _loaded:
            return _loaded[key + mode]
        module = import_path(module_path, f"specgen_generated.{key}{mode}")
    _loaded[key + mode] = module
    return module
