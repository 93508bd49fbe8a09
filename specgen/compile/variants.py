"""Plan variants: decisions a module can be rendered with besides the plan's default, kept selectable until a GPU
timing says which wins (bench/nsa_forward_variants.py times the forward's, bench/dsa_bwd.py `--variant` the
backward's; tests check each against the float64 reference). A variant is a name and a function Plan -> Plan (None
where it does not apply to the spec); `load_variant` renders and imports a module of the spec under the variants'
plan, named apart from the default's (its own JIT cache entry). Once a variant wins on the GPU, the rule goes into make_plan and leaves this table."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ..model.spec import Spec, replace as replace_spec
from .loop_order import scatter_applies, scatter_backward
from .plan import Plan, make_plan, scatter_tiles, score_columns


def _score_key_major(plan: Plan) -> Plan | None:
    """The block scorer's key-major score tile (plan.score_key_major): 64 rows, 4 warps, weighted-sum scores."""
    if not plan.score_bt or plan.score_overlap != "sums" or plan.score_bt * plan.score_gp != 64:
        return None
    heads, pos = score_columns(plan.score_bt, plan.score_gp)
    return dataclasses.replace(plan, score_key_major=True, score_head_bits=heads, score_pos_bits=pos)


def _score_key32(plan: Plan) -> Plan | None:
    """The block scorer's running top-n on int32 keys: the block index in the fewest bits that hold every block of
    max_seqlen, the score cut to the rest (at least 8 exponent + 10 mantissa bits)."""
    spec = plan.spec
    if not plan.score_bt:
        return None
    bits = max(1, (-(-spec.max_seqlen // spec.selection.block) - 1).bit_length())
    if 31 - bits < 8 + 10:
        return None
    return dataclasses.replace(plan, score_index_bits=bits)


def _sel_forced(plan: Plan) -> Plan | None:
    """The block-outer selection's forced blocks attended per query tile in its merge (plan.sel_kv_forced): 4 warps,
    8 where the tile's output is 64 rows x 256 dims or more (Gemma-2: 4 warps spill at sm_90)."""
    sel, spec = plan.spec.selection, plan.spec
    if plan.selection_order != "kv" or not (sel.initial or sel.local):
        return None
    warps = 8 if plan.sel_kv_bq * plan.sel_kv_gp * spec.head_dim.v >= 16384 else 4
    return dataclasses.replace(plan, sel_kv_forced=True, sel_kv_forced_warps=warps)


def _sel_w4(plan: Plan) -> Plan | None:
    """The block-outer selection forward on one warpgroup where the plan gives it two (64 rows x 256 dims: Gemma-2):
    Triton 3.6 lays the 64-row S = Q K^T tile over both warpgroups and computes it twice; one warpgroup holds the
    [64, 256] fp32 output at 238 registers, no spills (sm_90), the same 8 warps an SM as 8-warp programs."""
    if plan.selection_order != "kv" or plan.sel_kv_warps != 8:
        return None
    return dataclasses.replace(plan, sel_kv_warps=4)


def _sel_wl_torch(plan: Plan) -> Plan | None:
    """The block-outer selection's work list built by one torch sort (plan.sel_kv_worklist "torch", the form before
    the Triton counting sort, the plan's since its timing; the same list, bit for bit), forward and backward: the
    benchmarks' baseline."""
    if plan.selection_order != "kv" and plan.selection_bwd_order != "kv":
        return None
    return dataclasses.replace(plan, sel_kv_worklist="torch")


def _bwd_scatter(plan: Plan) -> Plan | None:
    """The selection backward on the query-outer scatter path (dK/dV by fp32 atomics) where the plan keeps the
    deterministic inverse-index kernels: token-granularity specs below loop_order's FLOPs-per-atomic-byte threshold
    (groups of 1 and 2 at d_qk = d_v). Its head rows are padded to the matrix unit's minimum (16). The variant timed
    dsa_gqa16_4 (a group of 4) on this path when the threshold was 64 (docs/backward.md, "Which path"), which moved
    it to 4; it times the groups below the threshold the same way."""
    spec = plan.spec
    if (spec.selection is None or spec.selection.granularity != "token" or scatter_backward(spec)
            or not scatter_applies(spec)):
        return None
    return dataclasses.replace(plan, backward=dataclasses.replace(
        plan.backward, **scatter_tiles(spec, spec.heads.group_size)))


def _score_masked(plan: Plan) -> Plan | None:
    """Every scorer trip masked: the kernel before the unmasked trips (a baseline for the benchmarks only)."""
    return dataclasses.replace(plan, score_unmasked_trips=False) if plan.score_bt else None


PLAN_VARIANTS = {
    "score_masked": _score_masked,
    "score_km": _score_key_major,
    "score_key32": _score_key32,
    "sel_forced": _sel_forced,
    "sel_w4": _sel_w4,
    "sel_wl_torch": _sel_wl_torch,
    "bwd_scatter": _bwd_scatter,
}


def variant_plan(spec: Spec, names) -> Plan | None:
    """The spec's plan with each named variant applied, or None if one does not apply."""
    plan = make_plan(spec)
    for name in names:
        plan = PLAN_VARIANTS[name](plan)
        if plan is None:
            return None
    return plan


def load_variant(spec: Spec, names) -> ModuleType | None:
    """The module of `spec` rendered with the named variants' plan (None where one does not apply), under the
    name `<spec>__<variants>` (its own JIT cache entry)."""
    from . import jit

    names = tuple(names)
    renamed = replace_spec(spec, name=f"{spec.name}__{'_'.join(names)}")
    plan = variant_plan(renamed, names)
    if plan is None:
        return None
    return jit.load(renamed, plan=plan)
