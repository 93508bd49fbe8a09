"""specgen: a compiler-style generator of sparse-attention Triton kernels from YAML specs."""

__version__ = "0.1.0"


def load(spec):
    """Build `spec` (a Spec or a YAML path) on first use, cache it by spec hash, and return the imported module."""
    from .jit import load as _load

    return _load(spec)
