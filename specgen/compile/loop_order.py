"""The selected-block attention's loop order per pass (docs/selection_order.md), decided from a bytes model.

Below the plan and the tuning tables: the plan records the decision and the kv-order tiles, tuning leaves the
block-outer kernels out of the tunable ones.
"""

from __future__ import annotations

from .footprint import MIN_DOT, next_pow2
from ..model.spec import KV_ORDER_MIN_BLOCK, Spec


# Gathered (query-order) K/V reads hit L2 for the blocks neighbouring queries share (the initial and local ones, and
# near-ties): the effective cost per modelled byte, relative to a streamed byte. Calibrated on the H100 (docs/
# selection_order.md): measured query-order selection time / (modelled gather bytes / copy rate).
GATHER_COST = 0.45


def selection_bytes(spec: Spec, group: int, bq: int, gp: int) -> dict:
    """HBM bytes per (query, kv group, selected unit) of the selected-block attention forward, in each loop order.

    query: each (query, kv group) gathers its units' K/V (and reads its q once, written output once: small).
    kv: each tile of `bq` queries reads the unit's K/V once; every (query, head) reads q, writes a partial output
    and log-sum-exp per unit, and the merge reads them back."""
    elem = 4 if spec.dtype == "fp32" else 2
    unit = spec.selection.block
    kv_row = spec.head_dim.qk + (0 if spec.mla else spec.head_dim.v)
    query = unit * kv_row * elem * GATHER_COST
    kv = unit * kv_row * elem / bq + group * (spec.head_dim.qk * elem + 2 * (spec.head_dim.v * elem + 4))
    return {"query": query, "kv": kv}


def selection_orders(spec: Spec, g: int, gp: int) -> dict:
    """The selected-block attention's loop order per pass: the spec's (`selection.loop_order`), or (auto) for the
    forward the one that moves fewer bytes, and for the backward the block-outer one wherever it applies: its work
    items bound the queries one program walks (query-outer dK/dV walks every query that chose a block in one
    program, all T of them for the first block), and it computes dQ from the same P and dS."""
    sel = spec.selection
    if sel.granularity != "block" or sel.block < KV_ORDER_MIN_BLOCK:
        return {"selection_order": "query", "selection_bwd_order": "query"}
    # kv-order tiles: 64 rows (queries x padded heads) for up to 64 heads.
    bq = max(1, 64 // gp)
    model = selection_bytes(spec, g, bq, gp)
    order = sel.loop_order
    forward = order if order != "auto" else ("kv" if gp <= 64 and model["kv"] < model["query"] else "query")
    backward = order if order != "auto" else ("kv" if gp <= 64 else "query")
    kw = {"selection_order": forward, "selection_bwd_order": backward, "sel_kv_bytes": model}
    if "kv" in (forward, backward):
        wide = spec.head_dim.qk + spec.head_dim.v > 512
        # SPLIT queries per backward work item: up to 256 (several trips of 64 rows reuse the K/V tile and the
        # dK/dV registers), while a block that every query selects still spreads over T / SPLIT programs; short
        # contexts (max_seqlen) have few queries per block and get proportionally shorter items.
        kw.update(sel_kv_bq=bq, sel_kv_gp=gp, sel_kv_block_n=max(MIN_DOT, next_pow2(sel.block)),
                  sel_kv_warps=8 if wide or bq * gp * spec.head_dim.v >= 16384 else 4, sel_kv_merge_rows=32,
                  sel_kv_split=max(bq, min(256, spec.max_seqlen // 64)))
    return kw


def orders(spec: Spec) -> tuple[str, str]:
    """(forward, backward) loop order of the spec's selection branch ("query" without one)."""
    if spec.selection is None:
        return "query", "query"
    g = spec.heads.group_size
    kw = selection_orders(spec, g, next_pow2(g))
    return kw["selection_order"], kw["selection_bwd_order"]



# The selection backward's scatter path (docs/backward.md). Head rows of one scatter program: the program keeps
# the fp32 dQ of its rows in registers, and at 32 rows x 576 dims (V3.2) it compiles for sm_90 at 255 registers with
# 48 spill bytes and 110592 B of shared memory (8 warps, 32 keys, 1 stage); at 64 rows Triton 3.6 stages Q and dO in
# two layouts each and needs 249856 B (over the H100's 232448) with 1160 spill bytes.
SCATTER_ROWS = 32
# FLOPs of the scatter kernel's matrix products per byte of its fp32 atomic adds into dK/dV, at and above which the
# plan chooses it. Per selected (query, kv head, key) the kernel does 2·G·(3·Dqk + 2·Dv) FLOPs (S, dP, dQ, dK, dV
# over the group's G heads) and each of the group's ceil(G / rows) programs adds 4·(Dqk + Dv) bytes (4·Dqk with MLA,
# where dV lands in dK's first Dv dims in the same add). The deterministic inverse-index path it replaces does the
# same products for every query that selected any key of a 32-key tile, so at token granularity it pays up to 32x
# the useful FLOPs for scattered selections (V3.2 at 16k on the H100: 851 ms, ~26 TFLOP/s); the scatter path pays
# the atomics instead, which stay below the inverse-index path's wasted products while there are >= 64 FLOPs per
# atomic byte (an estimate from the H100's L2 reduction rate, a few hundred GB/s for scalar fp32 atomics, against
# the wasted products; to be calibrated with bench/dsa_bwd_gpu.sh). V3.2: 76; nsa_token's group of 16: 21;
# dsa_small's group of 4: 5 (both keep the deterministic path).
SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE = 64


def scatter_rows(spec: Spec) -> int:
    """Head rows of a scatter program: the group's heads, padded to the dot minimum, at most SCATTER_ROWS."""
    return min(max(MIN_DOT, next_pow2(spec.heads.group_size)), SCATTER_ROWS)


def scatter_intensity(spec: Spec) -> float:
    """FLOPs per byte of fp32 atomic adds of the scatter backward (0 without token selection)."""
    sel = spec.selection
    if sel is None or sel.granularity != "token":
        return 0.0
    dqk, dv, g = spec.head_dim.qk, spec.head_dim.v, spec.heads.group_size
    chunks = -(-g // scatter_rows(spec))
    return 2 * g * (3 * dqk + 2 * dv) / (4 * chunks * (dqk + (0 if spec.mla else dv)))


def scatter_backward(spec: Spec) -> bool:
    """Whether the selection backward takes the query-outer scatter path (dK/dV by fp32 atomics; the inverse-index
    kernels stay for deterministic runs): token granularity, a group that fills the matrix unit's rows, and
    enough matrix work per atomic byte (SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE)."""
    return (spec.heads.group_size >= MIN_DOT
            and scatter_intensity(spec) >= SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE)
