"""An exact speed-up of Triton's CPU interpreter for the test suite, installed by the repository's root conftest
when the kernels run interpreted (docs/testing.md, "The interpreter's sorts").

Triton 3.6's interpreter reduces with numpy only for sum, min, max and argmin/argmax; any other combine function
falls back to a loop in Python that calls it once per element. `tl.sort` and `tl.topk` are bitonic networks whose
every compare-and-swap step is an `xor_sum` along one axis, so a [64, 64] top-k spends most of a second in that
loop: the block scorer's running top-n, the token top-k and the decode top-n were most of the interpreter time of
the tests that run them. `install()` reduces `_xor_combine` with `numpy.bitwise_xor.reduce` instead: exact (XOR
of integers is associative and commutative, so the order of the loop does not matter), the same dtype and shape
as the loop's result; every other reduction keeps the interpreter's own path. tests/test_interpreter_speedup.py
holds it equal to the loop and `tl.sort` / `tl.topk` equal to torch's.
"""

from __future__ import annotations

import numpy as np

_INSTALLED: list = []


def install() -> bool:
    """Reduce `xor_sum` with numpy in Triton's interpreter (idempotent). False, and nothing changed, where this
    Triton lacks the interpreter internals it replaces (the suite then runs at the interpreter's own speed)."""
    if _INSTALLED:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        ops, combine = interpreter.ReduceOps, tl.standard._xor_combine
        original = ops.apply_impl
    except (ImportError, AttributeError):
        return False

    def apply_impl(self, input):
        if self.combine_fn is combine and len(input) == 1:
            x = input[0]
            data = x.handle.data
            if np.issubdtype(data.dtype, np.integer):
                return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), x.dtype)
        return original(self, input)

    ops.apply_impl = apply_impl
    _INSTALLED.append(original)
    return True
