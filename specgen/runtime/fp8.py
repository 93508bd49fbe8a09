"""e4m3 row quantisation in one launch: `runtime.fp8_rows` (and `fp8_index_queries`, the head weights with the
row scales folded in) for GPU tensors, bit for bit what the torch form computes on any device.

The torch form is a dozen elementwise and reduction launches (the fp32 copy, |x|, the row max, the quotient, the
cast, the copies back, the weights' product): at a decode step of batch 1 they were about 12 us of kernels and as
many launch gaps of dsa_v32's ~100 us step (H100, commit b6eeeaf), and at a 64k prefill several passes over a
1 GiB q_I. Here one program quantises BR rows in registers.

Bit for bit with torch: the scale is amax / 448 correctly rounded (`div_rn`, as torch divides by a tensor), the
element x / scale likewise, and the cast to e4m3 is torch's written out in integer arithmetic (round to nearest
even, the subnormals through a magic addition as c10's fp8e4m3fn_from_fp32_value does them; magnitudes from 464 up
saturate to 448 and NaN stays NaN, as torch 2.13 casts: a quantised row never leaves [-448, 448] but for NaN) rather
than Triton's `.to(tl.float8e4nv)`: the CPU interpreter's fp8 cast rounds differently (124.3 to 64), so the tests
could not check the kernel's rounding there. The product of the weights is one fp32 multiply,
as torch's."""

from __future__ import annotations

import contextlib

import torch

from . import next_pow2

import triton  # noqa: E402  (after specgen.runtime, which may turn the CPU interpreter on)
import triton.language as tl  # noqa: E402

# Elements a program holds (BR rows x the row padded to a power of two): 16 a thread at 4 warps.
TILE_ELEMENTS = 2048


@triton.jit
def _e4m3_code(v):
    """float8_e4m3fn bits (int32, 0..255) of fp32 `v`, rounded as torch's cast rounds."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Below 2^-6 (the smallest normal): |v| + 2^14 rounds |v| to the subnormal step 2^-9 (fp32 addition rounds to
    # nearest even), and its low mantissa bits are the code.
    small = (tl.abs(v) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    # Normal: rebias the exponent (127 -> 7), round the 23 mantissa bits to 3 (half to even), carrying into it.
    normal = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    code = tl.where(a < (121 << 23), small, normal)
    # 464 and up (the half-way point past 448), inf included: 448, as torch's cast saturates; NaN: the NaN code.
    code = tl.where(a >= 0x43E80000, 0x7E, code) | sign
    return tl.where(a > 0x7F800000, 0x7F, code)


@triton.jit
def _max_nan(a, b):
    # torch.amax keeps a NaN (the row's scale then falls back to 1); the GPU's plain max.f32 would skip it.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fp8_rows_kernel(X, X8, SCALE, W, W_OUT, R, D, BR: tl.constexpr, BD: tl.constexpr, HAS_W: tl.constexpr):
    """Rows [pid * BR, pid * BR + BR) of X [R, D]: X8 (uint8 view of the e4m3 rows), SCALE [R] fp32 and, with
    HAS_W, W_OUT [R] = fp32(W) * SCALE."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 1, _max_nan)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([BR], 448.0, tl.float32)), 1.0)
    code = _e4m3_code(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (BR, BD))))
    tl.store(X8 + offs, code.to(tl.uint8), mask=ok)
    tl.store(SCALE + rows, scale, mask=row_ok)
    if HAS_W:
        w = tl.load(W + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(W_OUT + rows, w * scale, mask=row_ok)


def rows(x: torch.Tensor, w: torch.Tensor | None = None):
    """(x8, scale) as runtime.fp8_rows gives them, or with `w` (one weight per row: x's shape without its last
    dim) (x8, fp32(w) * scale) as runtime.fp8_index_queries does, in one launch."""
    D = x.shape[-1]
    flat = x.reshape(-1, D).contiguous()
    R = flat.shape[0]
    x8 = torch.empty((R, D), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(R, dtype=torch.float32, device=x.device)
    if w is not None:
        if w.numel() != R:
            raise ValueError(f"fp8.rows: {w.numel()} weights for {R} rows (one a row: x's shape without its last "
                             f"dim, {tuple(x.shape[:-1])})")
        w_flat = w.reshape(-1).contiguous()
        w_out = torch.empty(R, dtype=torch.float32, device=x.device)
    else:
        w_flat = w_out = scale   # unread (HAS_W off)
    if R:
        BD = next_pow2(D)
        BR = max(1, TILE_ELEMENTS // BD)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():   # x's GPU, not the current
            _fp8_rows_kernel[(triton.cdiv(R, BR),)](flat, x8.view(torch.uint8), scale, w_flat, w_out, R, D, BR=BR,
                                                    BD=BD, HAS_W=w is not None, num_warps=4)
    x8 = x8.view(x.shape)
    if w is None:
        return x8, scale.view(x.shape[:-1])
    return x8, w_out.view(w.shape)
