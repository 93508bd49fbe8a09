"""Rendering of the indexer distillation loss (specgen/compile/templates/distill_module.py.j2, kernels in
kernels/distill.j2): the tiles are the plan's (`Plan.distill`, chosen in specgen.compile.plan); here are their
checks (the dot shapes, the shared-memory footprints) and the template variables.

The section is `{% include %}`d into the DSA module, and rendered alone inside
specgen/compile/templates/distill_test_wrapper.py.j2 (`render.render_distill_module(spec)`), which sets the spec
constants the way module.py.j2 does.
"""

from __future__ import annotations

import hashlib

from .footprint import DTYPE_BYTES, distill_mha_smem, distill_qreg_smem, smem_bytes, tile
from .plan import DistillPlan, dense_pieces, make_plan
from ..model.spec import Spec


def make_distill_plan(spec: Spec) -> DistillPlan:
    """The plan's distillation tiles (`make_plan(spec).distill`)."""
    d = make_plan(spec).distill
    if d is None:
        raise ValueError(f"spec {spec.name!r} has no indexer: the distillation loss trains the lightning indexer")
    return d


def dot_shapes(spec: Spec, d: DistillPlan) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of every tl.dot the distillation kernels issue, by name: each must be >= 16 on the GPU."""
    di = spec.indexer.head_dim
    parts = list(make_plan(spec).qk_parts)
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
    # The dense forward's register-operand forms: Q's pieces (each through an identity product), the key trips.
    f = d.fused_tiles()
    for name, keys, _, _ in d.dense_forms:
        for off, size in dense_pieces(spec, d.dense_piece):
            shapes[f"dense {name} q.k piece {off}+{size}"] = (f.bt * f.gp, size, keys)
            shapes[f"dense {name} identity {size}"] = (f.bt * f.gp, size, size)
        shapes[f"dense {name} q_I.k_I"] = (f.bt * f.hp, di, keys)
    # The unabsorbed dense stage: per head S_h = Q_h K_h^T in the unabsorbed dims' parts, per indexer head a_j; its
    # backward's index-only kernels.
    m = d.mha
    if m is not None:
        for p in m.parts:
            shapes[f"dense mha q.k part {p.offset}+{p.size}"] = (m.bq, p.size, m.bk)
        shapes["dense mha q_I.k_I"] = (m.bq, di, m.bk)
        rows = m.idx_bt * d.hp
        shapes["dense mha dq q_I.k_I"] = (rows, di, m.dq_bs)
        shapes["dense mha dq_I"] = (rows, m.dq_bs, di)
        shapes["dense mha dk q_I.k_I"] = (rows, di, m.dk_bs)
        shapes["dense mha dk_I"] = (m.dk_bs, rows, di)
    return shapes


def mha_footprints(spec: Spec, d: DistillPlan | None = None) -> dict[str, int]:
    """Estimated shared memory (bytes) of the unabsorbed dense stage's kernels at the plan's tiles
    (footprint.distill_mha_smem; empty without spec.unabsorbed)."""
    d = d or make_distill_plan(spec)
    m = d.mha
    if m is None:
        return {}
    return distill_mha_smem(spec, m.bq, m.bk, m.stages, m.idx_bt * d.hp, max(m.dq_bs, m.dk_bs), m.idx_stages)


def dense_qreg_footprints(spec: Spec, d: DistillPlan | None = None) -> dict[str, int]:
    """Estimated shared memory (bytes) of the dense forward's register-operand forms, by form name
    (footprint.distill_qreg_smem): Q's pieces in shared memory (the form's QSMEM bits), q_I, and the key tiles over
    the form's stages. Measured forms sit above SMEM_BUDGET's margin (V3.2's qreg 1 KiB under the H100's limit), so
    these are checked against SMEM_LIMIT."""
    d = d or make_distill_plan(spec)
    f = d.fused_tiles()
    pieces = dense_pieces(spec, d.dense_piece)
    return {name: distill_qreg_smem(spec, f.bt * f.gp, f.bt * f.hp, keys, stages,
                                    sum(size for i, (_, size) in enumerate(pieces) if qsmem >> i & 1))
            for name, keys, stages, qsmem in d.dense_forms}


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


def distill_key(d: DistillPlan) -> str:
    """A digest of the tiles (8 hex digits), part of the custom ops' names: modules of one spec rendered with other
    tiles (the tests' small tiles) get ops of their own instead of replacing each other's."""
    return hashlib.sha256(repr(d).encode()).hexdigest()[:8]


def distill_context(spec: Spec, distill_plan: DistillPlan | None = None) -> dict:
    """The template variables the distillation section needs beyond `module_context`."""
    d = distill_plan or make_distill_plan(spec)
    return {"distill": d, "distill_key": distill_key(d), "distill_pieces": dense_pieces(spec, d.dense_piece)}
