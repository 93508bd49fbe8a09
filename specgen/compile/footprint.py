"""Static shared-memory footprints of the kernels and the GPU limits they must fit: the model the plan
(specgen.compile.plan) chooses its tiles with. This module sits below the plan: it knows tiles and specs, never a
plan's choices (`backward_footprints` reads a plan's backward tiles without importing the plan).

Model (per program, bytes): Triton stages the operands of `tl.dot` through shared memory. An operand loaded
before a loop (resident) takes one buffer; one loaded inside a pipelined loop takes `num_stages` buffers (gathered
loads, whose addresses come from an index loaded in the same trip, take `num_stages - 1`, plus `num_stages` copies
of the index tile); an operand computed in registers (P, dS cast to the value dtype) takes one buffer (counted
conservatively: on Hopper wgmma can read it from registers); plus 1 KiB of scratch (reductions, barriers).
Calibrated on Triton 3.6 / H100 with the pre-chunking DeepSeek-V3.2 distillation kernels: the dense forward
(q [128, 576] + q_I [64, 128] resident, k [64, 576] + k_I [64, 128] streamed, 3 stages) gives 435200 bytes and the
sparse one (the same tiles, gathered) 345856 bytes, the two figures the compiler reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .branches import BY_NAME
from ..model.spec import Spec


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


# tl.dot needs every dimension >= 16 on the GPU; rows of a tile are padded up to this.
MIN_DOT = 16
# Shared memory of one SM on an H100 (228 KiB), which the programs resident on it share, and what the driver reserves
# of it for each program (1 KiB): `programs_per_sm`. Registers: 65536 an SM, at most 255 a thread.
SM_SMEM = 233472
SMEM_RESERVED = 1024
# Shared memory one block may opt in to on an H100 (227 KiB: the SM's less the driver's reserve); kernels stay under
# SMEM_BUDGET (a margin for what the footprint model does not see: layout conversions, extra scratch).
SMEM_LIMIT = SM_SMEM - SMEM_RESERVED
SMEM_BUDGET = int(SMEM_LIMIT * 0.85)
SM_REGISTERS = 65536
MAX_THREAD_REGISTERS = 255

SCRATCH = 1024
TRITON_DEFAULT_STAGES = 3

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8_e4m3": 1}


def tile(rows: int, cols: int, elem: int) -> int:
    return rows * cols * elem


def smem_bytes(*, resident=(), streamed=(), gathered=(), computed=(), index=(), stages: int | None = None) -> int:
    """Shared memory of one program under the model above (sizes in bytes)."""
    n = stages or TRITON_DEFAULT_STAGES
    gathered_buffers = sympy.Max(1, n - 1) if isinstance(n, sympy.Basic) else max(1, n - 1)
    return (sum(resident) + n * sum(streamed) + gathered_buffers * sum(gathered) + n * sum(index) + sum(computed)
            + SCRATCH)


def _elem(spec: Spec) -> int:
    return DTYPE_BYTES[spec.dtype]


def dq_smem(spec: Spec, rows: int, block_n: int, stages: int, gathered: bool = False) -> int:
    e, dqk, dv = _elem(spec), spec.head_dim.qk, spec.head_dim.v
    kv = [tile(block_n, dqk, e), tile(block_n, dv, e)]
    return smem_bytes(resident=[tile(rows, dqk, e), tile(rows, dv, e)],
                      streamed=[] if gathered else kv, gathered=kv if gathered else [],
                      index=[tile(block_n, 1, 4)] if gathered else [],
                      computed=[tile(rows, block_n, e)], stages=stages)


def dkdv_smem(spec: Spec, rows: int, block_n: int, stages: int) -> int:
    # Query rows are gathered through the inverse index in the selection kernel: counted as plain streamed loads
    # (the conservative side).
    e, dqk, dv = _elem(spec), spec.head_dim.qk, spec.head_dim.v
    return smem_bytes(resident=[tile(block_n, dqk, e), tile(block_n, dv, e)],
                      streamed=[tile(rows, dqk, e), tile(rows, dv, e)],
                      computed=[tile(block_n, rows, e), tile(block_n, rows, e)], stages=stages)


def scatter_smem(spec: Spec, rows, keys, stages):
    """The selection backward's scatter kernel (kernels/backward_scatter.j2): resident Q and dO rows, the gathered
    K (and V, but MLA's V is K's first d_v dims) counted twice (it is the second operand of S = Q K^T and of
    dQ = dS K, which the compiler may stage in two layouts: it did at 64 keys), the index, P and dS. Compiled for
    sm_90 (Triton 3.6, 8 warps, 1 stage), V3.2 at 32 rows: 90112 / 110592 / 221184 bytes at 16 / 32 / 64 keys;
    the model gives 91200 + 18432 / 111744 + 36864 / 226560."""
    e, dqk, dv = _elem(spec), spec.head_dim.qk, spec.head_dim.v
    kv = [tile(keys, dqk, e)] + ([] if spec.mla else [tile(keys, dv, e)])
    return smem_bytes(resident=[tile(rows, dqk, e), tile(rows, dv, e)], gathered=kv + kv,
                      index=[tile(keys, 1, 4)], computed=[tile(rows, keys, e), tile(rows, keys, e)], stages=stages)


def scatter_once_smem(spec: Spec, rows, keys, part: int = 128):
    """The scatter path's split-form dK/dV kernel (`_selection_bwd_scatter_dkdv_kernel`, kernels/backward_scatter.j2):
    one stage; the gathered K tile (and V, but MLA's V is K's first d_v dims) stays through the trip, the program's
    rows (all the group's heads) come one head-dim part of Q or dO at a time (`part` dims), plus the index. Compiled
    for sm_90 (Triton 3.6, 8 warps), V3.2 (128 rows): 98304 / 163840 bytes at 64 / 128 keys; the model gives
    107776 / 181760 (the K tile's last part, which S alone reads, counted through the trip)."""
    e, dqk, dv = _elem(spec), spec.head_dim.qk, spec.head_dim.v
    kv = [tile(keys, dqk, e)] + ([] if spec.mla else [tile(keys, dv, e)])
    return smem_bytes(resident=[tile(rows, part, e)], gathered=kv, index=[tile(keys, 1, 4)], stages=1)


def attention_smem(spec: Spec, rows, keys, stages, gathered: bool):
    """A forward attention program: resident Q rows, K (and V, but MLA's gathered V is K's first d_v dims, reused
    in registers) streamed or, for the selection, gathered through an index, and P. Numbers or sympy symbols."""
    e, dqk, dv = _elem(spec), spec.head_dim.qk, spec.head_dim.v
    kv = [tile(keys, dqk, e)] + ([] if gathered and spec.mla else [tile(keys, dv, e)])
    return smem_bytes(resident=[tile(rows, dqk, e)], streamed=[] if gathered else kv,
                      gathered=kv if gathered else [], index=[tile(keys, 1, 4)] if gathered else [],
                      computed=[tile(rows, keys, e)], stages=stages)


def score_smem(spec: Spec, rows: int, keys: int, stages: int, blocks: int = 0) -> int:
    """The compression scorer's block-scoring kernel (`_select_blocks_kernel`, kernels/select.j2): the tile's
    [rows, d_qk] queries resident, [keys, d_qk] pooled-key tiles streamed over `stages`. The overlap-product form
    ("dot", `blocks` selection blocks a trip) also stages its products' fp32 operands: the probabilities [rows,
    keys] and the two overlap matrices [keys, blocks]. sm_90 compile (Triton 3.6, bench/compile_offline.py
    --aligned), 3 / 2 stages, against the model: Gemma-2's tile (64 rows, 64 pooled keys, d 256, bf16, 4 warps)
    133120 / 100352 B (model 132096 / 99328); Llama-3's (64 rows, d 128) 66560 / 50176 (the same); nsa_paper's (256
    rows, d 192, 8 warps) 173056 / 148480 (the same); nsa_config_a's and nsa_mqa's (256 rows, d 128, 8 warps)
    118784 / 102400 (model 115712 / 99328: the head sums' layout scratch is not modelled)."""
    e, dqk = _elem(spec), spec.head_dim.qk
    extra = [tile(rows, keys, 4), 2 * tile(keys, blocks, 4)] if blocks else []
    return smem_bytes(resident=[tile(rows, dqk, e)], streamed=[tile(keys, dqk, e)], computed=extra, stages=stages)


def programs_per_sm(smem: int) -> int:
    """Programs of `smem` bytes of shared memory each that one SM holds at once (SM_SMEM, SMEM_RESERVED a program):
    the bound shared memory puts on occupancy (registers and warps bound it too: `registers_allow`)."""
    return SM_SMEM // (smem + SMEM_RESERVED)


def registers_allow(programs: int, warps: int) -> bool:
    """Whether `programs` programs of `warps` warps fit one SM's registers whatever registers a thread takes (at most
    MAX_THREAD_REGISTERS): two 4-warp programs always do, two 8-warp ones only below 128 registers a thread."""
    return programs * warps * 32 * MAX_THREAD_REGISTERS <= SM_REGISTERS


def distill_qreg_smem(spec: Spec, rows: int, idx_rows: int, keys: int, stages: int, smem_dims: int) -> int:
    """The dense distillation forward's register-operand forms (`_distill_fwd_dense_qreg_kernel`): Q's pieces
    in registers take no shared memory, those kept there (`smem_dims` of Q's dims) and q_I [idx_rows, d_I] are
    resident, the contiguous key tile [keys, d_qk] and k_I [keys, d_I] are streamed over `stages`. sm_90 compile of
    V3.2's (128 rows, 64 indexer rows, 128 of Q's 576 dims in shared memory): 231424 B at 64 keys and 2 stages,
    185344 B at 32 keys and 3 stages; the model gives 230400 and 185344."""
    e, dqk, di = _elem(spec), spec.head_dim.qk, spec.indexer.head_dim
    return smem_bytes(resident=[tile(rows, smem_dims, e), tile(idx_rows, di, e)],
                      streamed=[tile(keys, dqk, e), tile(keys, di, e)], stages=stages)


def distill_mha_smem(spec: Spec, rows: int, keys: int, stages: int, idx_rows: int = 0, idx_keys: int = 0,
                     idx_stages: int = 0) -> dict[str, int]:
    """The unabsorbed dense stage's kernels (kernels/distill.j2, `distill_mha_kernels`), by kernel. Forward and dI
    pass: the head loop streams Q_h [rows, unabsorbed.qk] and K_h [keys, unabsorbed.qk] over `stages`, the
    indexer-head loop q_I,j [rows, d_I] beside the trip's k_I [keys, d_I]; Triton 3.6 reuses one loop's buffers for
    the other, so the larger loop counts. sm_90 compile of V3.2's (128 rows, 64 keys, 192 dims, bf16): 147968 B at
    2 stages and 222208 at 3; the model gives 148480 and 222208. The backward's index-only kernels (`idx_rows` =
    positions x indexer heads, `idx_keys` keys, `idx_stages`): the query side streams k_I with q_I resident, the
    key side the reverse, each with its [rows, keys] coefficients as an operand; compiled (64 rows, 64 keys, 3
    stages): 66048 and 74240 B, the model 74752 both."""
    e, d, di = _elem(spec), spec.unabsorbed.qk, spec.indexer.head_dim
    heads = smem_bytes(streamed=[tile(rows, d, e), tile(keys, d, e)], stages=stages)
    index = smem_bytes(resident=[tile(keys, di, e)], streamed=[tile(rows, di, e)], stages=stages)
    out = {"_distill_fwd_dense_mha_kernel": max(heads, index), "_distill_di_dense_mha_kernel": max(heads, index)}
    if idx_rows:
        one_side = smem_bytes(resident=[tile(idx_rows, di, e)], streamed=[tile(idx_keys, di, e)],
                              computed=[tile(idx_rows, idx_keys, e)], stages=idx_stages)
        out.update({"_distill_dq_dense_mha_kernel": one_side, "_distill_dk_dense_mha_kernel": one_side})
    return out


def index_scores_smem(spec: Spec, key_major: bool, rows: int, keys: int, stages: int) -> int:
    """The prefill index-score kernel (`_index_scores_kernel`, kernels/topk.j2). Key-major: the [keys, d_I] key
    tile resident, one query's [rows, d_I] indexer heads (padded) streamed by the loop over the program's queries.
    Query-major: the [rows, d_I] tile of its queries x heads resident, [keys, d_I] key tiles (index_bs) streamed.
    One byte an element with an fp8 indexer, else the spec's dtype. sm_90 compile of V3.2's key-major tile (128
    keys, 64 heads, fp8, 2 stages): 24 KiB; the model gives 33 KiB (the conservative side)."""
    e = DTYPE_BYTES["fp8_e4m3"] if spec.indexer.dtype == "fp8_e4m3" else _elem(spec)
    d = spec.indexer.head_dim
    resident, streamed = (keys, rows) if key_major else (rows, keys)
    return smem_bytes(resident=[tile(resident, d, e)], streamed=[tile(streamed, d, e)], stages=stages)


def index_scores_stages(spec: Spec, key_major: bool, rows: int, keys: int, most: int = 3) -> int:
    """The most pipeline stages (at most `most`) whose index_scores_smem fits SMEM_BUDGET; 1 if none does."""
    return next((st for st in range(most, 1, -1)
                 if index_scores_smem(spec, key_major, rows, keys, st) <= SMEM_BUDGET), 1)


def backward_footprints(spec: Spec, plan, tiles=None) -> dict[str, int]:
    """Estimated shared memory (bytes) of every backward kernel of a spec, by kernel name: of `tiles` (a
    plan.BackwardTiles), by default the plan's (`plan.backward`)."""
    t = tiles or plan.backward
    out = {"_bwd_preprocess_kernel": SCRATCH}
    for kind in spec.branches:
        if BY_NAME[kind].gathered:
            out["_selection_bwd_dq_kernel"] = dq_smem(spec, t.sel_dq_gp, t.sel_dq_block_n, t.sel_num_stages,
                                                      gathered=True)
            out["_selection_bwd_dkdv_kernel"] = dkdv_smem(spec, t.sel_bq * t.sel_dkdv_gp, t.sel_tile,
                                                          t.sel_num_stages)
            if t.scatter:
                out["_selection_bwd_scatter_kernel"] = scatter_smem(spec, t.scatter_gp, t.scatter_block_n,
                                                                    t.scatter_num_stages)
                # (its split forms' dK/dV kernel at their widest key tile, tuning.scatter_variants' split_k128)
                out["_selection_bwd_scatter_dkdv_kernel"] = scatter_once_smem(spec, t.scatter_once_rows, 128,
                                                                              t.scatter_dim)
        else:
            # The dense branches' tiles are their default launch configs (tuning.dense_backward_variants).
            for part, smem in (("dq", dq_smem), ("dkdv", dkdv_smem)):
                cfg = plan.tuning.defaults[f"{kind}_{part}"]
                out[f"_{kind}_bwd_{part}_kernel"] = smem(spec, cfg["bt"] * t.gp, cfg["block_n"], cfg["num_stages"])
    cmp = spec.compression
    if cmp is not None and "compression" in spec.branches:
        out["_pool_bwd_mean_kernel"] = SCRATCH
        if cmp.pool == "linear":
            bn = min(64, next_pow2(max(spec.head_dim.qk, spec.head_dim.v)))
            # dX: [32 chunks, BE] x [BE, BA] fp32 in unrolled static loops; dW: [BI, BA]^T x [BI, BE] fp32, pipelined.
            out["_pool_bwd_linear_dx_kernel"] = smem_bytes(streamed=[tile(32, bn, 4), tile(bn, bn, 4)], stages=1)
            out["_pool_bwd_dw_kernel"] = smem_bytes(streamed=[tile(32, bn, 4), tile(32, bn, 4)])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Launch-config model: shared memory and accumulator registers as sympy expressions of a config's free fields, so
# the candidates of `specgen tune` and of the modules' autotune fallback are pruned before anything is compiled.
# ---------------------------------------------------------------------------------------------------------------

ROWS, KEYS, STAGES, WARPS = sympy.symbols("rows keys stages warps", positive=True, integer=True)
# fp32 accumulator and score registers per thread a candidate may hold (of 255): above this ptxas spills.
ACC_REGISTER_BUDGET = 160


@dataclass(frozen=True)
class LaunchModel:
    """Footprint of one kernel as a function of (rows, keys, stages, warps)."""
    smem: sympy.Expr
    registers: sympy.Expr

    def evaluate(self, rows: int, keys: int, stages: int, warps: int) -> tuple[int, int]:
        at = {ROWS: rows, KEYS: keys, STAGES: stages, WARPS: warps}
        return int(self.smem.subs(at)), int(sympy.ceiling(self.registers.subs(at)))

    def fits(self, rows: int, keys: int, stages: int, warps: int) -> bool:
        smem, regs = self.evaluate(rows, keys, stages, warps)
        return smem <= SMEM_BUDGET and regs <= ACC_REGISTER_BUDGET


def launch_model(spec: Spec, kernel: str) -> LaunchModel:
    """The model of a tunable kernel: `compression` / `selection` / `window` (forward attention) or
    `<branch>_dq` / `<branch>_dkdv` (backward). Rows are query rows (positions x heads) of a program, keys its key
    tile (for dK/dV: the keys it owns; rows then stream)."""
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    threads = WARPS * 32
    if kernel in BY_NAME:
        smem = attention_smem(spec, ROWS, KEYS, STAGES, gathered=BY_NAME[kernel].gathered)
        return LaunchModel(smem, (ROWS * dv + ROWS * KEYS) / threads)
    if kernel == "selection_scatter":
        # Registers: the fp32 dQ rows, S and dP, one chunk's fp32 dK/dV sum (at most 128 dims).
        return LaunchModel(scatter_smem(spec, ROWS, KEYS, STAGES),
                           (ROWS * dqk + 2 * ROWS * KEYS + KEYS * min(128, dqk)) / threads)
    branch, part = kernel.rsplit("_", 1)
    if part == "dq":
        smem = dq_smem(spec, ROWS, KEYS, STAGES, gathered=BY_NAME[branch].gathered)
        return LaunchModel(smem, (ROWS * dqk + ROWS * KEYS) / threads)
    smem = dkdv_smem(spec, ROWS, KEYS, STAGES)
    return LaunchModel(smem, (KEYS * (dqk + dv) + KEYS * ROWS) / threads)
