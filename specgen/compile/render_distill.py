"""Rendering of the indexer distillation loss (specgen/compile/templates/distill_module.py.j2, kernels in kernels/distill.j2).

The section is meant to be `{% include %}`d into the DSA module; until that module exists it is rendered inside
specgen/compile/templates/distill_test_wrapper.py.j2, which sets the spec constants the way module.py.j2 does. The tile plan
lives here (not in plan.py) so the lead can fold it into `Plan` without conflicts: `distill_context(spec)` gives the
extra template variables (`render.render_distill_module(spec)` renders the standalone module).
"""

from __future__ import annotations

from dataclasses import dataclass

from .footprint import DTYPE_BYTES, smem_bytes, tile
from .plan import MIN_DOT, make_plan, next_pow2

# Main rows of one head chunk of the distillation kernels for wide heads.
WIDE_CHUNK_ROWS = 64
from ..model.spec import Spec


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


def make_distill_plan(spec: Spec) -> DistillPlan:
    if spec.indexer is None or spec.selection is None:
        raise ValueError(f"spec {spec.name!r} has no indexer: the distillation loss trains the lightning indexer")
    gp = next_pow2(spec.heads.group_size)
    hp = next_pow2(spec.indexer.heads)
    # Enough positions that both row sets reach 16 (tl.dot's M on the GPU), aiming at 64 rows.
    bt = max(next_pow2(-(-MIN_DOT // min(gp, hp))), 64 // max(gp, hp), 1)
    # Wide heads (MLA's 576) keep a [BK, Dqk] key tile resident in the dK kernel: halve it there.
    bk = 64 if spec.head_dim.qk <= 256 else 32
    topk_pad = next_pow2(spec.selection.top_k)
    sgp = max(MIN_DOT, gp)
    wide = spec.head_dim.qk + spec.head_dim.v > 512
    # Wide heads: at most 64 main rows (positions x heads) per chunk (V3.2: 128 heads x 576 in one program's rows
    # needed 425 KiB of shared memory on the H100), one stage.
    head_chunks = max(1, bt * gp // WIDE_CHUNK_ROWS, sgp // WIDE_CHUNK_ROWS) if wide else 1
    return DistillPlan(gp=gp, hp=hp, bt=bt, bs=64, bk=bk, sgp=sgp, shp=max(MIN_DOT, hp),
                       sbs=max(MIN_DOT, min(64, topk_pad)), sbk=MIN_DOT, pairs=max(1, 64 // hp),
                       head_chunks=head_chunks, num_stages=1 if wide else None)


def dot_shapes(spec: Spec, d: DistillPlan) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of every tl.dot the distillation kernels issue, by name: each must be >= 16 on the GPU."""
    di = spec.indexer.head_dim
    parts = [p for p in make_plan(spec).qk_parts]
    shapes = {}
    for stage, bt, gp, hp, bs in (("dense", d.bt, d.gp // d.head_chunks, d.hp, d.bs),
                                  ("sparse", 1, d.sgp // d.head_chunks, d.shp, d.sbs)):
        for p in parts:
            shapes[f"{stage} q.k part {p.offset}+{p.size}"] = (bt * gp, p.size, bs)
        shapes[f"{stage} q_I.k_I"] = (bt * hp, di, bs)
        shapes[f"{stage} dq_I"] = (bt * hp, bs, di)
    for p in parts:
        shapes[f"dense dk q.k part {p.offset}+{p.size}"] = (d.bt * d.gp // d.head_chunks, p.size, d.bk)
    shapes["dense dk q_I.k_I"] = (d.bt * d.hp, di, d.bk)
    shapes["dense dk_I"] = (d.bk, d.bt * d.hp, di)
    shapes["sparse dk_I (one-hot)"] = (d.sbk, d.pairs * d.hp, di)
    return shapes


def distill_footprints(spec: Spec, d: DistillPlan | None = None) -> dict[str, int]:
    """Estimated shared memory (bytes) of every distillation kernel, by kernel name (model: specgen/compile/footprint.py).

    Before head chunks, DeepSeek-V3.2's dense forward held q [128, 576] and q_I [64, 128] resident and streamed
    k [64, 576] and k_I [64, 128] over 3 stages: 435200 bytes, as the H100 compiler reported."""
    d = d or make_distill_plan(spec)
    # The loss reads the unrounded indexer inputs (the spec's dtype) even when the top-k scores in fp8.
    e = ei = DTYPE_BYTES[spec.dtype]
    dqk, di = spec.head_dim.qk, spec.indexer.head_dim
    out = {}
    for stage, bt, gp, hp, bs in (("dense", d.bt, d.gp, d.hp, d.bs), ("sparse", 1, d.sgp, d.shp, d.sbs)):
        q = tile(bt * gp // d.head_chunks, dqk, e)
        qi = tile(bt * hp, di, ei)
        keys = [tile(bs, dqk, e), tile(bs, di, ei)]
        chunked = d.head_chunks > 1
        kw = dict(resident=[qi] + ([] if chunked else [q]), stages=d.num_stages)
        if stage == "dense":
            kw.update(streamed=keys + ([q] if chunked else []))
        else:
            kw.update(gathered=keys, streamed=[q] if chunked else [], index=[tile(bs, 1, 4)])
        out[f"_distill_fwd_{stage}_kernel"] = smem_bytes(**kw)
        # dq_I += (dI [a > 0]) @ k_I: the coefficients [BT*HP, BS] are one more operand.
        out[f"_distill_dq_{stage}_kernel"] = smem_bytes(**kw, computed=[tile(bt * hp, bs, ei)])
    q = tile(d.bt * d.gp // d.head_chunks, dqk, e)
    out["_distill_dk_dense_kernel"] = smem_bytes(
        resident=[tile(d.bk, dqk, e), tile(d.bk, di, ei)], streamed=[q, tile(d.bt * d.hp, di, ei)],
        computed=[tile(d.bk, d.bt * d.hp, ei)], stages=d.num_stages)
    out["_distill_dk_sparse_kernel"] = smem_bytes(
        gathered=[tile(d.pairs * d.hp, di, ei)], index=[tile(d.pairs * d.hp, 1, 8)],
        computed=[tile(d.sbk, d.pairs * d.hp, ei)], stages=d.num_stages)
    return out


def distill_context(spec: Spec, distill_plan: DistillPlan | None = None) -> dict:
    """The template variables the distillation section needs beyond `module_context`."""
    return {"distill": distill_plan or make_distill_plan(spec)}
