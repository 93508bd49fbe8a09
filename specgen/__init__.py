"""specgen: a compiler-style generator of sparse-attention Triton kernels from YAML specs."""

__version__ = "0.1.0"


def load(spec, spec_path=None):
    """Build `spec` (a Spec or a YAML path) on first use, cache it by spec hash and tuning record, and return the
    imported module. The tuning record beside the YAML is baked in; for a Spec object, `spec_path` locates it."""
    from .jit import load as _load

    return _load(spec, spec_path)
