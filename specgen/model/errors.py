"""Errors that specgen reports to users.

A `SpecError` is a user's mistake in a spec: it names the field path, the file and line where the field stands,
what is wrong and how to fix it. The CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


class SpecError(ValueError):
    def __init__(self, field: str, message: str, fix: str = "", *, file: str | None = None, line: int | None = None):
        self.field = field
        self.message = message
        self.fix = fix
        self.file = file
        self.line = line
        super().__init__(self._render())

    def located(self, file: str | None, line: int | None) -> "SpecError":
        """The same error with a location filled in where it had none."""
        return type(self)(self.field, self.message, self.fix, file=self.file or file, line=self.line or line)

    def __reduce__(self):  # pickling (errors crossing process pools) must not call __init__ with the rendered text
        return _rebuild, (type(self), self.field, self.message, self.fix, self.file, self.line)

    def _render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        text = f"{where}{self.field}: {self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class UnsupportedSpecError(SpecError):
    """A well-formed spec that names a variant the generator cannot (yet) render correctly."""


def _rebuild(cls, field, message, fix, file, line):
    return cls(field, message, fix, file=file, line=line)


class BuildError(Exception):
    """A build that cannot write its output or read its inputs besides the spec (the output folder, a tuning record):
    one line naming the path, what is wrong and the fix. The CLI prints it without a traceback and exits 2."""

    def __init__(self, path: str, message: str, fix: str = ""):
        self.path = str(path)
        self.message = message
        self.fix = fix
        super().__init__(f"{self.path}: {message}" + (f"; fix: {fix}" if fix else ""))

    def __reduce__(self):
        return type(self), (self.path, self.message, self.fix)
