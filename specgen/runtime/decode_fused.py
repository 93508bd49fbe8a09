"""The "fused" launch form of the compression-scored decode step (DecodeDescriptor.form == "fused";
docs/decode.md, "Launch forms"): the same branch programs, partials, split counts and selection as the "split" form
(specgen.runtime.decode_step), in three dependent launches instead of five:

1. `_decode_cmp_win_kernel`: the compression branch (with the partials scores) and the window branch in one grid;
2. `_decode_select_merge_kernel`: the selection scores + top-n programs (one per row, or the chunked top-n forms'
   programs per chunk of a row: decode_step.TOPN_FORMS; "chunked" adds its merge launch), and beside them programs
   that merge the compression and window splits by log-sum-exp, gate them and write their lse and an fp32 partial
   output;
3. `_decode_selection_fused_kernel`: the selection branch, whose last split program per row group (an atomic
   ticket in `cache.tickets`, reset by that program) merges the selection splits and writes `out`.

Nothing is read back on the host and the shapes depend only on (B, q_len, cache capacity): the step is
graph-capturable, and a replay finds the tickets at 0. The output is deterministic (every merge runs in split
order, by one program); it equals the split form's within fp32 rounding (the branches are summed in another order:
compression + window, then selection), with the same selected blocks.
"""

from __future__ import annotations

import torch

from specgen import runtime as _rt  # isort: skip  (before triton: it may turn the CPU interpreter on)
from specgen.runtime.decode_descriptor import DecodeDescriptor

import triton  # noqa: E402


def supports(d: DecodeDescriptor) -> str | None:
    """Why descriptor `d` cannot run the fused form, or None when it can."""
    if d.scorer != "compression" or d.fused_kernels is None:
        return f"{d.spec_name} has no compression-scored selection (the fused form fuses its launches)"
    if d.scoring != "partials":
        return f"the fused form needs the partials scoring path ({d.spec_name} is on {d.scoring!r})"
    return None


def _splits(d: DecodeDescriptor, kind: str, programs: int, n_keys: int, num_splits, device) -> int:
    # The split form's rule (decode_step.branch), so the fused and persist forms split alike.
    return num_splits or _rt.decode_splits(programs, triton.cdiv(max(n_keys, 1), d.split_tiles[kind]), device,
                                           d.split_waves, d.max_splits)


def _partials(splits: int, B: int, QL: int, d: DecodeDescriptor, device):
    return (torch.empty((splits, B, QL, d.hq, d.dv), dtype=torch.float32, device=device),
            torch.empty((splits, B, QL, d.hq), dtype=torch.float32, device=device), splits)


def branch_partials(d: DecodeDescriptor, kind: str, programs: int, n_keys: int, num_splits, B: int, QL: int, device):
    """Branch `kind`'s fp32 partials (o [splits, B, QL, HQ, DV], lse [splits, B, QL, HQ], splits) at the split
    form's split count for `programs` programs over `n_keys` keys (num_splits, when given, wins)."""
    return _partials(_splits(d, kind, programs, n_keys, num_splits, device), B, QL, d, device)


def cmp_win_buffers(d: DecodeDescriptor, q, cache, num_splits, rows_c, tiles, cmp):
    """The buffers `cmp_win` writes, (parts, (sums, refs)): the compression's and window's partials (parts: branch
    -> (o, lse, splits)) at the split form's split counts, and the partials path's block sums and refs. The persist
    form's one launch writes the same ones."""
    B, QL = q.shape[0], q.shape[1]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    tile_c, splits_c = cmp[0], cmp[3]
    n_tiles = triton.cdiv(cache.nc_cap - 1, tile_c)
    sums = torch.empty((B, QL, d.hq, n_tiles, tiles[0]), **f32)
    refs = torch.empty((B, QL, d.hq, n_tiles), **f32)
    programs = B * d.hkv * rows_c[2]
    parts = {"compression": _partials(num_splits or splits_c, B, QL, d, dev)}
    if d.window:
        parts["window"] = branch_partials(d, "window", programs, min(cache.max_context, d.window + QL), num_splits,
                                          B, QL, dev)
    return parts, (sums, refs)


