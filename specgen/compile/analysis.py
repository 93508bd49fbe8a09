"""Symbolic cost analysis of a spec: FLOPs, HBM bytes and intermediate memory per branch, as sympy expressions in
the sequence length T, against a dense causal baseline.

Everything here is for the FORWARD pass at batch 1 and follows docs/semantics.md exactly:

* compression: block i covers [i·d, i·d + l) and query t sees it iff i·d + l − 1 ≤ t, so query t sees
  max(0, ⌊(t − l + 1)/d⌋ + 1) pooled keys;
* selection (block granularity): candidates are blocks j with j·l' ≤ t; the current block ⌊t/l'⌋ is forced when
  `local ≥ 1`, so with more than top_k candidates a query attends (top_k − 1)·l' full blocks plus the t mod l' + 1
  visible tokens of its own block: min(t + 1, (top_k − 1)·l' + (t mod l') + 1) tokens, exactly. With `local = 0`
  the count depends on which blocks win; we then use the upper bound min(t + 1, top_k·l') (said in `explain`).
  Token granularity is the case l' = 1: min(t + 1, top_k) tokens, exactly;
* window: min(w, t + 1) keys;
* indexer: every pair s ≤ t, per kv group: H_I·d_I multiply-adds for q_I·k_I plus H_I for the weighted sum.

FLOPs count 2 per multiply-add and include only the QK^T and PV matmuls (and the pooling), not softmax, top-k or
gating, the convention of the FLOP numbers in docs/marks.md. The per-query counts are summed over t = 0 … T−1 in
closed form (⌊·⌋, Min, Max); sympy's `summation` cannot sum floors, so the closed forms are derived here by hand
and the tests check them against a brute-force loop. `large_T` drops the floors for a readable leading-order form.

Bytes are a lower bound on HBM traffic: each tensor a kernel needs is read once, except the selection branch's K/V
gather, which is counted per (query, kv group) as docs/marks.md does (the random-selection worst case: every
(t, kv head) loads its own blocks; L2 reuse between neighbouring queries is a kernel's job to win back). Each branch
is assumed to run as its own kernel, so each reads q.

Importing this module imports sympy; only the generator uses it, generated kernels never do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import sympy
from sympy import Max, Min, Mod, ceiling, floor

from ..model.spec import Spec
from .branches import NAMES as BRANCH_NAMES

T = sympy.Symbol("T", positive=True, integer=True)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
INDEXER_DTYPE_BYTES = {"bf16": 2, "fp8_e4m3": 1}
FP32 = 4  # lse, and the score matrices a naive implementation materialises (softmax is done in fp32)
INT32 = 4  # selected block/token indices


@dataclass(frozen=True)
class BranchCost:
    name: str
    flops: sympy.Expr
    bytes: sympy.Expr
    intermediates: sympy.Expr  # bytes the generated kernels keep in HBM for this branch


@dataclass(frozen=True)
class Analysis:
    spec: Spec
    branches: tuple[BranchCost, ...]  # the indexer (if any) first, then spec.branches in order
    dense: BranchCost
    naive_intermediates: sympy.Expr  # the kernels' intermediates plus the score matrices a naive version materialises
    constraints: tuple[str, ...]
    overlap: tuple[int, ...]
    # Addition to the contract: KV-cache bytes one decode step reads (one query, context T), per branch + "dense".
    decode: tuple[tuple[str, sympy.Expr], ...] = ()

    def branch(self, name: str) -> BranchCost:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(f"{self.spec.name} has no branch {name!r} (has {', '.join(b.name for b in self.branches)})")


# ---------------------------------------------------------------------------------------------------------------
# Head dims and the compression → selection overlap
# ---------------------------------------------------------------------------------------------------------------

def head_dim_parts(d: int) -> tuple[int, ...]:
    """Split a head dim (a multiple of 16) into descending powers of two ≥ 16: its binary digits.

    `tl.arange` and `tl.dot` need power-of-two tiles; 192 = 128 + 64 runs as two dots with no wasted work.
    """
    if d < 16 or d % 16:
        raise ValueError(f"head dim {d} is not a positive multiple of 16")
    return tuple(1 << b for b in range(d.bit_length() - 1, 3, -1) if d >> b & 1)


def padding_waste(d: int) -> tuple[int, float]:
    """(next power of two, fraction of the padded dot's work that is wasted) if d were padded instead of split."""
    padded = 1 << (d - 1).bit_length()
    return padded, (padded - d) / padded


def overlap_weights(spec: Spec) -> tuple[int, ...]:
    """Weights |[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d of the compression blocks i that touch one selection
    block j, in order of i (docs/semantics.md, "Selection scores"). () when selection is not scored by compression."""
    sel, cmp_ = spec.selection, spec.compression
    if sel is None or cmp_ is None or sel.scorer != "compression" or "selection" not in spec.branches:
        return ()
    l, d, lp = cmp_.block, cmp_.stride, sel.block
    j = -(-l // lp) + 1  # a block far enough in that every compression block touching it has i ≥ 0
    lo, hi = j * lp, (j + 1) * lp
    out = []
    for i in range((lo - l) // d + 1, (hi - 1) // d + 1):
        shared = min(i * d + l, hi) - max(i * d, lo)
        if shared > 0:
            out.append(shared // d)
    return tuple(out)


OVERLAP_FORMULA = ("S[t,g,j] = Σ_i P[t,g,i]·|[i·d, i·d+l) ∩ [j·l', (j+1)·l')|/d over the (l+l')/d − 1 blocks "
                   "i = j·l'/d − l/d + 1 … (j+1)·l'/d − 1; the k-th of them (k = 0 …) has weight "
                   "min(k+1, l/d, l'/d, (l+l')/d − 1 − k)")


# ---------------------------------------------------------------------------------------------------------------
# Closed forms of the per-query key counts and their sums over t = 0 … n−1
# ---------------------------------------------------------------------------------------------------------------

def _sum_floor_div(m, d):
    """Σ_{u=0}^{m−1} ⌊u/d⌋ for m ≥ 0: q full runs of d equal values 0 … q−1, then r values equal to q."""
    q = floor(m / d)
    r = m - d * q
    return d * q * (q - 1) / 2 + q * r


def _sum_mod(m, L):
    """Σ_{u=0}^{m−1} (u mod L) for m ≥ 0."""
    q = floor(m / L)
    r = m - L * q
    return L * (L - 1) // 2 * q + r * (r - 1) / 2  # L(L−1) is even: keep the coefficient an integer


def n_compressed(n, l, d):
    """Complete compression blocks in a prefix of n tokens = blocks visible to query n − 1."""
    return floor(Max(0, n - l + d) / d)


def _sum_compression_keys(n, l, d):
    """Σ_{t<n} max(0, ⌊(t − l + 1)/d⌋ + 1): queries t ≥ l − 1 see ⌊u/d⌋ + 1 blocks, u = t − l + 1."""
    m = Max(0, n - l + 1)
    return m + _sum_floor_div(m, d)


def _selection_tokens(t, k, lp, exact: bool):
    """Tokens query t attends in the selection branch (see the module docstring)."""
    if exact:
        return Min(t + 1, (k - 1) * lp + Mod(t, lp) + 1)
    return Min(t + 1, k * lp)


def _sum_selection_tokens(n, k, lp, exact: bool):
    """Σ_{t<n} of `_selection_tokens`: all t + 1 tokens while t < k·l', then the steady state. k·l' is a multiple of
    l', so t mod l' restarts at 0 where the steady state begins."""
    ramp = Min(n, k * lp)
    m = Max(0, n - k * lp)
    steady = m * ((k - 1) * lp + 1) + _sum_mod(m, lp) if exact else m * k * lp
    return ramp * (ramp + 1) / 2 + steady


def _sum_window_keys(n, w):
    ramp = Min(n, w)
    return ramp * (ramp + 1) / 2 + Max(0, n - w) * w


def _selection_is_exact(spec: Spec) -> bool:
    """The selection count is data-independent when the query's own block is forced, or blocks are single tokens."""
    sel = spec.selection
    return sel.block == 1 or sel.local >= 1


# ---------------------------------------------------------------------------------------------------------------
# Each attention branch's analysis, declared once
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostContext:
    """What every branch's forward cost shares, worked out once per spec by `analyse`."""
    e: int  # bytes per element of q, k, v and the output
    hkv: int
    dkv: int  # K/V row width in memory: with MLA, V is the first dv dims of K
    attn: int  # FLOPs per (query, key) pair over all query heads: QK^T and PV
    q_bytes: sympy.Expr
    out_bytes: sympy.Expr
    lse_bytes: sympy.Expr
    branch_out: sympy.Expr  # the branch's own output kept for the gate mix (0 when ungated)
    uses_indexer: bool  # the indexer, not this branch, writes the selection's indices
    keys: dict[str, sympy.Expr]  # attended_keys(spec)


@dataclass(frozen=True)
class BranchModel:
    """One branch's cost model. `cost` returns the branch's BranchCost and what a naive implementation would
    materialise on top of its intermediates (score matrices); `decode_tokens` is the K/V rows one decode step reads
    at context T (times the row width gives its bytes)."""
    keys: Callable[[Spec], sympy.Expr]
    cost: Callable[[Spec, CostContext], tuple[BranchCost, sympy.Expr]]
    decode_tokens: Callable[[Spec], sympy.Expr]


def _compression_cost(spec: Spec, c: CostContext) -> tuple[BranchCost, sympy.Expr]:
    cmp_ = spec.compression
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    l, d = cmp_.block, cmp_.stride
    nc = n_compressed(T, l, d)
    pooled = nc * c.hkv * c.dkv * c.e
    if cmp_.pool == "mean":
        # each pooled value is l multiply-adds by 1/l
        pool_flops = 2 * l * nc * c.hkv * c.dkv
        weights = sympy.Integer(0)
    else:
        # [l·D] -> [D] per block, K and V separately (V is part of K under MLA); the position embedding's
        # l·D adds per block are negligible and not counted
        sq = dqk * dqk if spec.mla else dqk * dqk + dv * dv
        pool_flops = 2 * l * nc * c.hkv * sq
        weights = c.hkv * l * sq * c.e
    cost = BranchCost(
        "compression",
        flops=c.attn * c.keys["compression"] + pool_flops,
        # raw K/V read to pool, pooled K/V written then read, q read, output and lse written
        bytes=T * c.hkv * c.dkv * c.e + weights + 2 * pooled + c.q_bytes + c.out_bytes + c.lse_bytes,
        intermediates=pooled + c.lse_bytes + c.branch_out,
    )
    return cost, T * spec.heads.q * nc * FP32  # [T, Hq, Nc] compression probabilities


def _selection_cost(spec: Spec, c: CostContext) -> tuple[BranchCost, sympy.Expr]:
    k, lp = spec.selection.top_k, spec.selection.block
    attended = c.keys["selection"]
    indices = T * c.hkv * k * INT32
    own_indices = sympy.Integer(0) if c.uses_indexer else indices  # else the indexer owns them
    cost = BranchCost(
        "selection",
        flops=c.attn * attended,
        # the K/V gather per (query, kv group); q read; indices written (by the scorer) unless the indexer
        # did, and read; output and lse written
        bytes=attended * c.hkv * c.dkv * c.e + c.q_bytes + own_indices + indices + c.out_bytes + c.lse_bytes,
        intermediates=own_indices + c.lse_bytes + c.branch_out,
    )
    # The indexer's T×T scores are counted with the indexer; a compression-scored selection has [T, Hkv, T/l'].
    naive = sympy.Integer(0) if c.uses_indexer else T * c.hkv * ceiling(T / lp) * FP32
    return cost, naive


def _window_cost(spec: Spec, c: CostContext) -> tuple[BranchCost, sympy.Expr]:
    cost = BranchCost(
        "window",
        flops=c.attn * c.keys["window"],
        bytes=T * c.hkv * c.dkv * c.e + c.q_bytes + c.out_bytes + c.lse_bytes,
        intermediates=c.lse_bytes + c.branch_out,
    )
    return cost, sympy.Integer(0)


MODELS: dict[str, BranchModel] = {
    "compression": BranchModel(
        keys=lambda s: _sum_compression_keys(T, s.compression.block, s.compression.stride),
        cost=_compression_cost,
        decode_tokens=lambda s: n_compressed(T, s.compression.block, s.compression.stride),
    ),
    "selection": BranchModel(
        keys=lambda s: _sum_selection_tokens(T, s.selection.top_k, s.selection.block, _selection_is_exact(s)),
        cost=_selection_cost,
        # the one query of the step sits at position T − 1
        decode_tokens=lambda s: _selection_tokens(T - 1, s.selection.top_k, s.selection.block,
                                                  _selection_is_exact(s)),
    ),
    "window": BranchModel(
        keys=lambda s: _sum_window_keys(T, s.window.size),
        cost=_window_cost,
        decode_tokens=lambda s: Min(s.window.size, T),
    ),
}
# A branch declared in branches.py but not here would be silently left out of every cost: fail at import instead.
assert MODELS.keys() == set(BRANCH_NAMES), "; ".join(
    [f"add a BranchModel (keys, cost, decode_tokens) to MODELS in specgen/compile/analysis.py for {n!r}"
     for n in BRANCH_NAMES if n not in MODELS]
    + [f"MODELS in specgen/compile/analysis.py has {n!r}, which branches.NAMES does not declare"
       for n in MODELS if n not in BRANCH_NAMES])


# ---------------------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def attended_keys(spec: Spec) -> dict[str, sympy.Expr]:
    """Σ over queries t < T of the keys each attention branch attends (per query head; pooled keys for compression)."""
    return {name: MODELS[name].keys(spec) for name in spec.branches}


@functools.lru_cache(maxsize=64)
def analyse(spec: Spec) -> Analysis:
    """Symbolic costs of every branch of `spec` and of dense causal attention. Cached per spec (frozen, hashable)."""
    e = DTYPE_BYTES[spec.dtype]
    hq, hkv = spec.heads.q, spec.heads.kv
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    dkv = dqk if spec.mla else dqk + dv  # K/V row width in memory: with MLA, V is the first dv dims of K
    attn = 2 * hq * (dqk + dv)  # FLOPs per (query, key) pair over all query heads: QK^T and PV
    q_bytes = T * hq * dqk * e
    out_bytes = T * hq * dv * e
    lse_bytes = T * hq * FP32
    # Gated NSA keeps each branch's output for the gate mix (and the gate gradient); DSA's one output is the result.
    branch_out = out_bytes if spec.gated else sympy.Integer(0)

    sel, idx = spec.selection, spec.indexer
    uses_indexer = sel is not None and sel.scorer == "indexer" and "selection" in spec.branches
    costs: list[BranchCost] = []
    naive_extra = sympy.Integer(0)

    if uses_indexer:
        hi, di, ei = idx.heads, idx.head_dim, INDEXER_DTYPE_BYTES[idx.dtype]
        pairs = T * (T + 1) / 2
        indices = T * hkv * sel.top_k * INT32
        costs.append(BranchCost(
            "indexer",
            flops=2 * hkv * hi * (di + 1) * pairs,
            # q_I, k_I and the head weights read once; the indices written.
            bytes=T * hkv * (hi * di * ei + di * ei + hi * e) + indices,
            intermediates=indices,
        ))
        naive_extra += hkv * T * T * FP32  # the T×T index scores per kv group (the TileLang example writes them)

    ctx = CostContext(e=e, hkv=hkv, dkv=dkv, attn=attn, q_bytes=q_bytes, out_bytes=out_bytes, lse_bytes=lse_bytes,
                      branch_out=branch_out, uses_indexer=uses_indexer, keys=attended_keys(spec))
    for name in spec.branches:
        cost, naive = MODELS[name].cost(spec, ctx)
        costs.append(cost)
        naive_extra += naive

    dense = BranchCost(
        "dense",
        flops=attn * T * (T + 1) / 2,
        bytes=q_bytes + T * hkv * dkv * e + out_bytes + lse_bytes,
        intermediates=lse_bytes,
    )
    kernel_intermediates = sum((c.intermediates for c in costs), sympy.Integer(0))
    return Analysis(
        spec=spec,
        branches=tuple(costs),
        dense=dense,
        naive_intermediates=kernel_intermediates + naive_extra,
        constraints=constraints(spec),
        overlap=overlap_weights(spec),
        decode=_decode_exprs(spec),
    )


def _decode_exprs(spec: Spec) -> tuple[tuple[str, sympy.Expr], ...]:
    """KV-cache bytes read by one decode step: one query at position T − 1 of a context of T tokens (the new token's
    K/V, completed blocks and index key are appended before the step, docs/semantics.md "Decoding"). The
    compression branch's pooled keys also serve the selection scorer, so they are counted once, under compression."""
    e = DTYPE_BYTES[spec.dtype]
    hkv = spec.heads.kv
    row = hkv * (spec.head_dim.qk if spec.mla else spec.head_dim.qk + spec.head_dim.v) * e
    sel, idx = spec.selection, spec.indexer
    out = []
    if sel is not None and sel.scorer == "indexer" and "selection" in spec.branches:
        out.append(("indexer", T * hkv * idx.head_dim * INDEXER_DTYPE_BYTES[idx.dtype]))
    out += [(name, MODELS[name].decode_tokens(spec) * row) for name in spec.branches]
    out.append(("dense", T * row))
    return tuple(out)


def constraints(spec: Spec) -> tuple[str, ...]:
    """The rules spec.py enforces, stated with this spec's numbers (all hold: the spec validated)."""
    h, hd = spec.heads, spec.head_dim
    out = [
        f"query heads divide into kv groups: {h.q} % {h.kv} == 0 ({h.group_size} query heads per kv head)",
        f"head dims are multiples of 16 in [16, 1024], split into powers of two: qk {hd.qk} = "
        f"{' + '.join(map(str, head_dim_parts(hd.qk)))}, v {hd.v} = {' + '.join(map(str, head_dim_parts(hd.v)))}",
        "causal attention only (visibility, candidates and forced blocks are defined causally)",
    ]
    if spec.mla:
        out.append(f"mla: V is the first {hd.v} of K's {hd.qk} dims (v ≤ qk), one latent K/V shared (kv=1, shared)")
    cmp_, sel, win, idx = spec.compression, spec.selection, spec.window, spec.indexer
    if cmp_ is not None:
        out.append(f"compression block l={cmp_.block} and stride d={cmp_.stride} are powers of two, "
                   f"d | l ({cmp_.block} % {cmp_.stride} == 0)")
    if sel is not None:
        if sel.granularity == "block":
            n_blocks = -(-spec.max_seqlen // sel.block)
            if sel.scorer == "compression":
                out.append(f"d | l' ({sel.block} % {cmp_.stride} == 0): block scores are spread over d-token chunks")
            out.append(f"selection block l'={sel.block} is a power of two")
            out.append(f"top_k={sel.top_k} ≤ {n_blocks} blocks of {sel.block} in max_seqlen={spec.max_seqlen}")
            out.append(f"forced blocks fit in top_k: initial {sel.initial} + local {sel.local} ≤ {sel.top_k}")
        else:
            out.append(f"token granularity: l' = 1, no forced blocks, top_k={sel.top_k} ≤ max_seqlen="
                       f"{spec.max_seqlen}, scored by the indexer (compression scores only tie-break within a chunk)")
    if idx is not None:
        out.append(f"indexer head dim {idx.head_dim} is a power of two ≥ 16; {idx.heads} indexer heads per kv group")
    if win is not None:
        out.append(f"window w={win.size} ≥ 1")
    if spec.family == "dsa":
        out.append("dsa is the indexer-scored selection branch alone")
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------

def evaluate(expr, T_value: int) -> float:
    """The value of a symbolic cost at T = T_value (exact integer arithmetic, then a float)."""
    return float(sympy.sympify(expr).subs(T, int(T_value)))


# The backward of an attention branch does five matrix products per (query, key) pair where the forward does two
# (S recomputed, dV, dP, dQ, dK): FlashAttention's convention counts it as 2.5x the forward's FLOPs.
BACKWARD_FLOP_FACTOR = 2.5


def flops(spec: Spec, T_value: int, pass_: str = "forward") -> float:
    """Total FLOPs at sequence length T_value: the forward over all branches (the indexer included), or the
    backward (2.5x each attention branch's forward; the indexer's selection is not differentiated)."""
    branches = analyse(spec).branches
    if pass_ == "forward":
        return sum(evaluate(b.flops, T_value) for b in branches)
    if pass_ == "backward":
        return BACKWARD_FLOP_FACTOR * sum(evaluate(b.flops, T_value) for b in branches if b.name != "indexer")
    raise ValueError(f"pass_ must be 'forward' or 'backward', not {pass_!r}")


def forward_bytes(spec: Spec, T_value: int) -> float:
    """HBM bytes the forward moves (every branch, the indexer included) at T_value: the achieved-bandwidth model."""
    return sum(evaluate(b.bytes, T_value) for b in analyse(spec).branches)


def backward_bytes(spec: Spec, T_value: int) -> float:
    """HBM bytes of the backward, as a lower bound: each attention branch's inputs read twice (by its dQ kernel
    and by its dK/dV kernel, the selection's gather included), plus dO read and the gradients (fp32) written."""
    a = analyse(spec)
    e = DTYPE_BYTES[spec.dtype]
    hq, hkv, dqk, dv = spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v
    dkv = dqk if spec.mla else dqk + dv
    reads = 2 * sum(evaluate(b.bytes, T_value) for b in a.branches if b.name != "indexer")
    grads = T_value * (hq * dv * e + hq * dqk * FP32 + hkv * dkv * FP32)
    return reads + grads


def dense_flops(spec: Spec, T_value: int) -> float:
    return evaluate(analyse(spec).dense.flops, T_value)


def promised_speedup(spec: Spec, T_value: int) -> float:
    """Dense causal forward FLOPs over the sparse forward FLOPs: the speedup the sparsity allows if FLOPs bind."""
    return dense_flops(spec, T_value) / flops(spec, T_value)


def decode_bytes(spec: Spec, context: int) -> dict[str, float]:
    """KV bytes one decode step reads (batch 1, one query, `context` tokens cached), per branch and "dense"."""
    return {name: evaluate(expr, context) for name, expr in analyse(spec).decode}


def decode_ratio(spec: Spec, context: int) -> float:
    """Dense KV bytes per decode step over the sparse branches' total: the bound on a bandwidth-bound decode's
    speedup (NSA's memory-access ratio; ≈ 11.6 for the paper configuration at 64k)."""
    b = decode_bytes(spec, context)
    dense = b.pop("dense")
    return dense / sum(b.values())


def large_T(expr) -> sympy.Expr:
    """Leading-order form for T beyond every block size: each Min/Max resolved as it is for large T, floors and
    ceilings dropped. Off from the exact value by O(T) terms at most."""
    big = 10 ** 12

    def resolve(node, choose):
        return choose(node.args, key=lambda a: a.subs(T, big))

    expr = sympy.sympify(expr)
    expr = expr.replace(lambda x: isinstance(x, Max), lambda x: resolve(x, max))
    expr = expr.replace(lambda x: isinstance(x, Min), lambda x: resolve(x, min))
    expr = expr.replace(lambda x: isinstance(x, (floor, ceiling)), lambda x: x.args[0])
    # Mod(T − 1, l') averages (l' − 1)/2 over queries but is exactly that only in sums; in the per-step decode
    # count it is the worst case that matters, so Mod is left alone.
    return sympy.expand(expr)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

def _num(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _gib(x: float) -> str:
    for scale, prefix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.0f} B"


def _short(expr, limit: int = 110) -> str:
    """The large-T form with 4-digit coefficients; readable where the exact closed form is not."""
    text = str(sympy.N(large_T(expr), 4)).replace("**", "^")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain(spec: Spec, T_value: int | None = None) -> str:
    """A human-readable report of `spec`'s costs at T_value (default spec.max_seqlen), for `specgen explain`."""
    n = int(T_value or spec.max_seqlen)
    a = analyse(spec)
    hd = spec.head_dim
    lines = [f"spec {spec.name} (hash {spec.hash}), family {spec.family}, {spec.dtype}, "
             f"{spec.heads.q} q heads / {spec.heads.kv} kv heads, branches: "
             f"{', '.join(b.name for b in a.branches)}",
             f"softmax scale {spec.scale_text}, mla {'yes' if spec.mla else 'no'}, dtype {spec.dtype}",
             f"forward pass, batch 1, T = {n}; FLOPs count 2 per multiply-add (QK^T, PV, pooling); "
             "symbolic forms are for large T (floors dropped)", ""]

    lines.append("head dims")
    dims = [("qk", hd.qk), ("v", hd.v)] + ([("indexer", spec.indexer.head_dim)] if spec.indexer else [])
    for label, d in dims:
        padded, waste = padding_waste(d)
        parts = " + ".join(map(str, head_dim_parts(d)))
        tail = "a power of two" if padded == d else f"padding to {padded} would waste {waste:.0%} of each dot"
        lines.append(f"  {label:8s} {d} = {parts} ({tail})")

    if a.overlap:
        c, s = spec.compression, spec.selection
        lines += ["", f"compression → selection scores (l={c.block}, d={c.stride}, l'={s.block})",
                  f"  weights of the compression blocks touching one selection block: {list(a.overlap)}",
                  f"  {OVERLAP_FORMULA}"]

    lines += ["", "per branch (forward)"]
    total_f = total_b = 0.0
    for b in a.branches:
        f_, by, im = (evaluate(x, n) for x in (b.flops, b.bytes, b.intermediates))
        total_f += f_
        total_b += by
        lines.append(f"  {b.name}")
        lines.append(f"    FLOPs         {_num(f_, 'FLOP'):>12s}   ≈ {_short(b.flops)}")
        lines.append(f"    HBM bytes     {_num(by, 'B'):>12s}   ≈ {_short(b.bytes)}   ({f_ / by:.0f} FLOP/B)")
        lines.append(f"    intermediates {_gib(im):>12s}   ≈ {_short(b.intermediates)}")
    if "selection" in spec.branches:
        lines.append("  selection bytes: every (query, kv group) gathers its own K/V rows — the no-reuse worst case")
        if not _selection_is_exact(spec):
            lines.append("  selection with local = 0: the query's own block may go unselected, so its count is the "
                         "upper bound min(t+1, top_k·l')")

    df, db = evaluate(a.dense.flops, n), evaluate(a.dense.bytes, n)
    lines += ["", "dense causal baseline",
              f"  FLOPs {_num(df, 'FLOP')} ≈ {_short(a.dense.flops)};  HBM bytes {_num(db, 'B')}",
              "", "totals",
              f"  sparse FLOPs {_num(total_f, 'FLOP')}, HBM bytes {_num(total_b, 'B')}",
              f"  promised forward speedup (dense / sparse FLOPs): {df / total_f:.2f}x",
              f"  keys per query on average: sparse "
              f"{sum(evaluate(x, n) for x in attended_keys(spec).values()) / n:.0f} "
              f"({' + '.join(f'{k} {evaluate(x, n) / n:.0f}' for k, x in attended_keys(spec).items())}), "
              f"dense {(n + 1) / 2:.0f}"]

    dec = decode_bytes(spec, n)
    dense_dec = dec.pop("dense")
    lines += ["", f"decode step (one query, context {n}): KV bytes read",
              "  " + ", ".join(f"{k} {_num(v, 'B')}" for k, v in dec.items()) + f"; dense {_num(dense_dec, 'B')}",
              f"  memory-access ratio dense / sparse: {dense_dec / sum(dec.values()):.2f}x"]

    kern, naive = (evaluate(x, n) for x in
                   (sum((b.intermediates for b in a.branches), sympy.Integer(0)), a.naive_intermediates))
    lines += ["", "intermediates in HBM",
              f"  generated kernels: {_gib(kern)} (pooled K/V, lse per branch, indices, per-branch outputs)",
              f"  naive: {_gib(naive)} (the same plus materialised scores: "
              + ", ".join(x for x in ("[T,Hq,Nc] compression probabilities" if spec.needs_compressed_kv else "",
                                      "[T,Hkv,T/l'] block scores" if a.overlap else "",
                                      "[Hkv,T,T] index scores" if "indexer" in [b.name for b in a.branches]
                                      else "") if x) + ")"]

    lines += ["", "constraints"] + [f"  - {c}" for c in a.constraints]
    return "\n".join(lines)


def decode_step_bytes(spec: Spec, context: int, batch: int = 1, q_len: int = 1, decode=None) -> dict[str, float]:
    """Bytes one decode step must read from the cache: `batch` sequences of `context` tokens, `q_len` new queries
    each. Per branch (the floor: each cached byte a step needs, read once), "floor" their sum, "dense" a dense
    decode of one K/V set, and "implementation" what the generated step moves: the floor, the selection branch
    once per new query (each query has its own blocks), and for the compression scorer "scores": what its
    selection inputs cost, written once and read once (fp32). `decode` (a DecodePlan or the module's
    DecodeDescriptor: scoring, split_tiles, overlap_chunks, overlap_spill) picks the path: "partials" writes, per
    row (sequence, new query, head) and tile of T pooled keys, T / (l'/d) + spill block sums and one max;
    "logits" (also without `decode`) every logit, B x q_len x Hq x NC, and the group probabilities
    (docs/decode.md has the arithmetic)."""
    per = decode_bytes(spec, context)
    dense = per.pop("dense")
    out = {name: value * batch for name, value in per.items()}
    floor = sum(out.values())
    impl = floor
    if "selection" in out:
        impl += out["selection"] * (q_len - 1)
    if spec.selection is not None and spec.selection.scorer == "compression":
        cmp_ = spec.compression
        n_cmp = max(0, (context - cmp_.block) // cmp_.stride + 1)
        rows = batch * q_len * spec.heads.q
        if decode is not None and decode.scoring == "partials":
            tile = decode.split_tiles["compression"]
            per_row = -(-n_cmp // tile) * (tile // decode.overlap_chunks + decode.overlap_spill + 1)
            extra = 0
        else:
            # and the group probabilities P [B, q_len, Hkv, NC] between the two selection kernels
            per_row, extra = n_cmp, 2 * batch * q_len * spec.heads.kv * n_cmp * 4
        out["scores"] = 2 * rows * per_row * 4 + extra
        impl += out["scores"]
    out.update(floor=floor, implementation=impl, dense=dense * batch)
    return out
