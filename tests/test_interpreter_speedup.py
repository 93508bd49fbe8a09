"""specgen.testing.interpreter (installed by the root conftest under the interpreter): `xor_sum` reduced with numpy
gives what Triton's own per-element loop gives, and the sorts built on it (`tl.sort`, `tl.topk`) equal torch's."""

import pytest
import torch
import triton
import triton.language as tl

from specgen import runtime
from specgen.testing import interpreter

pytestmark = pytest.mark.skipif(not runtime.interpreting(), reason="the speed-up is of the CPU interpreter")


def test_the_root_conftest_installed_it():
    assert interpreter._INSTALLED and interpreter.install()


@triton.jit
def _xor_kernel(X, ROWS, COLS, ALL, KEEP, N: tl.constexpr):
    r = tl.arange(0, 4)
    c = tl.arange(0, N)
    x = tl.load(X + r[:, None] * N + c[None, :])
    tl.store(ROWS + r, tl.xor_sum(x, axis=1))
    tl.store(COLS + c, tl.xor_sum(x, axis=0))
    tl.store(ALL, tl.xor_sum(x))
    tl.store(KEEP + r[:, None] * N + c[None, :], tl.broadcast_to(tl.xor_sum(x, axis=1, keep_dims=True), (4, N)))


def _xor_sums(x):
    n = x.shape[1]
    rows, cols, whole, keep = (torch.empty(4, dtype=x.dtype), torch.empty(n, dtype=x.dtype),
                               torch.empty(1, dtype=x.dtype), torch.empty(4, n, dtype=x.dtype))
    _xor_kernel[(1,)](x, rows, cols, whole, keep, N=n)
    return rows, cols, whole, keep


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_xor_sum_equals_the_interpreters_loop_and_a_plain_one(dtype, monkeypatch):
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max, (4, 16), dtype=dtype, generator=torch.Generator().manual_seed(3))
    fast = _xor_sums(x)
    rows, cols = x[:, 0].clone(), x[0].clone()
    for i in range(1, 16):
        rows ^= x[:, i]
    for i in range(1, 4):
        cols ^= x[i]
    whole = rows[0] ^ rows[1] ^ rows[2] ^ rows[3]
    assert torch.equal(fast[0], rows) and torch.equal(fast[1], cols) and fast[2].item() == whole.item()
    assert torch.equal(fast[3], rows[:, None].expand(4, 16))
    from triton.runtime.interpreter import ReduceOps

    monkeypatch.setattr(ReduceOps, "apply_impl", interpreter._INSTALLED[0])    # the interpreter's own loop
    for a, b in zip(fast, _xor_sums(x)):
        assert torch.equal(a, b)


@triton.jit
def _sort_kernel(X, SORTED, TOP, N: tl.constexpr, K: tl.constexpr):
    rows = tl.arange(0, 8)
    x = tl.load(X + rows[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(SORTED + rows[:, None] * N + tl.arange(0, N)[None, :], tl.sort(x, dim=1, descending=True))
    tl.store(TOP + rows[:, None] * K + tl.arange(0, K)[None, :], tl.topk(x, K, dim=1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_sort_and_topk_equal_torchs(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-2**30, 2**30, (8, 32), generator=gen).to(dtype)
    if dtype.is_floating_point:
        x = torch.randn(8, 32, generator=gen)
    x[0, :4] = x[0, 4]                                     # ties
    out, top = torch.empty_like(x), torch.empty(8, 8, dtype=dtype)
    _sort_kernel[(1,)](x, out, top, N=32, K=8)
    want = x.sort(dim=1, descending=True).values
    assert torch.equal(out, want) and torch.equal(top, want[:, :8])
