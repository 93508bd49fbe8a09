"""Launch configs: the plan's defaults and tuning candidates (filled into `Plan.tuning` by specgen.compile.plan,
which imports this module: the functions here read a plan's tiles, they do not make them), and the tuning records,
the launch configs `specgen tune` measured best, kept beside the spec.

A record lives in `specs/<name>.tune.json`, keyed by spec hash, GPU name and Triton version; it is not part of the
spec's hash. `specgen build` bakes the configs of the records matching the spec's hash into the generated module
(one entry per GPU name; the module picks by device name at its first call, and falls back to the plan's defaults),
so nothing is tuned at import or first call. The generated header names the record's hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_if_changed
from .branches import NAMES, branches_of
from .footprint import MIN_DOT, SMEM_BUDGET, dq_smem, index_scores_smem, index_scores_stages, launch_model
from .loop_order import orders, scatter_backward
from .records import read_record, record_path  # noqa: F401 (record_path: re-exported for callers of tuning)
from ..model.spec import Spec

# The forward attention kernels: one AttentionTile of the plan each (plan.<branch>), named by their branch.
KERNELS_WITH_TILES = NAMES


def tunable_kernels(spec: Spec) -> tuple[str, ...]:
    """The kernels with candidate configs (tuned by `specgen tune`, autotuned with SPECGEN_AUTOTUNE=1): the forward
    attention kernels, then the backward dQ and dK/dV kernels of each branch. The block-outer selection kernels
    (loop_order: kv, docs/selection_order.md) run on the plan's tiles and are not among them."""
    forward_order, backward_order = orders(spec)
    branches = branches_of(spec)
    return (tuple(b.forward_config for b in branches if not (b.name == "selection" and forward_order == "kv"))
            + tuple(c for b in branches if not (b.name == "selection" and backward_order == "kv")
                    for c in b.backward_configs)
            + (("selection_kv_bwd",) if backward_order == "kv" else ())
            + (("selection_scatter",) if scatter_backward(spec) else ()))


