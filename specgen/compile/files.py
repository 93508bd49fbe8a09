"""Writing generated files: all or nothing, only what changed, one-line errors.

A build writes every file to a temporary file beside its target and renames them into place only when all are
written, so a template error, a full disk or a read-only folder leaves the old files (and no temporary ones) behind.
OSErrors become BuildError naming the path and the fix. Used by `render` (builds), `jit` (the cache) and `tuning`
(records); it imports nothing of the generator.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from ..model.errors import BuildError


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace `path` with `text` unless it already holds exactly that; True if written."""
    return bool(write_files([(Path(path), text)]))


def write_files(files: list[tuple[Path, str]]) -> tuple[Path, ...]:
    """Write `files` ((path, text) pairs) all or nothing; only those whose bytes change. Returns the changed paths.

    OSErrors become BuildError (one line: the path, what is wrong, the fix); nothing is left behind on failure: no
    temporary files, and no folder this call created."""
    pending: list[tuple[str, Path]] = []
    created: list[Path] = []
    current: Path | None = None
    try:
        for path, text in files:
            current = Path(path)
            _remove_stale_temps(current)
            data = text.encode()
            if current.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(current))
            try:
                if current.read_bytes() == data:
                    continue
            except FileNotFoundError:
                pass
            created += _make_folder(current.parent)
            fd, tmp = tempfile.mkstemp(dir=current.parent, prefix=f".{current.name}.", suffix=".tmp")
            pending.append((tmp, current))
            with os.fdopen(fd, "wb") as f:
                _write(f, data)
            # mkstemp makes the file 0600; give it the mode a plain open() would (shared caches stay readable).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in pending:
            current = path
            os.replace(tmp, path)
    except OSError as exc:
        _clean(pending, created)
        raise build_error(exc, current) from None
    except BaseException:
        _clean(pending, created)
        raise
    return tuple(path for _, path in pending)


def _write(f, data: bytes) -> None:
    f.write(data)  # a seam for tests (a full disk: OSError(ENOSPC))


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first (removed again on failure)."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _clean(pending: list[tuple[str, Path]], created: list[Path]) -> None:
    for tmp, _ in pending:
        Path(tmp).unlink(missing_ok=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of `path` that a killed build left (`.NAME.py.XXXX.tmp`)."""
    try:
        stale = list(path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"))
    except OSError:
        return
    for tmp in stale:
        try:
            tmp.unlink()
        except OSError:
            pass


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)


def build_error(exc: OSError, path: Path | None) -> BuildError:
    where = exc.filename if isinstance(exc.filename, (str, os.PathLike)) else path or "<output>"
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return BuildError(where, "cannot write: no space left on the device", "free space on that disk, or build "
                          "into another folder (--out; $SPECGEN_CACHE for specgen.load)")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BuildError(where, f"cannot write: {exc.strerror or 'permission denied'}", "build into a writable "
                          "folder (--out; $SPECGEN_CACHE for specgen.load), or make this one writable")
    if code == errno.EISDIR:
        return BuildError(where, "a folder stands where a generated file must go", "remove or rename that folder")
    if code in (errno.ENOTDIR, errno.EEXIST):
        where = Path(path).parent if path is not None else where
        return BuildError(where, "a part of this path is a file, not a folder", "name a folder for the output "
                          "(--out), or move the file")
    if code == errno.ENAMETOOLONG:
        return BuildError(where, "file name too long", "use a shorter spec name or output folder")
    return BuildError(where, f"cannot write: {exc.strerror or exc}", "check the output folder (--out)")
