"""The selected-block attention's loop order per pass (docs/selection_order.md), decided from a bytes model.

Below the plan and the tuning tables: the plan records the decision and the kv-order tiles, tuning leaves the
block-outer kernels out of the tunable ones.
"""

from __future__ import annotations

from .analysis import head_dim_parts
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


# The block-outer selection forward's fp32 output tile (rows x d_v) that one warpgroup (4 warps) holds: 64 x 256. At
# 8 warps Triton 3.6 lays the 64-row S = Q K^T tile over both warpgroups and computes it twice (bench/kernel_audit.py's
# `rep` 2); one warpgroup holds Gemma-2's [64, 256] output at 238 registers, no spills (sm_90). H100, commit dc0b177,
# T = 65536 (docs/forward.md, "The variants timed"): Gemma-2-9B heads' block-outer kernel 14.84 -> 10.11 ms, the
# forward 35.57 -> 30.93 ms, the same output bit for bit (variant sel_w8 renders two warpgroups).
FORWARD_ONE_WARPGROUP = 64 * 256


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
        out_tile = bq * gp * spec.head_dim.v
        # SPLIT queries per backward work item: up to 256 (several trips of 64 rows reuse the K/V tile and the
        # dK/dV registers), while a block that every query selects still spreads over T / SPLIT programs; short
        # contexts (max_seqlen) have few queries per block and get proportionally shorter items.
        # The block-outer forward on one warpgroup up to a [64, 256] fp32 output tile (FORWARD_ONE_WARPGROUP), two
        # above it and for wide heads.
        kw.update(sel_kv_bq=bq, sel_kv_gp=gp, sel_kv_block_n=max(MIN_DOT, next_pow2(sel.block)),
                  sel_kv_warps=8 if wide or out_tile > FORWARD_ONE_WARPGROUP else 4, sel_kv_merge_rows=32,
                  sel_kv_split=max(bq, min(256, spec.max_seqlen // 64)))
        if forward == "kv" and (sel.initial or sel.local):
            # The forced blocks (the initial and local ones, which the scorer always selects) leave the work list
            # and the merge attends them per query tile (_selection_kv_forced_merge_kernel; docs/selection_order.md,
            # "Forced blocks") for a selection the forward's scorer made in batched calls (given indices, packed and
            # chunked-prefill calls run the plain merge). H100, commit dc0b177, T = 65536 (docs/forward.md):
            # Llama-3-8B heads' forward 27.50 -> 27.01 ms (block-outer kernel 8.60 -> 7.20, merge 3.53 -> 4.30),
            # Qwen2.5-7B heads' 25.21 -> 24.76; variant sel_unforced renders the plain merge. On 4 warps, 8 from a
            # [64, 256] output tile on (Gemma-2's spills 680 B at 4, sm_90) and for wide heads.
            kw.update(sel_kv_forced=True, sel_kv_forced_warps=8 if wide or out_tile >= FORWARD_ONE_WARPGROUP else 4)
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
# the useful FLOPs for scattered selections. Measured on the H100 (commit c663314, bench/dsa_bwd.py): V3.2 (76) 136.5
# ms against the inverse index's 851 at 16k; dsa_gqa16_4 (5: a group of 4, rows padded to 16) 22.0 against 50.8 ms
# at 16k and 128.4 against 309.7 at 64k. The L2 adds fp32 at ~3.5 TB/s (21.9 ms for V3.2's 77 GB at 16k), an order
# above the first estimate (a few hundred GB/s, which had set this at 64), so the threshold sits under the lowest
# intensity measured to win: groups of 4 and up at d_qk = d_v (5), not groups of 1 or 2 (1.25, 2.5: unmeasured).
# nsa_token's group of 16 (21) takes it too.
SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE = 4


# Head dims per chunk of the scatter kernel's dK/dV products (one chunk's fp32 [keys, dims] sum live at a time).
SCATTER_DIM = 128


def scatter_chunk_sizes(d: int) -> list[int]:
    """The sizes of the scatter kernel's head-dim chunks of a d-dim head: its power-of-two parts cut to SCATTER_DIM."""
    return [min(SCATTER_DIM, p - o) for p in head_dim_parts(d) for o in range(0, p, SCATTER_DIM)]


def scatter_applies(spec: Spec) -> bool:
    """Whether the scatter kernel can take the spec: with MLA it reuses K's gathered chunks as V, so V's chunks must
    be K's first ones (V3.2: 576 = 4 x 128 + 64 and 512 = 4 x 128); without MLA, always."""
    if not spec.mla:
        return True
    qk, v = scatter_chunk_sizes(spec.head_dim.qk), scatter_chunk_sizes(spec.head_dim.v)
    return qk[:len(v)] == v


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
    kernels stay for deterministic runs): token granularity and enough matrix work per atomic byte
    (SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE) where the kernel applies (scatter_applies: MLA's V chunks are K's first);
    a group under the matrix unit's rows is padded (scatter_rows)."""
    return scatter_applies(spec) and scatter_intensity(spec) >= SCATTER_MIN_FLOPS_PER_ATOMIC_BYTE
