"""The "whole" launch form of the compression-scored decode step (DecodeDescriptor.form == "whole"; docs/decode.md,
"Launch forms"): ONE launch, `_decode_whole_kernel`, one program per (sequence, kv group) (the rows of the split
form's compression program: the step's new queries x the group's heads), each running its group's whole step with
no other program:

1. the compression branch over all the sequence's pooled keys (one split), writing the partial sums of the
   selection scores as the split form's compression kernel does, and its output and lse to an fp32 scratch;
2. a CTA barrier, then each new query's top-n from the program's own partials (the top-n form "row"'s code);
3. each new query's selection branch over its blocks, then the window branch;
4. a barrier, then the epilogue's tiles for the program's rows (each branch one split: the merge is the identity).

Every phase is the split form's code (the kernels' bodies in decode.j2, called with this program and split 0 of 1),
so the step equals the split form's at one split a branch, and the split form's at its own split counts within fp32
rounding, with the same blocks wherever the partial sums tie no closer than that rounding. No host reads, no
atomics, shapes from (B, q_len, cache capacity): deterministic and graph-capturable. `num_splits` does not apply
(each program walks its whole key ranges).

It pays only where its programs fill the GPU (`fills`): B x kv groups programs against the SM count. Below that the
split form's key-range splits keep every SM streaming; the form "auto" picks between them by that rule.
"""

from __future__ import annotations

import torch

from specgen import runtime as _rt  # isort: skip  (before triton: it may turn the CPU interpreter on)
from specgen.runtime.decode_descriptor import DecodeDescriptor, one_launch_refusal

import triton  # noqa: E402

# The batch rule (the one place it is written): "whole" where its programs, B x kv groups, are at least FILL x the
# GPU's SMs (one program an SM at least; two fit an SM at q_len 1, docs/decode.md); "split" below, where its splits
# spread each sequence's keys over the idle SMs. Timed at batch 64 (H100, commit c663314: whole at 3 stages 390 us
# against split's 420); batch 16, the rule's other side, not yet.
FILL = 1.0
# The whole kernel's pipeline stages where the descriptor keeps the base compression launch (cmp_base, 2 stages):
# every branch's key loop runs at the kernel's one stage count, and at 2 the whole step took 533 us against 390 at
# 3 (nsa_paper, batch 64 x 64k, H100, commit c663314; 128 registers and 100.9 KB either way: two programs an SM).
BASE_STAGES = 3


def supports(d: DecodeDescriptor) -> str | None:
    """Why descriptor `d` cannot run the whole form, or None when it can. The descriptor's top-n form is the split
    and fused forms' (the plan's chunked_ticket included): the whole kernel always runs the row form's top-n in its
    program (the chunked forms issue every load of a chunk first: 173-255 registers at its 8 warps, nsa_paper)."""
    why = one_launch_refusal(d, "whole", d.whole_kernel,
                             "runs the compression, its scores, the top-n and the selection in one program")
    if why is not None:
        return why
    if d.group > d.max_gp:
        return (f"{d.spec_name}'s kv groups of {d.group} query heads take {-(-d.group // d.max_gp)} programs of "
                f"{d.max_gp} rows each, and the whole form's top-n needs every head of a group in one program")
    return None


def programs(d: DecodeDescriptor, B: int) -> int:
    """The whole form's programs for a batch of B sequences: one per (sequence, kv group), whatever q_len."""
    return B * d.hkv


# Off the GPU (the CPU interpreter) the rule decides as on an H100's SMs, so the small batches of the CPU tests run
# the split form, as a GPU runs them (the whole form's own tests name it, or force this rule).
NOMINAL_SMS = 132


def fills(d: DecodeDescriptor, B: int, device) -> bool:
    """The batch rule: whether the whole form's programs fill the GPU (`FILL` x its SMs; NOMINAL_SMS off the GPU)."""
    device = torch.device(device)
    sms = _rt._sm_count(device) if device.type == "cuda" else NOMINAL_SMS
    return programs(d, B) >= FILL * sms


def launch(d: DecodeDescriptor, cmp: tuple) -> tuple:
    """The whole kernel's (tile, stages, warps): the compression form's, at least BASE_STAGES stages on cmp_base."""
    tile, stages, warps = cmp
    return tile, max(stages, BASE_STAGES) if d.cmp_form == "cmp_base" else stages, warps