def cmp_win(d: DecodeDescriptor, q, cache, seqlens, block_table, num_splits, rows_c, tiles, cmp):
    """The fused form's first launch, also the "cw" form's: the compression branch with the partials path's sums
    and refs, and the window branch beside it in one grid (axis 2 the branch; the compression alone without a
    window). (parts, (sums, refs)): parts maps each branch to (o [splits, B, QL, HQ, DV], lse [splits, B, QL, HQ],
    splits), as the split form's branch launches leave them; the arguments as `step`'s."""
    B, QL = q.shape[0], q.shape[1]
    tile_c, stages_c, warps_c, _ = cmp
    sc_cols = tiles[1]
    parts, (sums, refs) = cmp_win_buffers(d, q, cache, num_splits, rows_c, tiles, cmp)
    qs = (q.stride(0), q.stride(1), q.stride(2))
    # The split form's programs and launch (8 warps in the base form: the partials' tile map spills at 4 at q_len 4).
    qlp, gp, chunks = rows_c
    programs = B * d.hkv * chunks
    Kc, Vc = cache.kc.flatten(0, 1), cache.vc.flatten(0, 1)
    rows_flags = dict(QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, WIDEN=d.widen)
    o_c, l_c, s_c = parts["compression"]
    if d.window:
        Kw, Vw = cache.tensors[d.k_win].flatten(0, 1), cache.tensors[d.v_win].flatten(0, 1)
        o_w, l_w, s_w = parts["window"]
        d.fused_kernels["cmp_win"][(programs, max(s_c, s_w), 2)](
            q, Kc, Vc, Kw, Vw, block_table, seqlens, o_c, l_c, o_w, l_w, o_c, sums, refs, *qs,
            Kc.stride(0), Kc.stride(1), Vc.stride(0), Vc.stride(1), Kw.stride(0), Kw.stride(1), Vw.stride(0),
            Vw.stride(1), block_table.stride(0), B, QL, cache.nc_cap, cache.tcap, s_c, s_w, d.softmax_scale,
            PAGED=cache.paged, BLOCK_C=tile_c, BLOCK_W=d.split_tiles["window"], SCORES=2, SC_COLS=sc_cols,
            **rows_flags, num_warps=warps_c, num_stages=stages_c)
    else:
        d.branch_kernels["compression"][(programs, s_c)](
            q, Kc, Vc, block_table, seqlens, o_c, l_c, o_c, sums, refs, *qs, Kc.stride(0), Kc.stride(1),
            Vc.stride(0), Vc.stride(1), block_table.stride(0), B, QL, cache.nc_cap, s_c, d.softmax_scale,
            PAGED=False, BLOCK_N=tile_c, SCORES=2, SC_COLS=sc_cols, **rows_flags, num_warps=warps_c,
            num_stages=stages_c)
    return parts, (sums, refs)


