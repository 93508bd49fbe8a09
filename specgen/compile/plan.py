"""The kernel plan: every compile-time choice a generated module bakes in, derived from a spec, in one object.

The plan sits between the analysis (with the footprint model of specgen.compile.footprint, which it imports) and
the templates: it turns the spec's numbers into tile shapes, row packing, head-dim parts, launch order, the
backward's, decode's and distillation's tiles, and the launch configs (defaults and tuning candidates), so
templates only substitute values and never decide. Tuned configs (when a tuning record exists) override the
defaults chosen here. `make_plan(spec)` is the only constructor; render reads nothing else.

    Plan                    branches (launch order), forward tiles (compression / selection / window: AttentionTile), block scoring
                            (score_*), token scoring (index_*), pooling (pool_bi), head-dim parts, group
      .backward             BackwardTiles: the backward kernels' tiles (each kernel fits shared memory)
      .decode               DecodePlan: the decode step's tiles, the ring of cache tensors, the top-k segments
      .distill              DistillPlan (specs with an indexer) or None: the distillation loss's tiles (.mha: the
                            unabsorbed dense stage's, MhaTiles)
      .tuning               Tuning: default launch configs and the pruned tuning candidates (computed on first use)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from .analysis import head_dim_parts
from .branches import Branch, branches_of
from .footprint import (DTYPE_BYTES, MIN_DOT, SMEM_BUDGET, SMEM_LIMIT,  # noqa: F401 (re-exported)
                        attention_smem, distill_mha_smem, distill_qreg_smem, dkdv_smem, dq_smem, index_scores_stages,
                        next_pow2, programs_per_sm, registers_allow, score_smem)
from .loop_order import SCATTER_DIM, scatter_applies, scatter_backward, scatter_rows, selection_orders
from .tuning import candidates_for, default_configs
from ..model.spec import Spec

# Main rows of one head chunk of the distillation kernels for wide heads.
WIDE_CHUNK_ROWS = 64


def wide_heads(spec: Spec) -> bool:
    """MLA-like head dims (d_qk + d_v > 512, DeepSeek's 576 + 512): tiles narrow, stages drop to one."""
    return spec.head_dim.qk + spec.head_dim.v > 512


@dataclass(frozen=True)
class Part:
    """A power-of-two slice of a head dim: 192 is parts (0, 128) and (128, 64)."""
    offset: int
    size: int


@dataclass(frozen=True)
class AttentionTile:
    """Row packing of a flash-style kernel: BT query positions x GP (padded) heads of one kv group."""
    bt: int
    gp: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    head_chunks: int = 1  # programs sharing one (query tile, kv group): each takes GP of the group's heads


@dataclass(frozen=True)
class BackwardTiles:
    """Tiles of the backward kernels (specgen/compile/templates/nsa_autograd.j2, kernels/backward.j2).

    Window / compression: their launch configs (rows, keys, warps, stages, the dK/dV product form) are
    tuning.dense_backward_variants' (the plan's default among them); GP is their row packing's heads and BT the
    64-row packing the selection's dK/dV starts from (sel_bq).
    Selection dq: one query position, SEL_DQ_GP heads per program, the group split over sel_dq_chunks programs
    (each head's dq is independent), sel_dq_block_n keys per trip (may be less than a unit).
    Selection dK/dV: sel_tile keys per program (the inverse index's tile, units_per_tile selection units), SEL_BQ
    queries x sel_dkdv_gp heads per trip, the group's heads walked by an inner loop of sel_dkdv_chunks trips
    accumulating into the same dK/dV registers (deterministic: fixed order).
    Selection scatter path (`scatter`, chosen by loop_order.scatter_backward; kernels/backward_scatter.j2): one
    program per (query, kv head, chunk of scatter_gp heads; scatter_chunks of them), scatter_block_n selected keys
    per trip, dQ in registers and dK/dV added with fp32 atomics in head-dim chunks (scatter_qk_parts,
    scatter_v_parts: the parts cut to at most scatter_dim dims) so that one chunk's [keys, dims] sum is live at a
    time; its split form's dK/dV kernel holds all the group's heads as scatter_once_rows rows (the group padded to
    a power of two) and adds each (query, key) once."""
    gp: int
    bt: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    sel_dq_gp: int = 0
    sel_dq_chunks: int = 1
    sel_dq_block_n: int = 0
    sel_tile: int = 0
    sel_bq: int = 1
    sel_dkdv_gp: int = 0
    sel_dkdv_chunks: int = 1
    sel_num_warps: int = 4
    sel_num_stages: int = 2
    unit: int = 1          # tokens per selection unit
    scatter: bool = False
    scatter_gp: int = 0
    scatter_chunks: int = 1
    scatter_block_n: int = 0
    scatter_dim: int = 0
    scatter_num_warps: int = 8
    scatter_num_stages: int = 1
    scatter_qk_parts: tuple = ()
    scatter_v_parts: tuple = ()
    scatter_once_rows: int = 0

    @property
    def units_per_tile(self) -> int:
        return self.sel_tile // self.unit


@dataclass(frozen=True)
class DecodePlan:
    """The decode step's plan (specgen.runtime.decode_step reads it from the module's DecodeDescriptor).

    ring / ring_size: cache tensors kept only as a ring of each sequence's last ring_size tokens (`decode_ring`).
    split_tiles: keys per tile of each branch's decode kernel (the split sizes); max_gp: group heads per program at
    most; num_stages: the decode kernels' pipeline stages. overlap_chunks / overlap_blocks: the compression scorer's
    overlap rule (d-token chunks per selection block, compression blocks per chunk); overlap_spill: selection
    blocks past its own that a compression tile's blocks reach (the last ones' chunks run into the next tile).
    scoring: how the compression scorer gets the group's block scores to the selection kernel: "partials" (the
    compression kernel writes, per tile of pooled keys and head, the tile's selection-block sums of
    exp2(logit - the running max) and that max; one kernel merges them with each head's final lse and takes the
    top-n), or "logits" (it writes every base-2 logit, read back by a group-probabilities kernel and a
    block-selection kernel: the older path, kept to time against). docs/decode.md has the bytes of both.
    split_waves / max_splits: the rule for a branch's split count from the device's SM count
    (runtime.decode_splits: enough programs for split_waves waves, at most max_splits, at most one per key tile).
    topk_*: the indexer top-k's segmentation (about topk_programs programs in all, at most topk_max_segments per
    row, topk_sum_segments partial histograms loaded at once).
    form: the compression-scored step's launch form (runtime.decode_step.LAUNCH_FORMS): "split" (five launches:
    compression, selection scores + top-n, selection, window, epilogue), "cw" (four: "split" with the compression
    and window in the fused form's one launch), "fused" (three: compression + window,
    scores + top-n beside the merge of the compression and window splits, selection with the epilogue in each row
    group's last split program; needs scoring "partials"), "whole" (one: a program per (sequence, kv group) runs its
    whole step, each branch in one split, a CTA barrier between the compression and its top-n; needs scoring
    "partials" and a group's heads in one program: runtime.decode_whole.supports; its program runs the row top-n
    whatever topn_form says),
    "whole_st" ("whole" with odd programs running the window branch first: their top-n phases start apart) or "auto"
    ("whole" where its batch rule holds, below it "cw" where it applies, else "split"; cw below the rule since the
    H100 timing of commit b6eeeaf: 128k x 1 42 us against split 44, 64k x 16 145 against 155). The batch rule
    (runtime.decode_whole.fills, written there only): "whole" pays only where its B x kv groups programs fill the GPU, at least FILL (1) x the SM count; below
    that SMs idle for the whole step while the split form's key-range splits keep them streaming. "auto" is the
    default since the H100 timing of commit c663314 (nsa_paper, 64k, graph replay: batch 64 whole at 3 stages 390
    us against split 420 and fused + cmp_s3_r2 398; batch 1 ran split then, 55 us); where neither applies
    (indexer-scored specs, docs/decode.md) "auto" runs "split" (docs/decode.md "Launch forms").
    selection_form / index_form / topk_form: the MLA selection kernel's, the index-score kernel's and the indexer
    top-k's forms (names in runtime.decode_step.SELECTION_FORMS / INDEX_FORMS / TOPK_FORMS; docs/decode.md "Forms
    of the DSA step"): "base" / "tile" / "radix" are the forms before them, still every spec's but the MLA step
    ranked by an indexer's, which takes the measured faster forms where they apply (`_decode_forms`); `specgen bench
    --decode --decode-forms` times them all on the same caches.
    topn_form: the compression scorer's top-n on the partials path (names in runtime.decode_step.TOPN_FORMS;
    docs/decode.md "Launch forms"): "row" (one program per (sequence, new query, kv group) walks every selection
    block) or "chunked" / "chunked_ticket" (programs per chunk of blocks, each its chunk's top candidates, merged
    by a second launch or by each row's last program): "chunked_ticket" (TOPN_FORM) on the partials path since
    its H100 timing (commit 2256469), "row" elsewhere (the only form of the logits path).
    cmp_form: the compression kernel's launch (names in runtime.decode_step.CMP_FORMS; docs/decode.md "Compression
    forms"): "cmp_base" (split_tiles["compression"], num_stages, the split_waves rule) or a form's keys per tile,
    pipeline stages, warps and split rule (one round of the programs an SM holds). "cmp_base" stays the default
    until the GPU timing of them.
    chain: how the split and cw forms' launches follow each other (runtime.decode_step.CHAINS; docs/decode.md
    "Launch chains"): "plain" (stream order) or "pdl" (programmatic dependent launch: each launch's latency behind
    the kernel before it). "plain" until the GPU timing of "pdl"."""
    ring: tuple
    ring_size: int
    split_tiles: dict = field(hash=False)
    max_gp: int = 128
    num_stages: int = 2
    overlap_chunks: int = 0
    overlap_blocks: int = 0
    overlap_spill: int = 0
    scoring: str = ""
    split_waves: int = 2
    max_splits: int = 64
    topk_programs: int = 1024
    topk_max_segments: int = 32
    topk_sum_segments: int = 16
    form: str = "auto"
    selection_form: str = "base"
    index_form: str = "tile"
    topk_form: str = "radix"
    topn_form: str = "row"
    cmp_form: str = "cmp_base"
    chain: str = "plain"


@dataclass(frozen=True)
class MhaTiles:
    """Tiles of the dense stage's kernels for q and k in the unabsorbed form (spec.unabsorbed: a key of `qk` dims per
    query head; docs/distill.md, "The dense stage from the unabsorbed heads").

    Forward and dI pass (`_distill_fwd_dense_mha_kernel`, `_distill_di_dense_mha_kernel`): a program owns bq query
    positions of one kv group, the rows of every product; it walks its keys bk a trip, and per trip loops over the
    group's heads (S_h = Q_h K_h^T [bq, bk], qk in its power-of-two `parts`) and then over the indexer heads
    (a_j = q_I,j k_I^T [bq, bk]), those loops software-pipelined over `stages` (Q_h, K_h and q_I,j are reloaded
    from L2 each trip: the head-sum of p comes before the KL, so heads cannot be programs of their own). A dI
    program takes `kb` keys of a row (a multiple of bk), so a strip of query tiles still fills the GPU.
    Backward: the dI pass writes dI of a strip of query tiles (at most `workspace` bytes, at least one tile) for the
    query side (`_distill_dq_dense_mha_kernel`: idx_bt positions x the indexer heads a program, dq_bs keys a trip)
    and the key side (`_distill_dk_dense_mha_kernel`: dk_bs keys a program, idx_bt positions a trip; dk_I summed in
    fp32 over the strips in order: no atomics), both on idx_warps warps and idx_stages pipeline stages: the query
    side cannot hold dq_I for bq positions x every indexer head, which per-head keys need to be worth loading."""
    # (The values: mha_tiles, from the MHA_* constants.)
    qk: int
    parts: tuple
    bq: int
    bk: int
    kb: int
    warps: int
    stages: int
    workspace: int
    idx_bt: int
    dq_bs: int
    dk_bs: int
    idx_warps: int
    idx_stages: int


@dataclass(frozen=True)
class DistillPlan:
    """Tiles of the distillation kernels (docs/distill.md).

    Dense stage: a program owns BT query positions of one kv group; its rows are BT x GP main-attention heads and
    BT x HP indexer heads (both >= 16 for tl.dot); keys go by BS per loop trip. The dK kernel owns BK keys and walks
    the query tiles.
    Sparse stage: one query position per program (each query has its own keys), so the heads alone fill the rows,
    padded to >= 16 (SGP, SHP); the selected keys go by SBS per trip. The dK kernel owns SBK keys and walks their
    (query, key) pairs from the inverse index, PAIRS pairs (x HP indexer heads) per trip.
    """
    gp: int
    hp: int
    bt: int
    bs: int
    bk: int
    sgp: int
    shp: int
    sbs: int
    sbk: int
    pairs: int
    num_warps: int = 4
    # Wide heads (d_qk + d_v > 512): the group's main heads go by gp // head_chunks (sgp // head_chunks) rows per
    # trip of an inner loop that sums the target p over the chunks, and no software pipelining (num_stages 1), so
    # a program's dot operands fit shared memory (footprint below). None: Triton's default stages (3).
    head_chunks: int = 1
    num_stages: int | None = None
    # The "fused" path (docs/distill.md, "Two paths"): every head of a query in one program (Q resident, no head
    # chunks), fused_bs keys per trip on fused_warps warps (the rows, 64 per warpgroup: V3.2's 128 heads on two
    # warpgroups, 32 keys so Q [128, 576] and the key tile fit 227 KiB), the sparse forward storing p; the sparse
    # backward one pass of bwd_bs keys on bwd_warps warps (the key-major dk_I product has bwd_bs rows). `path` is
    # the default the launches take ("fused" or "legacy": the head-chunked kernels and the inverse index).
    fused_bs: int = 64
    fused_warps: int = 4
    bwd_bs: int = 64
    bwd_warps: int = 4
    path: str = "fused"
    # The sparse fused forward's form (docs/distill.md, "The sparse forward's forms"; launch config
    # Launches.fwd_form; runtime.distill.FWD_FORMS): "base", "pf" (next trip's key tile prefetched), "km" (key-major,
    # fused_km_bs keys a trip, the key tile in pieces) or "km_pf" (km with each piece gathered km_pf_dist pieces
    # ahead). The default is km_pf, the fastest of the side-by-side timing (bench/distill_bench.py, V3.2 sparse stage,
    # H200, commit 6cc8fb1): forward 81.0 ms at 64k against base 151.2, pf 134.1, km 89.1 (18.5 against 33.6 at 16k).
    fwd_form: str = "km_pf"
    fused_km_bs: int = 64
    km_pf_dist: int = 1      # km_pf: key pieces gathered this many pieces ahead of their product (2: 280 spill B)
    # The dense fused forward's form (docs/distill.md, "The dense forward's forms"; launch config
    # Launches.dense_fwd_form; runtime.distill.DENSE_FWD_FORMS): "base" (_distill_fwd_dense_fused_kernel) or one of
    # dense_forms, the register-operand forms of _distill_fwd_dense_qreg_kernel: (name, keys a trip, pipeline
    # stages, bit mask of Q's pieces of dense_piece dims kept in shared memory, the others in registers). The plan
    # (_distill_tiles) takes "qreg" for wide heads where it renders it: timed on V3.2 (H100, commit b6eeeaf, dense
    # stage with lse_main, fwd / fwd+bwd): 16k 120.2 / 441.4 ms base, 75.3 / 358.6 qreg + qreg dq; 32k 537.5 /
    # 1830.3 against 303.0 / 1399.7. Elsewhere base (the narrow specs' qreg forms are untimed).
    dense_fwd_form: str = "base"
    dense_forms: tuple = ()
    dense_piece: int = 128
    # The dense backward's query side in a register-operand form (Launches.dense_dq_form; runtime.distill.
    # DENSE_DQ_FORMS: "base" or "qreg", the kernel _distill_dq_dense_qreg_kernel with qreg's constexprs); the plan
    # pairs it with dense_fwd_form (the timing above: 32k fwd+bwd 1601.0 ms qreg forward alone, 1399.7 with both).
    dense_dq_form: str = "base"
    # The dense stage from q and k in the unabsorbed form (specs with `unabsorbed`; MhaTiles), else None.
    mha: MhaTiles | None = None

    def fused_tiles(self) -> "DistillPlan":
        """The tiles the fused path's kernels are rendered with."""
        return dataclasses.replace(self, head_chunks=1, bs=self.fused_bs, sbs=self.fused_bs,
                                   bk=min(self.bk, self.fused_bs), num_warps=self.fused_warps)

    @property
    def chunk_gp(self) -> int:
        """Main heads per head chunk (dense stage)."""
        return self.gp // self.head_chunks

    @property
    def chunk_sgp(self) -> int:
        """Main heads per head chunk (sparse stage)."""
        return self.sgp // self.head_chunks


@dataclass(frozen=True)
class Tuning:
    """Launch configs: `defaults` {kernel: config} (the plan's tiles; a tuning record's entries override them per
    GPU) and `candidates` {tunable kernel: [config, ...]}, the default first, pruned by the footprint model."""
    defaults: dict
    candidates: dict


@dataclass(frozen=True)
class Plan:
    spec: Spec
    qk_parts: tuple[Part, ...]
    v_parts: tuple[Part, ...]
    group: int
    branch_index: dict = field(hash=False)
    compression: AttentionTile | None
    window: AttentionTile | None
    selection: AttentionTile | None
    # block selection (compression scorer)
    score_bt: int = 0
    score_gp: int = 0
    score_bj: int = 0          # selection blocks per loop trip
    score_bnc: int = 0         # compression blocks per loop trip (= score_bj * chunks per selection block)
    score_overlap: str = ""    # "sums" (weighted group sums) or "dot" (overlap matrix product): see make_plan
    score_warps: int = 4       # the scorer's launch config `select`: warps (8 from 256 rows) and pipeline stages
    score_stages: int = 3      # (`score_stages` below)
    # The score tile's form: query-major [BT * GP, BNC] (default) or key-major [BNC, BT * GP] with each column's
    # head bits on the wgmma accumulator's register bits (score_head_bits; position bits score_pos_bits), so the
    # sum over the group's heads needs no shuffles (score_columns; "sums" overlap, 64 rows, 4 warps only).
    score_key_major: bool = False
    # Trips whose chunk every row of the tile sees whole skip the visibility mask (False: every trip masked, the
    # former kernel, kept as the benchmarks' in-run baseline: variants "score_masked").
    score_unmasked_trips: bool = True
    # Running top-n keys: int64 (0: score bits above the complemented block index, exact) or int32 with this many
    # low bits for the index (the score cut to its top 31 - bits bits: ties within the cut go to the lower block).
    score_index_bits: int = 0
    score_head_bits: tuple = ()
    score_pos_bits: tuple = ()
    topk_pad: int = 0          # running top-n buffer width (power of two >= top_k)
    # token selection (indexer scorer)
    index_bt: int = 0
    index_hp: int = 0
    index_bs: int = 0
    index_kt: int = 8        # key tiles per indexer program (q_I loaded once per program)
    # The score tile's form (docs/decisions.md, indexer): key-major (rows = keys, columns = one query's indexer
    # heads padded to index_key_heads, the sum over heads a row reduction within threads; index_km_bt queries per
    # program walked by a loop with the key tile loaded once) or query-major (rows = index_bt queries x heads, the
    # sum over heads a cross-warp reshape-sum). Both are rendered; the launch config's `key_major` picks.
    index_key_major: bool = False
    index_key_heads: int = 0
    index_km_bt: int = 64
    index_km_keys: int = 128
    index_km_stages: int = 3   # the key-major loop's pipeline stages (fewer where 3 would not fit shared memory)
    # Top-k (`_radix_topk_kernel`): the radix digits (shift, bits) from the top, and whether the threshold bucket is
    # compacted into a per-row list of index_topk_list entries once it fits (the later digits and the output pass
    # then walk the list, not the row). Launch-config keys `compact`, `chunk` (units per trip), `list` pick.
    index_topk_digits: tuple = ()
    index_topk_chunk: int = 2048
    index_topk_list: int = 0
    index_topk_warps: int = 8
    idx_scale: float | None = None  # the indexer's score scale (the spec's, else d_I^-1/2 x heads^-1/2)
    pool_bi: int = 0
    # the selected-block attention's loop order per pass: "query" (attention.j2, backward.j2) or "kv" (select_kv.j2)
    selection_order: str = "query"
    selection_bwd_order: str = "query"
    sel_kv_split: int = 0      # kv-order backward: queries per work item
    sel_kv_bq: int = 0         # kv order: queries per tile (x sel_kv_gp padded heads = the dot's rows)
    sel_kv_gp: int = 0
    sel_kv_block_n: int = 0    # keys per tile: one selected block, padded to the dot's minimum
    sel_kv_warps: int = 4      # the block-outer forward's warps (loop_order.FORWARD_ONE_WARPGROUP)
    sel_kv_merge_rows: int = 0
    # The forced blocks attended per query tile in the merge (_selection_kv_forced_merge_kernel, on
    # sel_kv_forced_warps) instead of as block-outer work items (docs/selection_order.md, "Forced blocks"): the
    # plan's wherever the forward is block outer with initial or local blocks, since its H100 timing
    # (loop_order.selection_orders); only for a selection the forward's scorer made, in batched calls.
    sel_kv_forced: bool = False
    sel_kv_forced_warps: int = 4
    # The kv order's work list form, forward and backward (runtime.selection.WORKLIST_FORMS; docs/selection_order.md,
    # "Work list"): "torch", one sort of every (segment, query, slot) key, or "triton", a counting sort in two
    # kernels (the same list, bit for bit): "triton" since the H100 timing of both (commit 2256469: the list 2.6x
    # faster at 64k, Llama-3-8B heads' forward 29.31 -> 27.68 ms, forward+backward 83.47 -> 80.82 ms).
    sel_kv_worklist: str = "triton"
    sel_kv_bytes: dict = field(default_factory=dict, hash=False, compare=False)  # the model that chose the order
    # the other passes
    backward: BackwardTiles | None = None
    decode: DecodePlan | None = None
    distill: DistillPlan | None = None

    @property
    def branches(self) -> tuple[Branch, ...]:
        """The spec's branches in launch order (specgen.compile.branches)."""
        return branches_of(self.spec)

    @property
    def unit(self) -> int:
        """Tokens per selection unit: l' at block granularity, 1 at token granularity."""
        return self.spec.selection.block if self.spec.selection else 0

    @property
    def index_keys(self) -> int:
        """Keys per indexer-score program (index_kt tiles of index_bs)."""
        return self.index_bs * self.index_kt

    @property
    def index_heads(self) -> int:
        """Indexer query heads in all (indexer heads per kv group x kv groups)."""
        return self.spec.heads.kv * self.spec.indexer.heads if self.spec.indexer else 0

    @functools.cached_property
    def tuning(self) -> Tuning:
        # On first use: pruning the candidates evaluates the footprint model (sympy) per config.
        return Tuning(default_configs(self), candidates_for(self))


def decode_ring(spec: Spec) -> tuple[str, ...]:
    """Cache tensors the decode cache keeps only as a ring of each sequence's last l + max_q_len tokens: the
    compression branch's own keys/values, which `kv: independent` gives it and which only the pooling of newly
    completed blocks reads. Empty for `kv: shared`: there the pooling reads the completed block's rows from the
    full per-token k/v (paged or contiguous rows, like every other branch). Decided here once, from the spec; the
    templates test this tuple, never a rendered string."""
    if spec.kv != "independent" or not spec.needs_compressed_kv:
        return ()
    return ("k_cmp", "v_cmp") if "compression" in spec.branches else ("k_cmp",)


def _parts(d: int) -> tuple[Part, ...]:
    out, off = [], 0
    for size in head_dim_parts(d):
        out.append(Part(off, size))
        off += size
    return tuple(out)


def _backward_tiles(spec: Spec, group: int, topk_pad: int) -> BackwardTiles:
    gp = next_pow2(group)
    bt = max(1, 64 // gp)
    # Programs hold fp32 dQ, or dK and dV, tiles in registers: 8 warps once the head dims reach 256.
    warps = 8 if spec.head_dim.qk + spec.head_dim.v >= 256 else 4
    kw: dict = {}
    sel = spec.selection
    if sel is not None:
        unit = sel.block
        sel_gp = max(MIN_DOT, gp)
        tile_keys = 32 if sel.granularity == "token" else max(MIN_DOT, unit)
        if not wide_heads(spec):
            kw.update(sel_dq_gp=sel_gp, sel_dq_block_n=max(MIN_DOT, unit, min(64, unit * topk_pad)),
                      sel_tile=tile_keys, sel_bq=bt, sel_dkdv_gp=gp)
        else:
            # Wide heads (MLA's 576 + 512): one stage, at most 64 head rows, and the largest (rows, keys) pair
            # that fits the budget. dq: the group's heads over programs; dK/dV: over an inner loop.
            stages = 1
            dq_rows, dq_bn = next(((r, n) for r, n in ((64, 64), (64, 32), (32, 64), (32, 32), (32, 16), (16, 32),
                                                       (16, 16))
                                   if r <= sel_gp and dq_smem(spec, r, n, stages, gathered=True) <= SMEM_BUDGET),
                                  (MIN_DOT, MIN_DOT))
            dkdv_rows = next((r for r in (64, 32, 16) if r <= max(MIN_DOT, gp)
                              and dkdv_smem(spec, r, tile_keys, stages) <= SMEM_BUDGET), MIN_DOT)
            kw.update(sel_dq_gp=dq_rows, sel_dq_chunks=-(-group // dq_rows), sel_dq_block_n=dq_bn,
                      sel_tile=tile_keys, sel_bq=1, sel_dkdv_gp=dkdv_rows,
                      sel_dkdv_chunks=-(-group // dkdv_rows), sel_num_stages=stages)
        kw.update(sel_num_warps=warps, unit=unit)
        if scatter_backward(spec):
            kw.update(scatter_tiles(spec, group))
    return BackwardTiles(gp=gp, bt=bt, num_warps=warps, **kw)


def _chunked(parts: tuple, size: int) -> tuple:
    return tuple(Part(p.offset + o, min(size, p.size - o)) for p in parts for o in range(0, p.size, size))


def scatter_tiles(spec: Spec, group: int) -> dict:
    """The scatter backward's tiles: loop_order.scatter_rows head rows a program (its fp32 dQ lives in registers),
    32 gathered keys a trip for wide heads (64 otherwise), 8 warps, one stage for wide heads. V3.2 (32 rows, 32 keys,
    8 warps, 1 stage) compiles for sm_90 at 238 registers, no spills, 110592 B shared (bench/dsa_bwd_offline.py; its
    launch-config forms: tuning.scatter_variants)."""
    wide = wide_heads(spec)
    rows = scatter_rows(spec)
    qk, v = _chunked(_parts(spec.head_dim.qk), SCATTER_DIM), _chunked(_parts(spec.head_dim.v), SCATTER_DIM)
    # MLA: V's chunks are K's first ones (the kernel reuses the gathered K chunks as V): the rule of scatter_applies.
    assert scatter_applies(spec), (qk, v)
    return dict(scatter=True, scatter_gp=rows, scatter_chunks=-(-group // rows), scatter_block_n=32 if wide else 64,
                scatter_dim=SCATTER_DIM, scatter_num_warps=8, scatter_num_stages=1 if wide else 2,
                scatter_qk_parts=qk, scatter_v_parts=v, scatter_once_rows=max(MIN_DOT, next_pow2(group)))


def _decode_plan(spec: Spec, selection: AttentionTile | None) -> DecodePlan:
    cmp_, sel = spec.compression, spec.selection
    wide = wide_heads(spec)
    overlap = {}
    cmp_tile = 64
    if sel is not None and sel.scorer == "compression":
        chunks, blocks = sel.block // cmp_.stride, cmp_.block // cmp_.stride
        # Partial block sums need tiles of whole selection blocks; else the logits path (every spec in specs/ has
        # the partials).
        partials = cmp_tile % chunks == 0
        overlap = dict(overlap_chunks=chunks, overlap_blocks=blocks, overlap_spill=(chunks + blocks - 2) // chunks,
                       scoring="partials" if partials else "logits")
        if partials:  # the chunked top-n where it applies (TOPN_FORM's measurement)
            overlap["topn_form"] = TOPN_FORM
    # A block completed by a step's first new token starts l - 1 tokens before it, and the step writes q_len
    # tokens first: l + max_q_len tokens of ring are enough.
    return DecodePlan(ring=decode_ring(spec), ring_size=(cmp_.block if cmp_ else 0) + spec.decode.max_q_len,
                      split_tiles={"compression": cmp_tile, "window": 64,
                                   "selection": selection.block_n if selection else 64},
                      max_gp=64 if wide else 128, num_stages=1 if wide else 2, **overlap, **_decode_forms(spec))


# The compression scorer's top-n on the partials path: chunks of a row's blocks, each chunk's top candidates merged
# by the row's last program. H100, nsa_paper, graph replay, commit 2256469 (2026-12-07): batch 1 at 128k 46 us
# against 67 for "row" (64k: 40 against 57), batch 16 159 against 172, batch 64 on the split form 416 against 422
# (the whole form, "auto"'s at batch 64, keeps its own top-n); "chunked" (a merge launch) 47 / 40 / 415.
TOPN_FORM = "chunked_ticket"

# The MLA step's forms where they apply: the fastest measured at batch 64 x 64k on dsa_v32 (H200, graph replay,
# 6cc8fb1, 2026-12-07: ks_pf_k32 + wide_w8 + radix 537 us against 769 for base + tile + radix; docs/decode.md
# "Forms of the DSA step"). The top-k stays "radix": at batch 64 the fold forms' cheaper top-k went mostly into a
# slower index kernel (ks_pf_k32 + wide + fold_list 544 us), and wide_w8 with a fold form is untimed.
MLA_SELECTION_FORM, MLA_INDEX_FORM = "ks_pf_k32", "wide_w8"
MLA_SELECTION_TILE = 32  # keys per tile of MLA_SELECTION_FORM (runtime.decode_step.SELECTION_FORMS)


def _decode_forms(spec: Spec) -> dict:
    """DecodePlan's selection_form / index_form where they differ from "base" / "tile": the MLA step ranked by an
    indexer (DSA) takes MLA_SELECTION_FORM where runtime.decode_step.check_forms allows it (the key is V plus a rope
    part: a power-of-two head_dim.v below head_dim.qk < 2 head_dim.v; the form's 32-key tiles hold whole selection
    units) and MLA_INDEX_FORM; every other spec keeps "base" / "tile". Token granularity only: the forms were
    timed on V3.2 (docs/decode.md); block-unit MLA specs (dsa_block) keep the base forms until timed themselves."""
    sel = spec.selection
    if not (spec.mla and sel is not None and sel.scorer == "indexer" and spec.indexer is not None
            and sel.granularity == "token"):
        return {}
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    forms = {"index_form": MLA_INDEX_FORM}
    if dqk != dv and 1 << (dqk.bit_length() - 1) == dv and MLA_SELECTION_TILE % sel.block == 0:
        forms["selection_form"] = MLA_SELECTION_FORM
    return forms


# The dense distillation forward's register-operand forms (docs/distill.md, "The dense forward's forms"): Q's
# register share a thread at most (V3.2 on 8 warps: 112 compiles clean; all 144 leave ptxas short of registers, and
# it then serialises every wgmma of the kernel), the pieces beyond it kept in shared memory, last full piece first.
DENSE_QREG_REGISTERS = 112
DENSE_PIECE = 128
# (name, keys a trip, pipeline stages): 64 keys at 2 stages (V3.2: 231424 B of shared memory, 1 KiB under the
# H100's 227 KiB), 32 keys at 3 (185344 B).
DENSE_QREG_FORMS = (("qreg", 64, 2), ("qreg_k32", 32, 3))


def dense_pieces(spec: Spec, piece: int) -> list[tuple[int, int]]:
    """(offset, dims) of Q's pieces in the dense forward's register-operand forms (bit i of a form's QSMEM is
    piece i): at most `piece` dims, within the head dim's power-of-two parts."""
    return [(p.offset + c, min(piece, p.size - c)) for p in _parts(spec.head_dim.qk) for c in range(0, p.size, piece)]


def dense_qreg_forms(spec: Spec, rows: int, idx_rows: int, warps: int) -> tuple:
    """The plan's dense_forms: (name, keys, stages, bit mask of the Q pieces kept in shared memory) for each of
    DENSE_QREG_FORMS whose footprint fits the H100 (footprint.distill_qreg_smem against SMEM_LIMIT: measured, the
    forms need more than the budget's margin leaves)."""
    e = DTYPE_BYTES[spec.dtype]
    pieces = dense_pieces(spec, DENSE_PIECE)
    regs = lambda dims: rows * dims * e / (32 * warps * 4)   # noqa: E731
    in_smem, dims = 0, spec.head_dim.qk
    for i in sorted(range(len(pieces)), key=lambda i: (-pieces[i][1], -i)):
        if regs(dims) <= DENSE_QREG_REGISTERS:
            break
        in_smem |= 1 << i
        dims -= pieces[i][1]
    smem_dims = spec.head_dim.qk - dims
    return tuple((name, keys, stages, in_smem) for name, keys, stages in DENSE_QREG_FORMS
                 if distill_qreg_smem(spec, rows, idx_rows, keys, stages, smem_dims) <= SMEM_LIMIT)


# The unabsorbed dense stage (MhaTiles): 128 query positions a program on two warpgroups (64 rows each, Triton 3.6's
# layout), 64 keys a trip, the head loops at up to 2 stages; the backward's dI strip at most 512 MiB (V3.2 at 32k:
# 4096 query rows a strip, 8 strips). sm_90 compile of V3.2's (docs/distill.md, "The dense stage from the
# unabsorbed heads"): the forward 255 registers, 40 spill bytes, 147968 B of shared memory at 2 stages; 3 stages
# take 222208 B (96 spill B), 128 keys a trip spill 528 B, 32 keys (3 stages) none but reload Q_h 5/3 as often.
MHA_BQ, MHA_BK, MHA_KB, MHA_WARPS, MHA_STAGES = 128, 64, 256, 8, 2
MHA_WORKSPACE = 1 << 29


def mha_tiles(spec: Spec, bt: int, hp: int) -> MhaTiles | None:
    """The unabsorbed dense stage's tiles (None without spec.unabsorbed): the most stages up to MHA_STAGES whose
    footprint (footprint.distill_mha_smem) fits SMEM_BUDGET. The index-only kernels of its backward take the dense
    stage's rows (bt positions x hp indexer heads, >= 16; at most MHA_BQ positions) on 4 warps up to 64 rows, 8
    above."""
    un = spec.unabsorbed
    if un is None:
        return None
    stages = next((st for st in range(MHA_STAGES, 1, -1)
                   if max(distill_mha_smem(spec, MHA_BQ, MHA_BK, st).values()) <= SMEM_BUDGET), 1)
    return MhaTiles(qk=un.qk, parts=_parts(un.qk), bq=MHA_BQ, bk=MHA_BK, kb=MHA_KB, warps=MHA_WARPS,
                    stages=stages, workspace=MHA_WORKSPACE, idx_bt=min(bt, MHA_BQ), dq_bs=64, dk_bs=64,
                    idx_warps=4 if bt * hp <= 64 else 8, idx_stages=3)


def _distill_tiles(spec: Spec) -> DistillPlan:
    gp = next_pow2(spec.heads.group_size)
    hp = next_pow2(spec.indexer.heads)
    # Enough positions that both row sets reach 16 (tl.dot's M on the GPU), aiming at 64 rows.
    bt = max(next_pow2(-(-MIN_DOT // min(gp, hp))), 64 // max(gp, hp), 1)
    # Wide heads (MLA's 576) keep a [BK, Dqk] key tile resident in the dK kernel: halve it there.
    bk = 64 if spec.head_dim.qk <= 256 else 32
    topk_pad = next_pow2(spec.selection.top_k)
    sgp = max(MIN_DOT, gp)
    wide = wide_heads(spec)
    # Wide heads: at most 64 main rows (positions x heads) per chunk (V3.2: 128 heads x 576 in one program's rows
    # needed 425 KiB of shared memory on the H100), one stage.
    head_chunks = max(1, bt * gp // WIDE_CHUNK_ROWS, sgp // WIDE_CHUNK_ROWS) if wide else 1
    # Fused path: all of a query's heads in one program, 64 rows per warpgroup (Triton 3.6 lays a product's rows
    # over every warp, 64 a warpgroup: fewer rows would repeat the products on each warpgroup). Wide heads: 32 keys
    # a trip, so the resident Q [BT*GP, Dqk] and the key tile fit shared memory in one stage (sm_90 compile:
    # V3.2's sparse forward 219 registers, no spills, 196 KiB; 64 keys would need 232 KiB).
    rows = max(bt * gp, sgp)
    fused_warps = max(4, 4 * rows // 64) if rows <= 128 else 8
    dense_forms = dense_qreg_forms(spec, bt * gp, bt * hp, fused_warps)
    dense_form = "qreg" if wide and any(f[0] == "qreg" for f in dense_forms) else "base"
    return DistillPlan(gp=gp, hp=hp, bt=bt, bs=64, bk=bk, sgp=sgp, shp=max(MIN_DOT, hp),
                       sbs=max(MIN_DOT, min(64, topk_pad)), sbk=MIN_DOT, pairs=max(1, 64 // hp),
                       head_chunks=head_chunks, num_stages=1 if wide else None,
                       fused_bs=32 if wide else max(MIN_DOT, min(64, topk_pad)), fused_warps=fused_warps,
                       bwd_bs=max(MIN_DOT, min(64, topk_pad)), fused_km_bs=max(MIN_DOT, min(64, topk_pad)),
                       dense_forms=dense_forms, dense_piece=DENSE_PIECE, dense_fwd_form=dense_form,
                       dense_dq_form=dense_form, mha=mha_tiles(spec, bt, hp))


# Column bits of a 64-column wgmma accumulator (m64nNk16, 4 warps) held in a thread's registers, lowest first:
# column = bit 0 (register) + bits 1-2 (lanes) + bits 3-5 (registers), as Triton 3.6 lays it out.
ACC_REGISTER_COLUMN_BITS = (0, 3, 4, 5)


def score_columns(bt: int, gp: int) -> tuple[tuple, tuple]:
    """(head bits, position bits) of the key-major score tile's BT * GP columns: the head index on the
    accumulator's register bits (the sum over a group's heads within a thread), the position on the rest."""
    n = (bt * gp).bit_length() - 1
    heads = ACC_REGISTER_COLUMN_BITS[:gp.bit_length() - 1]
    assert bt * gp == 64 and len(heads) == gp.bit_length() - 1, (bt, gp)
    return heads, tuple(b for b in range(n) if b not in heads)


# The block scorer's pipeline stages: Triton's default, the launch's before it took `num_stages` from its config.
SCORE_STAGES = 3


def score_stages(spec: Spec, rows: int, keys: int, warps: int, blocks: int = 0) -> int:
    """The block scorer's pipeline stages (`select`'s num_stages): SCORE_STAGES, or 2 where SCORE_STAGES leave one
    program an SM by shared memory (footprint.score_smem against the SM's: programs_per_sm) and 2 stages leave two,
    which the registers allow whatever the compiler takes (footprint.registers_allow: 4-warp programs). Gemma-2's
    64 x 256 key tiles (4 warps): one program an SM at 3 stages (133 KB), two at 2 (100 KB); H100, commit dc0b177 at
    64k: the scorer 6.44 -> 5.04 ms, the forward 35.57 -> 34.36 ms (docs/forward.md). Every other spec keeps 3:
    more than one program an SM at 3 stages, or 8-warp programs (256 rows: nsa_paper, nsa_config_a, nsa_mqa) whose
    registers (184-252 a thread, sm_90) hold one program an SM at any stages; none timed at 2."""
    at = [programs_per_sm(score_smem(spec, rows, keys, st, blocks)) for st in (SCORE_STAGES, 2)]
    return 2 if at[0] <= 1 and at[1] >= 2 and registers_allow(2, warps) else SCORE_STAGES


def make_plan(spec: Spec) -> Plan:
    g = spec.heads.group_size
    gp = next_pow2(g)
    # Flash-style tiles pack several query positions of one kv group so K/V tiles are shared across the group's
    # heads (GQA's whole point) and the matrix unit sees >= 16 rows even for MHA.
    rows = max(64, gp)
    bt = max(1, rows // gp)
    dense_tile = AttentionTile(bt=bt, gp=gp, block_n=64, num_warps=4, num_stages=2)
    compression = dense_tile if "compression" in spec.branches else None
    window = dense_tile if "window" in spec.branches else None
    selection = None
    plan_kw: dict = {}
    sel = spec.selection
    if sel is not None:
        # One query position per program: each query has its own blocks. Its group's heads fill the rows.
        unit = sel.block
        # Wide heads (MLA's 576/512) need narrower key tiles, one pipeline stage and more warps to fit shared memory
        # and registers: K+V tiles of 64 keys at 576+512 dims would need 272 KiB over two stages.
        wide = wide_heads(spec)
        # Wide heads also cap the rows at 64 heads per program (MLA's 128 heads x 576 dims would need ~340 KiB).
        rows = min(max(MIN_DOT, gp), 64) if wide else max(MIN_DOT, gp)
        # 64 gathered keys over two stages where they fit shared memory (resident Q, one gathered K(+V) buffer,
        # P, the index: the footprint model), else 32 keys in one stage.
        narrow_keys = wide and attention_smem(spec, rows, 64, 2, gathered=True) > SMEM_BUDGET
        selection = AttentionTile(bt=1, gp=rows,
                                  block_n=max(MIN_DOT, unit, (32 if narrow_keys else 64) if unit == 1 else unit),
                                  num_warps=8 if rows * spec.head_dim.v >= 16384 else 4,
                                  num_stages=1 if narrow_keys else 2, head_chunks=-(-g // rows))
        topk_pad = next_pow2(sel.top_k)
        plan_kw["topk_pad"] = topk_pad
        plan_kw.update(selection_orders(spec, g, gp))
        if sel.scorer == "compression":
            r = sel.block // spec.compression.stride
            bj = max(topk_pad, MIN_DOT, 64 // r)
            # Rows per program (query positions x the group's heads): 64 up to groups of 8, where the kernel is
            # bound by its per-row work and registers (occupancy), 16 positions (256 rows, 8 warps) for larger
            # groups, whose trips amortise over more heads. Measured on the H100 at 64k (bench/results/scoring):
            # 64 rows beat 128 and 16-32 at groups 1, 4 and 7; 256 beat 128 at group 16.
            score_bt = 64 // gp if gp <= 8 else max(1, min(256 // gp, 16))
            # The running top-n is merged per trip (int64 keys sorted with the chunk's). Keeping every block's
            # score of a row in registers with n rounds of argmax at the end was slower at every group measured
            # (1.3x at groups 4 and 7, 1.2x at 16: the row's scores cost registers, i.e. occupancy) and is gone.
            # Block scores from compression probabilities: as weighted sums over each selection block's R
            # compression blocks and the previous block's tail where a compression block spans at most two
            # selection blocks (l <= l') and R is a power of two (a reshape); else as a product with the overlap
            # matrix, whose fp32-accurate form (tf32x3) costs ~50 registers a thread and three MMAs a product.
            cmp_chunks = spec.compression.block // spec.compression.stride
            overlap = "sums" if cmp_chunks <= r and next_pow2(r) == r else "dot"
            # The scorer's warps: 8 from 256 rows; its stages by the shared memory an SM holds (score_stages).
            score_warps = 8 if score_bt * gp >= 256 else 4
            plan_kw.update(score_gp=gp, score_bt=score_bt, score_bj=bj, score_bnc=bj * r, score_overlap=overlap,
                           score_warps=score_warps, score_stages=score_stages(
                               spec, score_bt * gp, bj * r, score_warps, 0 if overlap == "sums" else bj))
        else:
            hp = next_pow2(spec.indexer.heads)
            # Score tiles of 128 rows (query positions x indexer heads) by 64 keys, or whole selection blocks.
            plan_kw.update(index_hp=hp, index_bt=max(1, 128 // hp), index_bs=max(64, unit))
            # Key-major score tiles where the heads fill a dot's columns without padding (>= 32 heads: V3.2's 64);
            # fewer heads would be padded to the dot's minimum of 16 columns, wasting most of the products.
            km_keys = max(128, unit)
            # Three stages of the streamed query heads (the H200 at 16k-64k, 2026-12-07: V3.2's score kernel 15-18%
            # faster than at two) where the footprint model fits them, else fewer (128 heads x 256 dims in bf16).
            plan_kw.update(index_key_major=hp >= 32, index_key_heads=max(MIN_DOT, hp), index_km_bt=64,
                           index_km_keys=km_keys,
                           index_km_stages=index_scores_stages(spec, True, max(MIN_DOT, hp), km_keys))
            # Digits of 6-7 bits: tl.histogram's cost per element grows with its bins (a warp ballot per bit, then
            # each lane's bins/32 bins popcounted): 64 bins cost ~22 lane instructions an element, 256 bins ~90. Two
            # full-row passes (13 bits: sign, exponent, 4 mantissa bits) usually leave a threshold bucket small
            # enough for the list of 2k entries.
            # The select at 8 warps: V3.2's top-k 10-34% faster than at 4 (H200, 16k-64k, 2026-12-07), and half the
            # registers a thread of the 2048-unit trip (no spills; 4096 units at 8 warps spill, not a default).
            plan_kw.update(index_topk_digits=((26, 6), (19, 7), (12, 7), (6, 6), (0, 6)),
                           index_topk_list=max(256, 2 * topk_pad), index_topk_warps=8)
    idx = spec.indexer
    if idx is not None:
        plan_kw["idx_scale"] = idx.scale if idx.scale is not None else idx.head_dim ** -0.5 * idx.heads ** -0.5
    if spec.needs_compressed_kv:
        plan_kw["pool_bi"] = 16
    return Plan(spec=spec, qk_parts=_parts(spec.head_dim.qk), v_parts=_parts(spec.head_dim.v), group=g,
                branch_index={b: i for i, b in enumerate(spec.branches)}, compression=compression, window=window,
                selection=selection, backward=_backward_tiles(spec, g, plan_kw.get("topk_pad", 0)),
                decode=_decode_plan(spec, selection),
                distill=_distill_tiles(spec) if idx is not None and sel is not None else None, **plan_kw)