def default_configs(plan) -> dict:
    """{kernel: config} of every kernel of the plan's spec, from its tiles (`Plan.tuning.defaults`)."""
    spec = plan.spec
    configs = {}
    for kind in KERNELS_WITH_TILES:
        tile = getattr(plan, kind)
        if tile is not None:
            configs[kind] = {"bt": tile.bt, "block_n": tile.block_n, "num_warps": tile.num_warps,
                             "num_stages": tile.num_stages}
    if "selection" in configs and selection_forward_replicates(plan):
        # The form of selection_forward_variants that computes S once and prefetches the next trip's units
        # (SELECTION_FORWARD_DEFAULT): 1.33-1.38x the replicated form on the H200.
        configs["selection"].update(key_split=1, prefetch=1)
    if spec.selection is not None and spec.selection.scorer == "compression":
        # The block scorer: the plan's warps and pipeline stages (plan.score_stages). A tuning record's entry runs
        # as written: one without num_stages runs at Triton's 3 (runtime.launches.Forward.select_blocks).
        configs["select"] = {"num_warps": plan.score_warps, "num_stages": plan.score_stages}
    elif spec.selection is not None:
        configs.update(index_configs(plan))
    # Backward: programs hold fp32 dQ, or dK and dV, tiles in registers: 8 warps once the head dims reach 256.
    bwd = plan.backward
    configs["preprocess"] = {"rows": max(16, min(64, 8192 // spec.head_dim.v)), "num_warps": 4}
    for kind in spec.branches:
        if kind == "selection":
            if plan.selection_bwd_order == "kv":
                configs["selection_kv_bwd"] = dict(selection_kv_variants(plan)[SELECTION_KV_BWD_DEFAULT])
            warps_stages = {"num_warps": bwd.sel_num_warps, "num_stages": bwd.sel_num_stages}
            configs["selection_dq"] = {"bt": 1, "block_n": bwd.sel_dq_block_n, **warps_stages}
            # Keys per program: the inverse index's tile (a rendered constant of the kernel: not tunable).
            configs["selection_dkdv"] = {"bq": bwd.sel_bq, "block_n": bwd.sel_tile, **warps_stages}
            if bwd.scatter:
                configs["selection_scatter"] = dict(scatter_variants(plan)[SCATTER_BACKWARD_DEFAULT])
        else:
            variants_dq = dense_backward_variants(plan, f"{kind}_dq")
            variants_dkdv = dense_backward_variants(plan, f"{kind}_dkdv")
            default = dense_backward_default(spec)
            configs[f"{kind}_dq"] = dict(variants_dq[default["dq"]])
            configs[f"{kind}_dkdv"] = dict(variants_dkdv[default["dkdv"]])
    if spec.compression is not None and "compression" in spec.branches:
        configs["pool"] = {"tokens": 64, "chunks": 32, "blocks": 32, "num_warps": 4}
    return configs


# The compression and window backward's default variants (`dense_backward_variants`; docs/backward.md, "Launch
# configs of the compression and window backward"). Measured on the H100 at Llama-3-8B heads, T = 65536
# (bench/results/kernels/2026-12-06_cmp_bwd_llama3_6fe631f.jsonl): one warpgroup (4 warps) beats two at every kernel: dQ
# "w4" 6.5 ms against "wg" 9.0 and the former "rows64" 18.4; dK/dV "km2_w4_s3" 12.9 ms against "km2_wg" 17.2 and
# "rows64" 35.8 (the window's likewise). At 8 warps Triton lays a 64-row wgmma tile over both warpgroups (the
# former default computed S and dP twice); at 4 warps one warpgroup owns the tile. Heads wider than d_qk + d_v = 256
# keep the 8-warp forms: their fp32 dQ or dK + dV tiles spill at 4 warps (sm_90 compile: Gemma-2's dK/dV 1136 B,
# dQ 96 B), and no GPU figure says otherwise yet.
DENSE_BACKWARD_DEFAULT = {"dq": "w4", "dkdv": "km2_w4_s3"}
DENSE_BACKWARD_DEFAULT_WIDE = {"dq": "wg", "dkdv": "km2_wg"}


def dense_backward_default(spec) -> dict:
    """{"dq": variant, "dkdv": variant}: the default variant names of `dense_backward_variants` for this spec."""
    wide = spec.head_dim.qk + spec.head_dim.v > 256
    return DENSE_BACKWARD_DEFAULT_WIDE if wide else DENSE_BACKWARD_DEFAULT


def dense_backward_variants(plan, kernel: str) -> dict:
    """{name: launch config} of the compression or window dQ / dK/dV kernel (`<branch>_dq`, `<branch>_dkdv`) that
    bench/cmp_bwd.py times side by side on the GPU and bench/cmp_bwd_offline.py compiles; dense_backward_default
    names the plan's default. `bt` is query positions per program (dQ) or per trip (dK/dV): its rows are bt x the
    group's padded heads. Warps: 8 once d_qk + d_v reaches 256 (fp32 dQ or dK + dV tiles in registers), else 4.

    dQ: "rows64" (the former default: 64 rows), "wg" (64 rows per warpgroup: 128 at 8 warps), "wg_s3" (3 stages),
    "wg_k32" (32 keys a trip; "wg" itself where 64 keys would not fit shared memory), "w4" (64 rows, 4 warps).
    dK/dV: "rows64" (the former default: 64 rows x 64 keys, rows-major products), "km1" (the same, key-major:
    S^T = K Q^T), "km2" (key-major with the gate on P^T and dP^T, so dO's tile goes from memory to the matrix unit
    untouched), "km2_wg" (km2 with 64 keys per warpgroup where the fp32 dK + dV of 128 keys fit, i.e. d_qk + d_v
    <= 256: 128 keys at 8 warps, 32 rows; wider heads keep 64 keys at 8 warps, 32 rows), "km2_w4" (64 keys, 4
    warps, 32 rows), "km2_w4_s3" (its 3 stages), "km2_r64" (km2_wg's keys and warps with 64 rows)."""
    spec, gp = plan.spec, plan.backward.gp
    dims = spec.head_dim.qk + spec.head_dim.v
    warps = 8 if dims >= 256 else 4

    def bt(rows: int) -> int:
        return max(1, rows // gp)

    if kernel.endswith("_dq"):
        base = {"bt": bt(64), "block_n": 64, "num_warps": warps, "num_stages": 2}
        # 64 keys a trip where the resident Q, dO rows and two stages of K, V tiles fit shared memory, else 32
        # (Gemma's 256 dims at 128 rows: 262144 B for sm_90 at 64 keys, over the H100's 232448).
        rows = bt(16 * warps) * gp
        wg = {**base, "bt": bt(16 * warps), "block_n": 64 if dq_smem(spec, rows, 64, 2) <= SMEM_BUDGET else 32}
        return {"rows64": base, "wg": wg, "wg_s3": {**wg, "num_stages": 3}, "wg_k32": {**wg, "block_n": 32},
                "w4": {**base, "num_warps": 4}}
    split = {"split": 1024, "max_splits": 16} if kernel.startswith("compression") else {}
    base = {"bt": bt(64), "block_n": 64, "num_warps": warps, "num_stages": 2, "key_major": 0, **split}
    wide = dims > 256
    wg = {**base, "key_major": 2, "bt": bt(32), "block_n": 64 if wide else 128, "num_warps": 8}
    w4 = {**base, "key_major": 2, "bt": bt(32), "block_n": 64, "num_warps": 4}
    return {"rows64": base, "km1": {**base, "key_major": 1}, "km2": {**base, "key_major": 2}, "km2_wg": wg,
            "km2_w4": w4, "km2_w4_s3": {**w4, "num_stages": 3}, "km2_r64": {**wg, "bt": bt(64)}}


# The block-outer selection backward's default variant (`selection_kv_variants`). "w8" is the launch it had before
# it took a config (8 warps, one stage, 64 rows, rows-major products). bench/kernel_audit.py's sm_90 compile: at 8
# warps its 64-row S and dP products are computed by both warpgroups, and it spills (Llama-3-8B heads: 255
# registers, 232 spill bytes, 44 wgmma); "wg" (64 rows per warpgroup: 128 rows at 8 warps) has no replicated
# product and fewer spills at every spec audited (Llama-3 243 registers and none, 36 wgmma for twice the rows;
# Qwen2.5 245 / none; nsa_config_a 250 / none; Gemma-2 832 B against 1008; nsa_paper 320 B against 456), in
# 212992 B of shared memory at most (Gemma-2). The work items (SPLIT queries) stay the same, so only a trip's
# padding grows. Timed since (H200, commit 757f133, bench/results/kernels/
# 2026-12-06_selection_kv_bwd_llama3_757f133.jsonl): 16.32 ms against w8's 22.08 at Llama-3 heads, 64k.
SELECTION_KV_BWD_DEFAULT = "wg"


def selection_kv_variants(plan) -> dict:
    """{name: launch config} of the block-outer selection backward (`_selection_kv_bwd_kernel`, launch config
    `selection_kv_bwd`): `bq` queries x the plan's sel_kv_gp heads per trip (rows), `key_major` the products' form
    (0: S = Q K^T, P^T and dS^T through shared memory; 1: S^T = K Q^T; 2: key-major with the gate on P^T and dP^T,
    dO's tile straight to the matrix unit), warps and stages (the trip loop's pipelining).

    "w8" (the former launch: the plan's 64 rows at 8 warps, one stage), "w4" (64 rows at 4 warps: one warpgroup
    owns the 64-row tiles), "km2_w4" (its key-major-2 form), "km2_w4_s2" (2 stages), "wg" (64 rows per
    warpgroup: 128 rows at 8 warps), "km2_wg" (its key-major-2 form)."""
    bq, gp = plan.sel_kv_bq, plan.sel_kv_gp
    base = {"bq": bq, "key_major": 0, "num_warps": 8, "num_stages": 1}
    w4 = {**base, "num_warps": 4}
    wg = {**base, "bq": max(bq, 128 // gp)}
    return {"w8": base, "w4": w4, "km2_w4": {**w4, "key_major": 2}, "km2_w4_s2": {**w4, "key_major": 2, "num_stages": 2},
            "wg": wg, "km2_wg": {**wg, "key_major": 2}}


# The selection forward's forms (`selection_forward_variants`; the kernel's KEY_SPLIT and PREFETCH constexprs).
# bench/kernel_audit.py at DeepSeek-V3.2 (sm_90, aligned operands): the default (64 head rows, 64 keys, 8 warps, 2
# stages) computes its 64-row S = Q K^T in both warpgroups (Triton's chained-dot rule puts all warps along the
# rows): 255 registers, no spills, 221440 B shared, 76 wgmma. "ks" (key_split: S once, its 64 key columns split
# over the two warpgroups, as P @ V's 512 columns already are): 244 / 0 / 229632 B / 40 wgmma, nothing replicated.
# Timed (bench/variants_bench.py --only dsa_fwd, H200, commit 757f133; bench/results/kernels/
# 2026-12-06_dsa_fwd_variants_757f133.jsonl): V3.2's selection kernel 31.50 -> 22.81 ms at 16k (278 -> 384
# TFLOP/s) and 140.3 -> 105.3 ms at 64k (262 -> 349) with "ks_pf"; "ks" within 3% of it, the 32-key and 16-warp
# forms slower. So "ks_pf" is the default wherever the tile replicates; "w8" stays a named variant.
SELECTION_FORWARD_DEFAULT = "ks_pf"


def selection_forward_replicates(plan) -> bool:
    """Whether the plan's selection forward tile is one a warpgroup-replicated S would hit: 64-row multiples
    (wgmma tiles) fewer than 16 rows per warp (64 per warpgroup)."""
    tile = plan.selection
    rows = tile.bt * tile.gp
    return rows % 64 == 0 and rows < 16 * tile.num_warps


def selection_forward_variants(plan) -> dict:
    """{name: launch config} of the selection forward (`_selection_attention_kernel`, launch config `selection`)
    that bench/variants_bench.py --only dsa_fwd times beside the default, where `selection_forward_replicates`
    (DeepSeek-V3.2's 64 head rows at 8 warps); {} elsewhere. Fields beyond the tile: `key_split` (1: S computed
    once, its key columns split over the warpgroups; the kernel routes S's parts and P through branches that
    Triton's chained-dot rule does not follow) and `prefetch` (1: the next trip's selected units loaded a trip
    ahead, so that num_stages > 2 keeps num_stages - 1 key tiles in flight; without it the extra stage goes to
    the index load). Key tiles stay whole units.

    "w8" (the replicated form, the default before the timing), "ks" (key_split), "ks_pf" (with prefetch: the default), "ks_k32_s3" / "ks_k32_s4" (32 keys a trip, 3 /
    4 stages: two / three key tiles in flight, which 64-key tiles cannot fit beside the resident Q), "pf_k32_s4"
    (the replicated S at that pipeline depth), "ks_w16" (16 warps: 64 rows x 16 keys and 64 x 128 of P @ V per
    warpgroup). sm_90 compile at V3.2 (bench/kernel_audit.py): registers / spill bytes / shared B / wgmma:
    w8 255 / 0 / 221440 / 76 (S replicated); ks 244 / 0 / 229632 / 40; ks_pf 255 / 0 / 229376 / 40; ks_k32_s3
    242 / 0 / 188416 / 38; ks_k32_s4 248 / 0 / 225280 / 38; pf_k32_s4 254 / 0 / 221184 / 74 (replicated);
    ks_w16 128 / 48 / 229632 / 40."""
    if not selection_forward_replicates(plan):
        return {}
    base = {**default_configs(plan)["selection"], "key_split": 0, "prefetch": 0}
    ks = {**base, "key_split": 1}
    out = {"w8": base, "ks": ks, "ks_pf": {**ks, "prefetch": 1},
           "ks_k32_s3": {**ks, "prefetch": 1, "block_n": 32, "num_stages": 3},
           "ks_k32_s4": {**ks, "prefetch": 1, "block_n": 32, "num_stages": 4},
           "pf_k32_s4": {**base, "prefetch": 1, "block_n": 32, "num_stages": 4},
           "ks_w16": {**ks, "num_warps": 16}}
    if plan.selection.head_chunks > 1:  # chunks side by side (docs/tuning.md, "Head chunks side by side")
        out["ks_pf_ci"] = {**ks, "prefetch": 1, "chunk_inner": 1}
    unit = plan.unit
    return {n: c for n, c in out.items() if c["block_n"] % unit == 0 and c["block_n"] >= unit}


# The scatter backward's forms (`scatter_variants`; the kernel's KEY_MAJOR, KEY_SPLIT, PREFETCH and GP constexprs;
# docs/backward.md, "The scatter kernel's forms"). The default is the fastest form of the side-by-side timing
# (bench/dsa_bwd.py --forms all, V3.2 at 16k, H200, commit 6cc8fb1: bench/results/kernels/
# 2026-12-07_dsa_bwd_forms_h200_6cc8fb1.jsonl): "km_ks_k64" (key-major, 64 keys a trip, no product computed twice)
# 133.2 ms against the former "w8" 217.5 ms (164 against 101 TFLOP/s); "km_k128_w8" 136.5, "ks_k64" 163.5.
SCATTER_BACKWARD_DEFAULT = "km_ks_k64"


def scatter_base(plan) -> dict:
    """The scatter backward's tile from the plan (`plan.backward.scatter_*`), in the form before the form fields
    existed (row-major products, no key split, no prefetch)."""
    bwd = plan.backward
    return {"block_n": bwd.scatter_block_n, "key_major": 0, "key_split": 0, "prefetch": 0, "gp": bwd.scatter_gp,
            "reload": 0, "chunk_inner": 0, "num_warps": bwd.scatter_num_warps, "num_stages": bwd.scatter_num_stages}


def scatter_variants(plan) -> dict:
    """{name: launch config} of the scatter backward (`_selection_bwd_scatter_kernel`, launch config
    `selection_scatter`), the default (SCATTER_BACKWARD_DEFAULT) among them. Fields beyond the tile (BLOCK_N keys a
    trip, warps, stages): `key_major` (1: S^T = K Q^T and dQ^T += K^T dS^T, so the products' rows are keys or head
    dims: with the head rows, 32 for V3.2, as rows Triton 3.6 cannot use wgmma at all), `key_split` (1: no product
    is another's accumulator or takes a chained product's result except through a branch, so Triton does not lay
    every product's rows over all the warps: nothing computed twice), `prefetch` (1: the next trip's selected
    units loaded a trip ahead, so that num_stages > 1 pipelines the key tiles' loads) and `gp` (head rows a program:
    fewer rows, more programs, more atomics), `reload` (1: Q and dO loaded where each trip uses them instead of
    resident, so that 64 head rows fit shared memory).

    Forms that cut the atomic adds per selected (query, key) (docs/backward.md, "Fewer atomics"): "r64_rl_w16" (64
    head rows, reloaded, 16 warps: 2 programs a query instead of 4) and the split forms "split_k64" / "split_k128"
    (`dkdv_once` 1: the scatter kernel, in km_ks_k64's tile, computes dQ only; `_selection_bwd_scatter_dkdv_kernel`,
    one program per (query, kv head) over all the group's heads, adds dK/dV once per (query, key), `dkdv_block_n`
    keys a trip at `dkdv_warps` warps and `dkdv_stages` stages). The split forms only where the group fits one
    program's rows (plan.backward.scatter_once_rows <= 128). The split forms are not tuning candidates
    (`split_form`: the autotuner times the scatter kernel's launch alone); r64_rl_w16 is.

    Names: "w8" (the plan's tile: 32 keys, 8 warps, 1 stage), "w4", "k16_*", "k64_*" (keys a trip, warps),
    "km_k64_*", "km_k128_w8" (key-major), "s2" (2 stages), "pf_s2"/"pf_s3" (prefetch, 2/3 stages: one / two key
    tiles in flight), "ks_k64" (row-major at 64 keys, split), "km_ks_k64" (key-major at 64 keys, split),
    "km_ks_k64_pf" (and prefetch), "r16_w4"/"r16_w4_pf_s2" (16 head rows at 4 warps: twice the programs and
    atomics, no product replicated, two programs an SM). sm_90 compile reports: docs/backward.md's table
    (`python bench/dsa_bwd_offline.py`)."""
    base = scatter_base(plan)
    out = {"w8": base, "w4": {**base, "num_warps": 4}}
    for n in (16, 64):
        if n != base["block_n"]:
            out[f"k{n}_w8"] = {**base, "block_n": n}
            out[f"k{n}_w4"] = {**base, "block_n": n, "num_warps": 4}
    out["km_k64_w8"] = {**base, "block_n": 64, "key_major": 1}
    out["km_k64_w4"] = {**base, "block_n": 64, "key_major": 1, "num_warps": 4}
    out["km_k128_w8"] = {**base, "block_n": 128, "key_major": 1}
    out["s2"] = {**base, "num_stages": 2}
    out["pf_s2"] = {**base, "prefetch": 1, "num_stages": 2}
    out["pf_s3"] = {**base, "prefetch": 1, "num_stages": 3}
    out["ks_k64"] = {**base, "block_n": 64, "key_split": 1}
    out["km_ks_k64"] = {**base, "block_n": 64, "key_major": 1, "key_split": 1}
    out["km_ks_k64_pf"] = {**base, "block_n": 64, "key_major": 1, "key_split": 1, "prefetch": 1}
    if base["gp"] >= 32:
        out["r16_w4"] = {**base, "gp": 16, "num_warps": 4}
        out["r16_w4_pf_s2"] = {**base, "gp": 16, "num_warps": 4, "prefetch": 1, "num_stages": 2}
    km_ks = out["km_ks_k64"]
    if base["gp"] and -(-plan.group // base["gp"]) > 1:  # several head chunks a query: side by side
        out["km_ks_k64_ci"] = {**km_ks, "chunk_inner": 1}
        out["km_ks_k64_cr"] = {**km_ks, "chunk_inner": 2}  # ... each chunk starting at its own part of the keys
    if plan.group >= 64:
        out["r64_rl_w16"] = {**km_ks, "gp": 64, "reload": 1, "num_warps": 16}
    if plan.backward.scatter_once_rows <= 128:
        for n in (64, 128):
            out[f"split_k{n}"] = {**km_ks, "dkdv_once": 1, "dkdv_block_n": n, "dkdv_warps": 8, "dkdv_stages": 1}
    return out


def split_form(cfg: dict) -> bool:
    """Whether a scatter launch config is a split form (two kernels: dQ by the scatter kernel, dK/dV by the
    one-program-per-query kernel). Not a tuning candidate: the autotuner and `specgen tune` time the scatter
    kernel's launch alone."""
    return bool(cfg.get("dkdv_once"))


def index_configs(plan, key_major: bool | None = None, compact: bool = True) -> dict:
    """The indexer's launch configs: "select", the score kernel (`key_major`: the score tile's form, `bt` query
    positions and `block_n` keys per program; query-major runs the plan's index_bt x index_hp rows by index_bs-key
    tiles), and "index_topk", the radix select (`compact`: the threshold bucket compacted into a list of `list`
    entries, `chunk` units per trip). Defaults: the plan's form, compacted. `key_major`/`compact` pick the other
    variants (bench/indexer_bench.py times them side by side)."""
    key_major = plan.index_key_major if key_major is None else key_major
    if key_major:
        score = {"key_major": 1, "bt": plan.index_km_bt, "block_n": plan.index_km_keys, "num_warps": 4,
                 "num_stages": plan.index_km_stages}
    else:
        # Triton's default 3 stages (the launch before the key-major form passed none), fewer where the footprint
        # model does not fit them.
        stages = index_scores_stages(plan.spec, False, plan.index_bt * plan.index_hp, plan.index_bs)
        score = {"key_major": 0, "bt": plan.index_bt, "block_n": plan.index_keys, "num_warps": 4,
                 "num_stages": stages}
    if compact:
        topk = {"compact": 1, "chunk": plan.index_topk_chunk, "list": plan.index_topk_list,
                "num_warps": plan.index_topk_warps}
    else:  # the former select: four 8-bit passes and the output pass over the whole row, 1024 units a trip
        topk = {"compact": 0, "chunk": 1024, "list": plan.index_topk_list, "num_warps": 4}
    return {"select": score, "index_topk": topk}


def index_previous_default(plan) -> dict:
    """The indexer's default before 2026-12-07 (key-major tile at 2 stages, compacting select at 4 warps; on
    specs with a query-major tile only the select's warps differ): the baseline bench/indexer_bench.py times the
    default against."""
    cfg = index_configs(plan)
    score = {**cfg["select"], "num_stages": 2} if cfg["select"]["key_major"] else cfg["select"]
    return {"select": score, "index_topk": {**cfg["index_topk"], "num_warps": 4}}


def index_candidates(plan, kernel: str) -> list[dict]:
    """Tuning candidates of the indexer's kernels (`specgen tune`), the default first: both score-tile forms (the
    key-major one with 32-128 queries per program, 128 keys at 4 warps or 256 at 8, 2-3 stages), and the top-k's
    chunk widths and warps, compacted or not."""
    default = index_configs(plan)[kernel]
    unit = plan.unit
    if kernel == "select":
        spec, heads = plan.spec, plan.index_key_heads or MIN_DOT
        grid = [{"key_major": 1, "bt": bt, "block_n": max(n, unit), "num_warps": w, "num_stages": st}
                for bt in (32, 64, 128) for n, w in ((128, 4), (256, 8)) for st in (2, 3)
                if index_scores_smem(spec, True, heads, max(n, unit), st) <= SMEM_BUDGET]
        grid += [{**index_configs(plan, key_major=False)["select"], "num_warps": w} for w in (4, 8)]
    else:
        # (4096 units at 8 warps spills 16 bytes on sm_90: left out.)
        grid = [{**default, "chunk": c, "num_warps": w} for c in (1024, 2048, 4096) for w in (4, 8) if (c, w) != (4096, 8)]
        grid.append(index_configs(plan, compact=False)["index_topk"])
    out = [default]
    out += [c for c in grid if c not in out]
    return out


def _rows(plan, kernel: str, cfg: dict) -> int:
    """Query rows of one program (forward) or trip (backward) under `cfg`."""
    bwd = plan.backward
    if kernel in KERNELS_WITH_TILES:
        return cfg["bt"] * getattr(plan, kernel).gp
    if kernel == "selection_dq":
        return bwd.sel_dq_gp
    if kernel == "selection_dkdv":
        return cfg["bq"] * bwd.sel_dkdv_gp
    if kernel == "selection_scatter":
        return cfg.get("gp", bwd.scatter_gp)
    return cfg["bt"] * bwd.gp


def candidates(plan, kernel: str) -> list[dict]:
    """Launch configs worth timing for a tunable kernel, the default first, pruned by the footprint model
    (`footprint.launch_model`: shared memory and accumulator registers against the budgets) before compiling.

    Row packing stays the plan's (it fixes the group's head layout, and the backward's split and inverse-index
    sizes); key tiles, warps and pipeline stages vary. The selection kernels' key tiles are tied to the unit
    (whole units per forward tile; the backward's inverse-index tile), so there only warps and stages vary, plus
    the forward tile's width in whole units. The dK/dV kernels also vary their query rows per trip (`bq` of the
    selection, `bt` of the others: rows are that x the group's heads), and the compression and window dQ kernels
    their positions per program: more rows amortise the fp32 dK/dV accumulators over more work per trip (the paper
    configuration's selection dK/dV: 1.6x faster at twice the default rows). The compression and window dK/dV
    kernels also try their other product forms (`key_major`), and both kinds every named variant of
    `dense_backward_variants` that the model passes."""
    spec = plan.spec
    if kernel in ("select", "index_topk") and spec.selection.scorer == "indexer":
        return index_candidates(plan, kernel)
    default = default_configs(plan)[kernel]
    if plan.backward.scatter and kernel in ("selection_dq", "selection_dkdv"):
        # Deterministic mode's kernels in a module whose backward takes the scatter path: off the path a call runs
        # by default, so not searched (they run at the plan's tiles, or a tuning record's).
        return [default]
    if kernel == "selection_kv_bwd":
        # The named variants (no footprint model of this kernel: bench/kernel_audit.py compiles them).
        return [default] + [c for c in selection_kv_variants(plan).values() if c != default]
    model = launch_model(spec, kernel)
    named = []
    if kernel == "selection":
        unit = spec.selection.block
        widths = sorted({w for w in (default["block_n"], 32, 64, 128) if w % unit == 0 and w >= max(MIN_DOT, unit)})
        grid = [{**default, "block_n": n, "num_warps": w, "num_stages": st}
                for n in widths for w in (4, 8) for st in (1, 2, 3)]
    elif kernel == "selection_dkdv":
        bqs = sorted({default["bq"], *(b for b in (1, 2, 4, 8, 16) if b * _rows(plan, kernel, {"bq": 1}) >= MIN_DOT)})
        grid = [{**default, "bq": bq, "num_warps": w, "num_stages": st}
                for bq in bqs for w in (4, 8) for st in (1, 2, 3)]
    elif kernel == "selection_scatter":
        # Gathered keys per trip (any multiple of 16: the key loop walks the selected units' tokens), warps, stages.
        grid = [{**default, "block_n": n, "num_warps": w, "num_stages": st}
                for n in (16, 32, 64) for w in (4, 8) for st in (1, 2)]
        # The named forms join unpruned: the model's key tile counts a [rows, keys] score tile the key-major
        # form does not hold, and it knows neither the split nor the prefetch (bench/dsa_bwd_offline.py compiles
        # them; the tuner skips a config the compiler rejects).
        keyed = list(scatter_variants(plan).values())
    elif kernel.startswith("selection_"):
        grid = [{**default, "num_warps": w, "num_stages": st} for w in (4, 8) for st in (1, 2, 3)]
    elif kernel in KERNELS_WITH_TILES:
        grid = [{**default, "block_n": n, "num_warps": w, "num_stages": st}
                for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    elif kernel.endswith("_dkdv") or kernel in ("compression_dq", "window_dq"):
        # Query positions per trip or program (bt) are free here: a dK/dV program owns its keys and masks bound
        # its query range; a dQ program owns bt positions (its grid follows the config).
        bts = sorted({default["bt"], 2 * default["bt"],
                      *(b for b in (default["bt"] // 2,) if b and b * _rows(plan, kernel, {"bt": 1}) >= MIN_DOT)})
        grid = [{**default, "bt": bt, "block_n": n, "num_warps": w, "num_stages": st}
                for bt in bts for n in (32, 64, 128) for w in (4, 8) for st in (1, 2)]
        # The dK/dV grid is in the default's product form (key_major 2: key-major, the gate on P); the named
        # variants (bench/cmp_bwd.py's) bring the other forms (the candidate table stays small in the module).
        named = list(dense_backward_variants(plan, kernel).values())
    else:
        grid = [{**default, "block_n": n, "num_warps": w, "num_stages": st}
                for n in (32, 64, 128) for w in (4, 8) for st in (1, 2)]
    out = [default]
    for cfg in grid + named:
        if cfg not in out and model.fits(_rows(plan, kernel, cfg), cfg["block_n"], cfg["num_stages"],
                                         cfg["num_warps"]):
            out.append(cfg)
    # Named forms join unpruned, each once (two names can be one config: at two stages "s2" is "w8").
    joining = []
    if kernel == "selection_scatter":
        joining = [c for c in keyed if not split_form(c) and not c.get("chunk_inner")]
    if kernel == "selection":
        # The forward's named forms (the model knows neither the split S nor the prefetch; bench/kernel_audit.py
        # compiles them).
        joining = [c for c in selection_forward_variants(plan).values() if not c.get("chunk_inner")]
    # The chunk_inner forms (a launch order, not a tile) are not candidates: a candidate table has one set of fields
    # (render.candidate_table), and the order is timed by the benchmarks by name (docs/tuning.md, "Head chunks side
    # by side").
    for cfg in joining:
        if cfg not in out:
            out.append(cfg)
    return out


def candidates_for(plan) -> dict:
    """{kernel: candidates} of every tunable kernel of the plan's spec: what a module without a tuning record
    autotunes over on the GPU (`Plan.tuning.candidates`)."""
    return {k: candidates(plan, k) for k in tunable_kernels(plan.spec)}


def configs_for(plan, records: list[dict]) -> dict:
    """{"default": plan defaults, "<GPU name>": {kernel: config}} with the tuned entries (newest wins per GPU)."""
    out = {"default": {k: dict(v) for k, v in plan.tuning.defaults.items()}}
    for entry in sorted(records, key=lambda e: e.get("date", "")):
        out[entry["gpu"]] = {k: dict(v) for k, v in entry["configs"].items()}
    return out


def save_entry(spec_path: Path, entry: dict) -> Path:
    """Add or replace the entry for (spec hash, GPU, Triton version), atomically."""

    path = record_path(spec_path)
    data = read_record(path) if path.exists() else {"entries": []}
    key = (entry["spec_hash"], entry["gpu"], entry["triton"])
    data["entries"] = [e for e in data["entries"] if (e["spec_hash"], e["gpu"], e["triton"]) != key] + [entry]
    write_if_changed(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