def step(d: DecodeDescriptor, q, cache, seqlens, block_table, gates, out, num_splits, rows_c, rows_s, tiles, topn,
         cmp):
    """(out, lse, indices) of one step on checked arguments (decode_step.check_step_args). The split form's
    geometry, from decode_step (this module does not import it): rows_c / rows_s the (QLP, GP, HEAD_CHUNKS) of the
    compression (and window) and selection programs (`split_rows`), tiles the partials' (SC_W, SC_COLS, BACK)
    (`score_tiles`), topn the chunked top-n forms' (CB, NCH, NCH_PAD, TICKET) (`topn_chunks`; None: the top-n
    form "row"), cmp the compression kernel's (tile, stages, warps, splits) in the descriptor's cmp_form
    (`cmp_launch` on the partials path, `cmp_splits`; num_splits, when given, wins over its splits). The window
    branch runs in the compression's launch, so it takes the form's stages and warps too.
    decode_step.check_forms has refused descriptors `supports` rejects."""
    B, QL = q.shape[0], q.shape[1]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    paged = cache.paged
    T = cache.max_context
    NCV = cache.nc_cap - 1
    tile_c = cmp[0]
    back = tiles[2]
    qs = (q.stride(0), q.stride(1), q.stride(2))
    # 1. Compression (+ window) in one launch.
    parts, (sums, refs) = cmp_win(d, q, cache, seqlens, block_table, num_splits, rows_c, tiles, cmp)
    s_c = parts["compression"][2]

    # 2. Scores + top-n (one program per sequence, new query, kv group) beside the merge of the other branches.
    n_sel = triton.cdiv(T, d.sel_block)
    nsel_pad = triton.next_power_of_2(n_sel)
    indices = torch.empty((B, QL, d.hkv, d.top_k), dtype=torch.int32, device=dev)
    rows = B * QL * d.hq
    others = [name for name in d.branch_names if name != "selection"]
    br, bd, sb, _ = _rt.decode_combine_tiles(rows, d.dv, max(parts[name][2] for name in others), dev, d.combine_sb)
    n_merge = triton.cdiv(rows, br) * triton.cdiv(d.dv, bd)
    top_rows = B * QL * d.hkv
    acc = torch.empty((rows, d.dv), **f32)
    lse = torch.empty((B, QL, d.hq, len(d.branch_names)), **f32)
    g = (gates, gates.stride(0), gates.stride(1), gates.stride(2)) if d.gated else (out, 0, 0, 0)
    if topn is None:  # top-n form "row": one program per row
        cb, nch, nch_pad, ticket = 1, 1, 1, False
        cand, warps = indices, 4 if nsel_pad <= 1024 else 8
    else:  # chunked: NCH programs per row, their candidates merged by the row's last one (ticket) or a launch
        cb, nch, nch_pad, ticket = topn
        cand = torch.empty((top_rows, nch, triton.next_power_of_2(d.top_k)), dtype=torch.int64, device=dev)
        warps = 4
    n_select = top_rows * nch
    d.fused_kernels["select_merge"][(max(n_select, n_merge), 2)](
        sums, refs, s_c, seqlens, indices, rows, QL, NCV, n_sel, n_select, cand, cache.tickets, nch,
        *[x for name in others for x in parts[name]], *g, acc, lse,
        GP=triton.next_power_of_2(d.group), BLOCK_N=tile_c, NSPLIT_PAD=triton.next_power_of_2(s_c),
        NSEL_PAD=nsel_pad, BACK=back, BR=br, BD=bd, SB=sb, CHUNKED=topn is not None, CB=cb, NCH_PAD=nch_pad,
        TICKET=ticket, num_warps=warps)
    if topn is not None and not ticket:
        d.topn_merge_kernel[(top_rows,)](cand, indices, nch, NCH_PAD=nch_pad, num_warps=4)

    # 3. Selection with the epilogue in each row group's last split program.
    qlp, gp, chunks = rows_s
    programs = B * d.hkv * chunks * QL
    o_s, l_s, s_s = branch_partials(d, "selection", programs, d.top_k * d.sel_block, num_splits, B, QL, dev)
    K, V = cache.tensors[d.k_slc].flatten(0, 1), cache.tensors[d.v_slc].flatten(0, 1)
    # The merge loads [SB splits, GP rows, BD columns] at once: at most 8192 floats (64 a thread at 4 warps).
    sb_s = min(8, triton.next_power_of_2(s_s))
    bd_s = max(16, min(triton.next_power_of_2(d.dv), 8192 // (sb_s * gp)))
    d.fused_kernels["selection"][(programs, s_s)](
        q, K, V, block_table, seqlens, o_s, l_s, indices, *qs, K.stride(0), K.stride(1), V.stride(0), V.stride(1),
        block_table.stride(0), B, QL, cache.tcap, s_s, d.softmax_scale, cache.tickets, acc, *g, out, lse,
        PAGED=paged, QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, BLOCK_N=d.split_tiles["selection"], WIDEN=d.widen,
        SB=sb_s, BD=bd_s, num_warps=4 if qlp * gp * d.dv < 16384 else 8, num_stages=d.num_stages)
    return out, lse, indices