def epilogue_cols(d: DecodeDescriptor, rows: int) -> int:
    """BD, the value columns a pass of the whole kernel's epilogue over its `rows` rows (QLP x GP): [rows, BD] fp32
    tiles of at most 4096 values (16 a thread at 8 warps), at least 16 columns."""
    return min(triton.next_power_of_2(d.dv), max(16, 4096 // rows))


def step(d: DecodeDescriptor, q, cache, seqlens, block_table, gates, out, rows_c, rows_s, tiles, cmp, stagger=False):
    """(out, lse, indices) of one step on checked arguments (decode_step.check_step_args), in one launch. The
    split form's geometry comes from decode_step (this module does not import it), as decode_fused's: rows_c /
    rows_s the (QLP, GP, HEAD_CHUNKS) of the compression (and window) and selection programs (`split_rows`; one
    head chunk each: `supports`), tiles the partials' (SC_W, SC_COLS, BACK) (`score_tiles`), cmp the compression
    kernel's (tile, stages, warps) in the descriptor's cmp_form (`cmp_launch` on the partials path), which the
    whole kernel runs at: its other branches take the compression form's stages and warps too (its split rule does
    not apply: one split). `stagger`: the form "whole_st" (odd programs run the window branch first; the same
    values). decode_step.check_forms has refused descriptors `supports` rejects."""
    B, QL = q.shape[0], q.shape[1]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    T = cache.max_context
    NCV = cache.nc_cap - 1
    qlp, gp, chunks = rows_c
    _, gp_s, chunks_s = rows_s
    assert chunks == chunks_s == 1, (rows_c, rows_s)  # supports(): a group's heads in one program
    tile_c, stages, warps = launch(d, cmp)
    width, sc_cols, back = tiles
    n_tiles = triton.cdiv(NCV, tile_c)
    sums = torch.empty((B, QL, d.hq, n_tiles, width), **f32)
    refs = torch.empty((B, QL, d.hq, n_tiles), **f32)

    def part():  # one split of a branch: [1, B, QL, HQ, DV] and [1, B, QL, HQ], as the split form's partials
        return torch.empty((1, B, QL, d.hq, d.dv), **f32), torch.empty((1, B, QL, d.hq), **f32)
    (o_c, l_c), (o_s, l_s) = part(), part()
    o_w, l_w = part() if d.window else (o_c, l_c)
    indices = torch.empty((B, QL, d.hkv, d.top_k), dtype=torch.int32, device=dev)
    lse = torch.empty((B, QL, d.hq, len(d.branch_names)), **f32)
    n_sel = triton.cdiv(T, d.sel_block)
    Kc, Vc = cache.kc.flatten(0, 1), cache.vc.flatten(0, 1)
    Ks, Vs = cache.tensors[d.k_slc].flatten(0, 1), cache.tensors[d.v_slc].flatten(0, 1)
    Kw, Vw = (cache.tensors[d.k_win].flatten(0, 1), cache.tensors[d.v_win].flatten(0, 1)) if d.window else (Ks, Vs)
    g = (gates, gates.stride(0), gates.stride(1), gates.stride(2)) if d.gated else (out, 0, 0, 0)
    d.whole_kernel[(programs(d, B),)](
        q, Kc, Vc, Ks, Vs, Kw, Vw, block_table, seqlens, o_c, l_c, o_s, l_s, o_w, l_w, sums, refs, indices,
        *g, out, lse, q.stride(0), q.stride(1), q.stride(2),
        Kc.stride(0), Kc.stride(1), Vc.stride(0), Vc.stride(1), Ks.stride(0), Ks.stride(1), Vs.stride(0),
        Vs.stride(1), Kw.stride(0), Kw.stride(1), Vw.stride(0), Vw.stride(1), block_table.stride(0),
        B, QL, cache.nc_cap, cache.tcap, n_sel, d.softmax_scale,
        PAGED=cache.paged, QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, GP_S=gp_s, BLOCK_C=tile_c,
        BLOCK_S=d.split_tiles["selection"], BLOCK_W=d.split_tiles["window"], WIDEN=d.widen, SC_COLS=sc_cols,
        GP_T=triton.next_power_of_2(d.group), NSEL_PAD=triton.next_power_of_2(n_sel), BACK=back,
        BD=epilogue_cols(d, qlp * gp), STAGGER=int(bool(stagger and d.window)), num_warps=warps,
        num_stages=stages)
    return out, lse, indices
