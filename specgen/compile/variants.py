"""Plan variants: decisions a module can be rendered with besides the plan's default, kept selectable until a GPU
timing says which wins (bench/nsa_forward_variants.py times the forward's, bench/dsa_bwd.py `--variant` the
backward's; tests check each against the float64 reference). A variant is a name and a function Plan -> Plan (None
where it does not apply to the spec); `load_variant` renders and imports a module of the spec under the variants'
plan, named apart from the default's (its own JIT cache entry). Once a variant wins on the GPU, the rule goes into
make_plan, and the table keeps a variant that renders the former default instead, as the benchmarks' in-run
baseline (score_masked, sel_unforced, sel_w8, sel_wl_torch)."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ..model.spec import Spec, replace as replace_spec
from .loop_order import FORWARD_ONE_WARPGROUP, scatter_applies, scatter_backward
from .plan import Plan, make_plan, scatter_tiles, score_columns


def _score_key_major(plan: Plan) -> Plan | None:
    """The block scorer's key-major score tile (plan.score_key_major): 64 rows, 4 warps, weighted-sum scores. Timed
    only together with score_key32 (H100, commit dc0b177; docs/forward.md), so not the plan's."""
    if not plan.score_bt or plan.score_overlap != "sums" or plan.score_bt * plan.score_gp != 64:
        return None
    heads, pos = score_columns(plan.score_bt, plan.score_gp)
    return dataclasses.replace(plan, score_key_major=True, score_head_bits=heads, score_pos_bits=pos)


def _score_key32(plan: Plan) -> Plan | None:
    """The block scorer's running top-n on int32 keys: the block index in the fewest bits that hold every block of
    max_seqlen, the score cut to the rest (at least 8 exponent + 10 mantissa bits). Ties within the cut go to the
    lower block, which departs from the exact rule (docs/semantics.md): a variant whatever its timing (H100, commit
    dc0b177: Llama-3-8B heads' forward 27.50 -> 27.02 ms, 5886 rows selecting otherwise; docs/forward.md)."""
    spec = plan.spec
    if not plan.score_bt:
        return None
    bits = max(1, (-(-spec.max_seqlen // spec.selection.block) - 1).bit_length())
    if 31 - bits < 8 + 10:
        return None
    return dataclasses.replace(plan, score_index_bits=bits)


def _sel_unforced(plan: Plan) -> Plan | None:
    """The block-outer selection's forced blocks as work items like every other slot, every slot's partial merged by
    `_selection_kv_merge_kernel` (plan.sel_kv_forced off): the plan's default before the forced merge's H100 timing
    (commit dc0b177; loop_order.selection_orders), kept as the benchmarks' baseline. The merge every call with given
    indices, packed or chunked-prefill rows runs anyway."""
    if not plan.sel_kv_forced:
        return None
    return dataclasses.replace(plan, sel_kv_forced=False)


def _sel_w8(plan: Plan) -> Plan | None:
    """The block-outer selection forward on two warpgroups where the plan gives it one at a [64, 256] output tile
    (Gemma-2: loop_order.FORWARD_ONE_WARPGROUP): the plan's default before the one-warpgroup H100 timing (commit
    dc0b177), in which Triton 3.6 computes the 64-row S = Q K^T on both warpgroups; the benchmarks' baseline."""
    if plan.selection_order != "kv" or plan.sel_kv_warps != 4:
        return None
    if plan.sel_kv_bq * plan.sel_kv_gp * plan.spec.head_dim.v < FORWARD_ONE_WARPGROUP:
        return None
    return dataclasses.replace(plan, sel_kv_warps=8)


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
    "sel_unforced": _sel_unforced,
    "sel_w8": _sel_w8,
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
