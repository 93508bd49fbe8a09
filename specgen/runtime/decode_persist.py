"""The "persist" launch form of the compression-scored decode step (DecodeDescriptor.form == "persist";
docs/decode.md, "Launch forms"; issue 19): the split form's programs, partials and split counts
(specgen.runtime.decode_step) in ONE launch, `_decode_persist_kernel`.

The "whole" form is one launch too, but of B x kv groups programs (4 at batch 1, where the GPU has 132 SMs); the
split form keeps every SM streaming at batch 1 but pays five dependent launches and their gaps. Here one 1-D grid
holds all the split form's programs, in its launch order: compression (x its splits), window, the top-n's chunk
programs (the "chunked_ticket" geometry, whatever the descriptor's top-n form), selection, combine tiles. Each
program's first act is to take a virtual id from an atomic counter, in arrival order, and the id's range is its
phase. A program of a later phase spins (an acquire atomic) on a counter raised (release, after a CTA barrier) by
the programs it reads from:
- a top-n chunk waits for its (sequence, kv group)'s compression programs; the row's last chunk merges the row
  (its ticket in `cache.tickets`) and counts the row as merged;
- a selection program waits for every row of its group merged;
- a combine tile waits for every branch program of the sequences its rows belong to, loads the partials past L1
  (.cg), and the last combine program (a final ticket) resets every counter to 0.
A program only waits for programs with smaller ids, which have already started (they took their id) and never wait
for a larger one: the wait cannot deadlock whatever order the GPU starts programs in, or however few fit at once.
The CPU interpreter runs programs one after another, so there every producer has finished before its consumer runs
and no spin loop turns.

The same code as the split form's (the branch bodies, `_decode_topn_chunk` / `_decode_topn_merge`,
`_decode_combine_tile`), at one num_warps and num_stages for the whole kernel (the compression's), so the same
blocks and, at the same split counts, the split form's values. Nothing is read back on the host and the shapes
depend only on (B, q_len, cache capacity): graph-capturable, and a replay finds the counters at 0. One cache's
counters serve one step at a time (as the fused form's tickets). Untimed.
"""

from __future__ import annotations

import torch

from specgen import runtime as _rt  # isort: skip  (before triton: it may turn the CPU interpreter on)
from specgen.runtime import decode_fused
from specgen.runtime.decode_descriptor import DecodeDescriptor, one_launch_refusal

import triton  # noqa: E402


def supports(d: DecodeDescriptor) -> str | None:
    """Why descriptor `d` cannot run the persist form, or None when it can: where the cw form applies
    (decode_fused.supports), with a compression branch and the base selection form (the kernel calls the selection
    body with its base tile and stages)."""
    return one_launch_refusal(d, "persist", d.persist_kernel,
                              "runs the split form's compression, top-n, selection and combine programs in one launch")


def step(d: DecodeDescriptor, q, cache, seqlens, block_table, gates, out, num_splits, rows_c, rows_s, tiles, topn,
         cmp):
    """(out, lse, indices) of one step on checked arguments (decode_step.check_step_args), in one launch. The split
    form's geometry comes from decode_step (this module does not import it), as decode_fused's: rows_c / rows_s the
    (QLP, GP, HEAD_CHUNKS) of the compression (and window) and selection programs (`split_rows`), tiles the
    partials' (SC_W, SC_COLS, BACK) (`score_tiles`), topn the chunked top-n's (CB, NCH, NCH_PAD, TICKET)
    (`topn_chunks` in the form "chunked_ticket"), cmp the compression kernel's (tile, stages, warps, splits) in the
    descriptor's cmp_form (num_splits, when given, wins over every branch's splits, as in the split form).
    decode_step.check_forms has refused descriptors `supports` rejects."""
    B, QL = q.shape[0], q.shape[1]
    dev = q.device
    T = cache.max_context
    qlp, gp, chunks = rows_c
    _, gp_s, chunks_s = rows_s
    tile_c, stages, warps, _ = cmp
    sc_cols, back = tiles[1], tiles[2]
    cb, nch, nch_pad, _ = topn
    # The compression's and window's buffers as the cw form's launch writes them; the selection's at the split
    # form's split count (decode_fused, as decode_step.branch's rules give them).
    parts, (sums, refs) = decode_fused.cmp_win_buffers(d, q, cache, num_splits, rows_c, tiles, cmp)
    o_c, l_c, s_c = parts["compression"]
    o_w, l_w, s_w = parts["window"] if d.window else (o_c, l_c, 0)
    programs = B * d.hkv * chunks
    programs_s = B * d.hkv * chunks_s * QL
    o_s, l_s, s_s = decode_fused.branch_partials(d, "selection", programs_s, d.top_k * d.sel_block, num_splits, B,
                                                 QL, dev)
    indices = torch.empty((B, QL, d.hkv, d.top_k), dtype=torch.int32, device=dev)
    cand = torch.empty((B * QL * d.hkv, nch, triton.next_power_of_2(d.top_k)), dtype=torch.int64, device=dev)
    lse = torch.empty((B, QL, d.hq, len(d.branch_names)), dtype=torch.float32, device=dev)
    rows = B * QL * d.hq
    br, bd, sb, _ = _rt.decode_combine_tiles(rows, d.dv, max(s_c, s_s, s_w), dev, d.combine_sb)
    n_sel = triton.cdiv(T, d.sel_block)
    Kc, Vc = cache.kc.flatten(0, 1), cache.vc.flatten(0, 1)
    Ks, Vs = cache.tensors[d.k_slc].flatten(0, 1), cache.tensors[d.v_slc].flatten(0, 1)
    Kw, Vw = (cache.tensors[d.k_win].flatten(0, 1), cache.tensors[d.v_win].flatten(0, 1)) if d.window else (Ks, Vs)
    g = (gates, gates.stride(0), gates.stride(1), gates.stride(2)) if d.gated else (out, 0, 0, 0)
    # The phases' programs, as the kernel counts them: compression and window, top-n chunks, selection, combine.
    grid = (programs * (s_c + s_w) + B * QL * d.hkv * nch + programs_s * s_s
            + triton.cdiv(rows, br) * triton.cdiv(d.dv, bd),)
    d.persist_kernel[grid](
        q, Kc, Vc, Ks, Vs, Kw, Vw, block_table, seqlens, o_c, l_c, o_s, l_s, o_w, l_w, sums, refs, indices, cand,
        cache.tickets, cache.persist_counters, *g, out, lse, q.stride(0), q.stride(1), q.stride(2),
        Kc.stride(0), Kc.stride(1), Vc.stride(0), Vc.stride(1), Ks.stride(0), Ks.stride(1), Vs.stride(0),
        Vs.stride(1), Kw.stride(0), Kw.stride(1), Vw.stride(0), Vw.stride(1), block_table.stride(0),
        B, QL, cache.nc_cap, cache.tcap, n_sel, nch, s_c, s_w, s_s, d.softmax_scale,
        PAGED=cache.paged, QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, GP_S=gp_s, HEAD_CHUNKS_S=chunks_s, BLOCK_C=tile_c,
        BLOCK_S=d.split_tiles["selection"], BLOCK_W=d.split_tiles["window"], WIDEN=d.widen, SC_COLS=sc_cols,
        GP_T=triton.next_power_of_2(d.group), NSPLIT_PAD=triton.next_power_of_2(s_c), BACK=back, CB=cb,
        NCH_PAD=nch_pad, BR=br, BD=bd, SB=sb, num_warps=warps, num_stages=stages)
    return out, lse, indices
