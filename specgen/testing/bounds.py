"""An opt-in pytest plugin for the CPU interpreter: every Triton store and atomic must land inside the storage of one
of the launch's tensor arguments, else the test fails naming the kernel. Under TRITON_INTERPRET an out-of-bounds
store writes into the host heap and surfaces later as an unrelated crash (`vector::reserve`, `bad_alloc`, a
segfault); on the GPU it is an illegal access or silent corruption. Use: `python -m pytest -p specgen.testing.bounds
...` (works with xdist). It patches triton.runtime.interpreter when loaded, so load it only on purpose."""
import numpy as np
import triton.runtime.interpreter as I

RANGES = []
STATE = {"kernel": None}
_orig_init = I.GridExecutor._init_args_hst


def _init(self, args_dev, kwargs):
    args_hst, kwargs_hst = _orig_init(self, args_dev, kwargs)
    RANGES.clear()
    for a in list(args_hst) + list(kwargs_hst.values()):
        if hasattr(a, "untyped_storage"):
            st = a.untyped_storage()
            RANGES.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    STATE["kernel"] = getattr(self.fn, "__name__", str(self.fn))
    return args_hst, kwargs_hst


def _check(ptrs, mask, itemsize, what):
    p = np.asarray(ptrs).astype(np.uint64).ravel()
    m = np.ones_like(p, dtype=bool) if mask is None else np.asarray(mask).astype(bool).ravel()
    if m.size == 1 and p.size > 1:
        m = np.repeat(m, p.size)
    p = p[m]
    if p.size == 0:
        return
    ok = np.zeros(p.shape, dtype=bool)
    for lo, hi in RANGES:
        ok |= (p >= lo) & (p + itemsize <= hi)
    if not ok.all():
        bad = p[~ok][:4]
        raise AssertionError(f"OOB {what} in {STATE['kernel']}: {len(p) - ok.sum()} of {len(p)} addresses outside "
                             f"every tensor argument, e.g. {[hex(int(b)) for b in bad]}; ranges {[(hex(a), b - a) for a, b in RANGES]}")


_orig_store = I.InterpreterBuilder.create_masked_store
_orig_rmw = I.InterpreterBuilder.create_atomic_rmw


def _store(self, ptrs, value, mask, cache_modifier, eviction_policy):
    _check(ptrs.data, mask.data, value.data.dtype.itemsize, "store")
    return _orig_store(self, ptrs, value, mask, cache_modifier, eviction_policy)


def _rmw(self, rmwOp, ptr, val, mask, sem, scope):
    _check(ptr.data, None if mask is None else mask.data, val.data.dtype.itemsize, "atomic")
    return _orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)


I.GridExecutor._init_args_hst = _init
I.InterpreterBuilder.create_masked_store = _store
I.InterpreterBuilder.create_atomic_rmw = _rmw
