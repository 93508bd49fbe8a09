"""The kernel plan: every compile-time choice a generated module bakes in, derived from a spec.

The plan sits between the analysis and the templates: it turns the spec's numbers into tile shapes, row packing,
head-dim parts and launch order, so templates only substitute values and never decide. Tuned configs (when a tuning
record exists) override the defaults chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .analysis import head_dim_parts
from ..model.spec import KV_ORDER_MIN_BLOCK, Spec


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


# tl.dot needs every dimension >= 16 on the GPU; rows of a tile are padded up to this.
MIN_DOT = 16
# fp32 elements of block scores one selection program may keep in registers (BT rows x all blocks of max_seqlen).
SCORE_REGISTER_BUDGET = 16384
# Shared memory one block may opt in to on an H100 (227 KiB); kernels stay under SMEM_BUDGET (a margin for what
# the footprint model does not see: layout conversions, extra scratch).
SMEM_LIMIT = 232448
SMEM_BUDGET = int(SMEM_LIMIT * 0.85)


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
    score_mode: str = ""       # "registers" (all block scores of a tile row kept) or "merge" (running top-n)
    score_nsel_pad: int = 0    # selection blocks a row can have, padded to a power of two
    topk_pad: int = 0          # running top-n buffer width (power of two >= top_k)
    # token selection (indexer scorer)
    index_bt: int = 0
    index_hp: int = 0
    index_bs: int = 0
    index_kt: int = 8        # key tiles per indexer program (q_I loaded once per program)
    pool_bi: int = 0
    # the selected-block attention's loop order per pass: "query" (attention.j2, backward.j2) or "kv" (select_kv.j2)
    selection_order: str = "query"
    selection_bwd_order: str = "query"
    sel_kv_split: int = 0      # kv-order backward: queries per work item
    sel_kv_bq: int = 0         # kv order: queries per tile (x sel_kv_gp padded heads = the dot's rows)
    sel_kv_gp: int = 0
    sel_kv_block_n: int = 0    # keys per tile: one selected block, padded to the dot's minimum
    sel_kv_warps: int = 4
    sel_kv_merge_rows: int = 0
    sel_kv_bytes: dict = field(default_factory=dict, hash=False, compare=False)  # the model that chose the order

    @property
    def unit(self) -> int:
        """Tokens per selection unit: l' at block granularity, 1 at token granularity."""
        return self.spec.selection.block if self.spec.selection else 0


def decode_ring(spec: Spec) -> tuple[str, ...]:
    """Cache tensors the decode cache keeps only as a ring of each sequence's last l + max_q_len tokens: the
    compression branch's own keys/values, which `kv: independent` gives it and which only the pooling of newly
    completed blocks reads. Empty for `kv: shared`: there the pooling reads the completed block's rows from the
    full per-token k/v (paged or contiguous rows, like every other branch). Decided here once, from the spec; the
    templates test this tuple, never a rendered string."""
    if spec.kv != "independent" or not spec.needs_compressed_kv:
        return ()
    return ("k_cmp", "v_cmp") if "compression" in spec.branches else ("k_cmp",)


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


def _selection_order(spec: Spec, g: int, gp: int) -> dict:
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


def _parts(d: int) -> tuple[Part, ...]:
    out, off = [], 0
    for size in head_dim_parts(d):
        out.append(Part(off, size))
        off += size
    return tuple(out)


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
        # MLA gathers one tile per trip (V is K's first d_v dims, reused in registers), so it streams qk dims only.
        streamed = spec.head_dim.qk + (0 if spec.mla else spec.head_dim.v)
        wide = spec.head_dim.qk + spec.head_dim.v > 512
        # Wide heads also cap the rows at 64 heads per program (MLA's 128 heads x 576 dims would need ~340 KiB).
        rows = min(max(MIN_DOT, gp), 64) if wide else max(MIN_DOT, gp)
        # 64 gathered keys over two stages where they fit shared memory (resident Q, one gathered K(+V) buffer,
        # P, the index: the footprint model of specgen.compile.footprint), else 32 keys in one stage.
        elem = 4 if spec.dtype == "fp32" else 2
        wide_keys_bytes = elem * (rows * spec.head_dim.qk + 64 * streamed + rows * 64) + 64 * 4 * 2 + 1024
        narrow_keys = wide and wide_keys_bytes > SMEM_BUDGET
        selection = AttentionTile(bt=1, gp=rows,
                                  block_n=max(MIN_DOT, unit, (32 if narrow_keys else 64) if unit == 1 else unit),
                                  num_warps=8 if rows * spec.head_dim.v >= 16384 else 4,
                                  num_stages=1 if narrow_keys else 2, head_chunks=-(-g // rows))
        topk_pad = next_pow2(sel.top_k)
        plan_kw["topk_pad"] = topk_pad
        plan_kw.update(_selection_order(spec, g, gp))
        if sel.scorer == "compression":
            r = sel.block // spec.compression.stride
            bj = max(topk_pad, MIN_DOT, 64 // r)
            # Many query positions per program (16 when the group allows, up to 256 rows) amortise each trip's
            # fixed costs and let the head-summed scores feed 16-row overlap products.
            score_bt = max(1, min(256 // gp, max(16, 64 // gp)))
            nsel_pad = max(bj, next_pow2(-(-spec.max_seqlen // sel.block)))
            # Keep every block's score in registers when the tile's row fits (BT x NSEL_PAD fp32); otherwise
            # merge chunks into a running top-n buffer (sorting int64 keys: slower, but any length).
            mode = "registers" if score_bt * nsel_pad <= SCORE_REGISTER_BUDGET else "merge"
            plan_kw.update(score_gp=gp, score_bt=score_bt, score_bj=bj, score_bnc=bj * r, score_mode=mode,
                           score_nsel_pad=nsel_pad)
        else:
            hp = next_pow2(spec.indexer.heads)
            # Score tiles of 128 rows (query positions x indexer heads) by 64 keys, or whole selection blocks.
            plan_kw.update(index_hp=hp, index_bt=max(1, 128 // hp), index_bs=max(64, unit))
    if spec.needs_compressed_kv:
        plan_kw["pool_bi"] = 16
    return Plan(spec=spec, qk_parts=_parts(spec.head_dim.qk), v_parts=_parts(spec.head_dim.v), group=g,
                branch_index={b: i for i, b in enumerate(spec.branches)}, compression=compression, window=window,
                selection=selection, **plan_kw)
