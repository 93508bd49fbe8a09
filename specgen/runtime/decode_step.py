"""The decode step driver, for every spec: argument checks, the branch launches, the selection (compression-scored:
group probabilities + block choice; indexer-scored: index scores + exact top-k) and the combine epilogue, all
parametrised by the generated module's DecodeDescriptor (its kernels, constants and launch configs).

The step is latency-critical (a batch-1 step is tens of microseconds on the GPU, captured in CUDA graphs): it does
the same torch ops and kernel launches, in the same order, as the code the templates used to render, never reads
a device value on the host, and reads the descriptor's fields where that code had literals. Runtime checks go
through the `specgen.runtime` package's functions, looked up at call time (tests replace some of them).
"""

from __future__ import annotations

import collections
import functools

import torch

from specgen import runtime as _rt  # isort: skip  (before triton: it may turn the CPU interpreter on)
from specgen.runtime import checks
from specgen.runtime.decode_cache import Cache
from specgen.runtime.decode_descriptor import DecodeDescriptor
from specgen.runtime import decode_fused, decode_persist, decode_whole

import triton  # noqa: E402


# Forms of the DSA step's kernels (docs/decode.md, "Forms of the DSA step"), picked by the descriptor's
# selection_form / index_form (DecodePlan's), all timed side by side by `specgen bench --decode --decode-forms`.
# The MLA selection kernel: name -> (FORM, keys per tile, stages); None: the plan's (split_tiles, num_stages).
# FORM 1 computes S once (the prefill's key_split), loads the next trip's units ahead (prefetch) and takes V from
# the key tile (MLA: V = K[..., :DV]).
SELECTION_FORMS = {"base": (0, None, None), "ks_pf": (1, 64, 1), "ks_pf_s2": (1, 64, 2), "ks_pf_k32": (1, 32, 3)}
# The index-score kernel: "tile" is one program per 64-key tile (`_decode_index_scores_kernel`); the others are
# `_decode_index_wide_kernel`, name -> (keys per tile, stages, warps, programs per SM): a program per chunk of
# keys, its key tiles pipelined, chunks sized for about `programs per SM` x SMs programs.
INDEX_FORMS = {"tile": None, "wide": (128, 3, 4, 4), "wide_k64": (64, 4, 4, 4), "wide_w8": (128, 3, 8, 2)}
# Extra pipeline stages of the wide index kernel on a paged cache: a key tile's rows depend on a block-table load,
# and Triton 3.6's pipeliner gives that load a stage of its own, which left the key tiles 2 buffers where a
# contiguous cache's get 3 (sm_90 compile of dsa_v32's wide_w8 at q_len 1 and 4: 42 / 68 KB of shared memory
# against 58 / 84 KB). 2 more stages restore the 3 key buffers (59 / 85 KB, no spills). The paged step's index
# kernel had taken 1.17-1.50x the contiguous one's time (H100, 2256469: 239 against 204 us at batch 64 x 64k,
# 635 against 423 at q_len 4); untimed since.
PAGED_INDEX_STAGES = 2
# The indexer top-k: name -> (K32, FOLD, LIST, segments a row at most: None for the plan's). "radix": four radix
# passes and the output pass over 64-bit keys; "radix32": the same launches in 32-bit key arithmetic (the prefill's `_ordered_key32`); "fold": 32-bit keys and
# the first pass folded into the index-score kernel (either index form), which adds each tile's histogram of top key
# bytes to a zeroed [rows, 256] int32 buffer by atomics: one launch and one read of the workspace fewer;
# "fold_list": "fold", and pass 2 lists each segment's units that can still be taken (top two digits at or above
# the threshold's), so pass 3 and the output walk those lists (about k / segments units) instead of the row;
# "fold_list_s64": up to 64 segments a row (the plan's topk_max_segments is 32): at batch 1 x 64k, segments of 1024
# units, one trip each in passes 1 and 2 (which no longer sum partial histograms in pass 1), against 32 partial
# histograms more to sum in pass 3 and the output.
TOPK_FORMS = {"radix": (False, False, False, None), "radix32": (True, False, False, None),
              "fold": (True, True, False, None), "fold_list": (True, True, True, None),
              "fold_list_s64": (True, True, True, 64)}
# LIST needs FOLD: with LIST, pass 1 zeroes the slot pass 0's histograms would live in (decode.j2), which only the
# fold leaves unread.
assert all(fold or not list_ for _, fold, list_, _ in TOPK_FORMS.values())


# The step's launch forms (DecodePlan.form; docs/decode.md "Launch forms"): "split", five launches; "cw", the split
# form with the compression and window branches in one launch (decode_fused.cmp_win, the fused form's first);
# "fused", three (specgen.runtime.decode_fused); "whole", one, a program per (sequence, kv group) doing its whole step
# (specgen.runtime.decode_whole); "whole_st", "whole" with odd programs running the window branch first (their
# top-n phases, which leave HBM idle, start at two moments); "auto", "whole" where decode_whole.fills (its programs
# fill the GPU) and it applies; below that rule "cw" where it applies (faster than "split" at batch 1 and 16, the
# batches timed: H100, commit b6eeeaf); else "split" (`launch_form`). "persist": the split form's programs in one
# launch, phases by virtual program ids taken in arrival order (specgen.runtime.decode_persist; untimed, so "auto"
# never picks it).
LAUNCH_FORMS = ("split", "cw", "fused", "whole", "whole_st", "persist", "auto")
WHOLE_FORMS = ("whole", "whole_st")
# How the split and cw forms' launches follow each other (DecodePlan.chain; docs/decode.md "Launch chains"):
# "plain", stream order; "pdl", programmatic dependent launch on a GPU (sm_90+): each kernel lets the next one
# launch at its start and waits for the one before it in its prologue (the template's pdl_prologue), so a launch's
# latency hides behind the kernel before it. The fused and whole forms do not use it.
CHAINS = ("plain", "pdl")


class Chain:
    """The launch keywords of a step's chain-aware kernels, in launch order: {} in the chain "plain" or off a GPU
    (the CPU interpreter has no griddepcontrol); in "pdl" PDL=1 for each, and launch_pdl for all but the first
    (which follows whatever ran before the step in plain stream order)."""

    def __init__(self, d: DecodeDescriptor, device):
        self.on = d.chain == "pdl" and torch.device(device).type == "cuda" and not _rt.interpreting()
        self.first = True

    def kw(self) -> dict:
        if not self.on:
            return {}
        kw = {"PDL": 1, "launch_pdl": not self.first}
        self.first = False
        return kw


# The compression scorer's top-n on the partials path (DecodePlan.topn_form; docs/decode.md "Launch forms"):
# name -> None ("row": `_decode_select_partials_kernel`, one program per (sequence, new query, kv group) over all
# its selection blocks) or (blocks a program at most, chunks a row aimed at, TICKET): `_decode_topn_chunks_kernel`,
# one program per chunk of a row's blocks (its TOP_K_PAD largest keys into a candidate buffer), merged by
# `_decode_topn_merge_kernel` (a second launch) or, with TICKET, by the row's last program (cache.tickets).
TOPN_FORMS = {"row": None, "chunked": (128, 16, False), "chunked_ticket": (128, 16, True)}
# The compression kernel's launch (DecodePlan.cmp_form; docs/decode.md "Compression forms"): name -> None
# ("cmp_base": the plan's tile and stages, 8 warps on the partials path, splits for split_waves waves) or
# CmpLaunch(keys per tile, stages, warps, programs resident per SM). The kernel is the same; a form changes its
# launch. At num_stages 2 Triton keeps one shared-memory buffer per load and issues the next tile's copies after the
# tile's last product, so every tile waits a full memory round trip; 3 stages keep one tile in flight while a tile
# is computed, 4 two. `resident` is what one SM holds at q_len 1 (sm_90 compile, bench/cmp_decode_offline.py:
# registers x threads and shared memory), and the splits are as many as run in one round of them
# (runtime.splits_in_one_round): 1 at batch 64 x 64k, 64 at batch 1. A tile must hold whole selection blocks on
# the partials path (its sums are per tile: the tile is also the partials' tile, score_tiles).
CmpLaunch = collections.namedtuple("CmpLaunch", "tile stages warps resident")
CMP_FORMS = {
    "cmp_base": None,
    "cmp_s3": CmpLaunch(64, 3, 8, None),       # two buffers (100.9 KB, 128 registers: 2 programs an SM); plan's splits
    "cmp_s3_r2": CmpLaunch(64, 3, 8, 2),       # the same, splits for one round of 2 programs an SM
    "cmp_s4_r1": CmpLaunch(64, 4, 8, 1),       # three buffers (141.8 KB: 1 an SM), two tiles in flight
    "cmp_k32_r3": CmpLaunch(32, 4, 4, 3),      # 32 keys, 4 warps, three buffers (71.9 KB, 168 registers: 3 an SM)
}


def check_forms(d: DecodeDescriptor) -> None:
    """The descriptor's forms exist and apply to its spec (ValueError naming the form)."""
    if d.form not in LAUNCH_FORMS:
        raise ValueError(f"{d.spec_name}: unknown launch form {d.form!r}; known: {list(LAUNCH_FORMS)}")
    if d.form in ("fused", "cw") and (why := decode_fused.supports(d)) is not None:
        raise ValueError(f"{d.fn}: form {d.form!r}: {why}; use form 'split'")
    if d.form == "persist" and (why := decode_persist.supports(d)) is not None:
        raise ValueError(f"{d.fn}: form 'persist': {why}; use form 'split'")
    if d.form in WHOLE_FORMS and (why := decode_whole.supports(d)) is not None:
        raise ValueError(f"{d.fn}: form {d.form!r}: {why}; use form 'split' (or 'auto', which runs 'cw' or 'split' "
                         f"there)")
    if d.combine_sb not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"{d.spec_name}: combine_sb {d.combine_sb} (splits the epilogue loads at once) must be a "
                         f"power of two from 1 to 64")
    if d.selection_form not in SELECTION_FORMS:
        raise ValueError(f"{d.spec_name}: unknown selection form {d.selection_form!r}; known: {list(SELECTION_FORMS)}")
    if d.selection_form != "base" and not d.mla:
        raise ValueError(f"{d.spec_name}: selection form {d.selection_form!r} needs MLA (V = K[..., :DV]); use 'base'")
    if d.selection_form != "base" and (d.dqk == d.dv or 1 << (d.dqk.bit_length() - 1) != d.dv):
        # FORM 1 takes V from the key tile's first part and masks S through the other parts' products: the key's
        # first power-of-two part must be the value (576 = 512 + 64 with DV 512), and another part must follow.
        raise ValueError(f"{d.spec_name}: selection form {d.selection_form!r} needs head_dim.qk split as head_dim.v "
                         f"plus a rope part (a power-of-two DV below QK < 2 DV), not {d.dqk}/{d.dv}; use 'base'")
    tile = SELECTION_FORMS[d.selection_form][1]
    if tile and tile % d.sel_block:
        raise ValueError(f"{d.spec_name}: selection form {d.selection_form!r} walks {tile}-key tiles, not whole "
                         f"units of {d.sel_block} tokens; use one with a multiple of {d.sel_block}")
    if d.index_form not in INDEX_FORMS:
        raise ValueError(f"{d.spec_name}: unknown index form {d.index_form!r}; known: {list(INDEX_FORMS)}")
    if d.index_form != "tile" and not d.indexer:
        raise ValueError(f"{d.spec_name}: index form {d.index_form!r} needs an indexer; use 'tile'")
    if d.topk_form not in TOPK_FORMS:
        raise ValueError(f"{d.spec_name}: unknown top-k form {d.topk_form!r}; known: {list(TOPK_FORMS)}")
    if d.topk_form != "radix" and not d.indexer:
        raise ValueError(f"{d.spec_name}: top-k form {d.topk_form!r} needs an indexer; use 'radix'")
    if d.chain not in CHAINS:
        raise ValueError(f"{d.spec_name}: unknown launch chain {d.chain!r}; known: {list(CHAINS)}")
    if d.topn_form not in TOPN_FORMS:
        raise ValueError(f"{d.spec_name}: unknown top-n form {d.topn_form!r}; known: {list(TOPN_FORMS)}")
    if d.topn_form != "row" and (d.scorer != "compression" or d.scoring != "partials"
                                 or d.topn_chunks_kernel is None):
        raise ValueError(f"{d.spec_name}: top-n form {d.topn_form!r} needs compression-scored selection on the "
                         f"partials path; use 'row'")
    if d.cmp_form not in CMP_FORMS:
        raise ValueError(f"{d.spec_name}: unknown compression form {d.cmp_form!r}; known: {list(CMP_FORMS)}")
    if d.cmp_form != "cmp_base":
        if not d.cmp_branch:
            raise ValueError(f"{d.spec_name}: compression form {d.cmp_form!r} needs the compression branch; use "
                             f"'cmp_base'")
        tile = CMP_FORMS[d.cmp_form].tile
        if d.scorer == "compression" and d.scoring == "partials" and tile % d.overlap_chunks:
            raise ValueError(f"{d.spec_name}: compression form {d.cmp_form!r} walks {tile}-key tiles, not whole "
                             f"selection blocks of {d.overlap_chunks} pooled keys (the partial sums are per tile); "
                             f"use one whose tile is a multiple of {d.overlap_chunks}, or 'cmp_base'")


def launch_form(d: DecodeDescriptor, B: int, device) -> str:
    """The launch form a step of B sequences runs: the descriptor's, with "auto" resolved by the batch rule
    ("whole" where decode_whole.fills and decode_whole.supports; below that batch rule "cw" where
    decode_fused.supports, as timed; "split" otherwise)."""
    if d.form != "auto":
        return d.form
    if decode_whole.fills(d, B, device):
        return "whole" if decode_whole.supports(d) is None else "split"
    return "cw" if decode_fused.supports(d) is None else "split"


@functools.lru_cache(maxsize=None)
def _forms_checked(d: DecodeDescriptor) -> bool:
    """check_forms once per descriptor (a step pays a dict lookup after the first): a plan or a caller's descriptor
    with a bad form fails with check_forms' message before any kernel runs, not a KeyError or a compile error."""
    check_forms(d)
    return True


@functools.lru_cache(maxsize=None)
def split_rows(d: DecodeDescriptor, kind: str, q_len: int) -> tuple[int, int, int]:
    """(QLP, GP, HEAD_CHUNKS) of a branch kernel: new queries x group heads per program, at least 16 rows for the
    matrix unit (selection programs take one new query each: each has its own selected keys). Cached per
    (descriptor, branch, q_len): a step reads it without recomputing (triton.cdiv and next_power_of_2 are not free
    on the host)."""
    qlp = 1 if kind == "selection" else triton.next_power_of_2(q_len)
    gp = min(triton.next_power_of_2(d.group), d.max_gp)
    gp = max(gp, 16 // qlp)
    return qlp, gp, triton.cdiv(d.group, gp)


@functools.lru_cache(maxsize=None)
def cmp_launch(d: DecodeDescriptor, scores: int = 2, q_len: int = 1) -> CmpLaunch:
    """The compression kernel's (tile, stages, warps, resident) in the descriptor's cmp_form (CMP_FORMS) for a step
    with `scores` (0 none, 1 logits, 2 partials) and `q_len`; "cmp_base" is the plan's tile and stages, 8 warps on
    the partials path (at 4 its tile-to-block map spills on sm_90 at q_len 4: 255 registers, 880 bytes) or where a
    program's rows x DV reach 16384, 4 otherwise, and no `resident` (the plan's split rule). The partials' tile
    (score_tiles, topn) is this tile."""
    form = CMP_FORMS[d.cmp_form]
    if form is not None:
        return form
    qlp, gp, _ = split_rows(d, "compression", q_len)
    warps = 4 if qlp * gp * d.dv < 16384 and scores != 2 else 8
    return CmpLaunch(d.split_tiles["compression"], d.num_stages, warps, None)


def cmp_splits(d: DecodeDescriptor, programs: int, n_keys: int, device) -> int:
    """The compression branch's split count: the form's one-round rule (CmpLaunch.resident) or the plan's waves."""
    c = cmp_launch(d)
    return _rt.decode_splits(programs, triton.cdiv(max(n_keys, 1), c.tile), device, d.split_waves, d.max_splits,
                             resident=c.resident)


@functools.lru_cache(maxsize=None)
def score_tiles(d: DecodeDescriptor) -> tuple[int, int, int]:
    """(SC_W, SC_COLS, BACK) of the partials path: selection-block sums a compression tile stores (its own NSB
    blocks and the overlap_spill after them), their columns padded to a power of two >= 16 (tl.dot's N), and how
    many tiles back a selection block's sums may come from."""
    nsb = cmp_launch(d).tile // d.overlap_chunks
    width = nsb + d.overlap_spill
    return width, max(16, triton.next_power_of_2(width)), triton.cdiv(d.overlap_spill, nsb)


@functools.lru_cache(maxsize=None)
def topn_chunks(d: DecodeDescriptor, n_sel: int, name: str | None = None):
    """(CB, NCH, NCH_PAD, TICKET) of the descriptor's chunked top-n form (TOPN_FORMS; `name`: that form instead,
    as the persist form runs "chunked_ticket") over rows of n_sel selection
    blocks: about `aim` chunks a row of CB blocks (a power of two, at most `most`, at least TOP_K's power of two:
    tl.topk keeps that many of a chunk), NCH chunks, padded to a power of two for the merge's load; None in the
    "row" form. nsa_paper: 2049 blocks (128k + q_len) are 17 chunks of 128, 1025 (64k) 9 of 128."""
    form = TOPN_FORMS[name or d.topn_form]
    if form is None:
        return None
    most, aim, ticket = form
    pad = triton.next_power_of_2(d.top_k)
    cb = max(pad, min(most, triton.next_power_of_2(triton.cdiv(n_sel, aim))))
    nch = triton.cdiv(n_sel, cb)
    return cb, nch, triton.next_power_of_2(nch), ticket


def topn(d: DecodeDescriptor, sums, refs, lse_part, splits, seqlens, indices, tickets, QL, NCV, n_sel, chain=None):
    """The top-n of the partials path into indices [B, QL, HKV, TOP_K] (docs/decode.md "The step"): the
    descriptor's topn_form (TOPN_FORMS), from the compression kernel's partial sums and refs and its lse
    partials [splits, B, QL, HQ]; `tickets` (int32, zero, at least one per row) serve "chunked_ticket"; `chain`
    the step's Chain (None: plain)."""
    chain = chain or Chain(d, indices.device)
    rows = indices.shape[0] * QL * d.hkv
    tile = cmp_launch(d).tile
    common = dict(GP=triton.next_power_of_2(d.group), BLOCK_N=tile, NSPLIT_PAD=triton.next_power_of_2(splits),
                  BACK=score_tiles(d)[2])
    chunks = topn_chunks(d, n_sel)
    if chunks is None:
        # One kernel per (sequence, new query, kv group): each head's lse merged from the splits, the partial
        # sums rescaled by it and summed over the group's heads, then the top-n. The score row stays at <= 8
        # values a thread (238 registers at 4 warps for 2048 blocks, 125 at 8).
        nsel_pad = triton.next_power_of_2(n_sel)
        d.select_partials_kernel[(rows,)](
            sums, refs, lse_part, splits, seqlens, indices, indices.shape[0] * QL * d.hq, QL, NCV, n_sel,
            NSEL_PAD=nsel_pad, **common, num_warps=4 if nsel_pad <= 1024 else 8, **chain.kw())
        return indices
    cb, nch, nch_pad, ticket = chunks
    cand = torch.empty((rows, nch, triton.next_power_of_2(d.top_k)), dtype=torch.int64, device=indices.device)
    d.topn_chunks_kernel[(rows, nch)](
        sums, refs, lse_part, splits, seqlens, indices, cand, tickets, indices.shape[0] * QL * d.hq, QL, NCV, n_sel,
        nch, CB=cb, NCH_PAD=nch_pad, TICKET=ticket, **common, num_warps=4, **chain.kw())
    if not ticket:
        d.topn_merge_kernel[(rows,)](cand, indices, nch, NCH_PAD=nch_pad, num_warps=4, **chain.kw())
    return indices


def branch(d: DecodeDescriptor, kind, q, K, V, cache, seqlens, block_table, tcap, n_keys, num_splits, paged,
           idx=None, scores=None, chain=None):
    """One branch over the cache: each split's partial output and lse, (o [splits, B, q_len, HQ, DV] fp32, lse
    [splits, B, q_len, HQ] fp32, splits); merged in the step's epilogue (the combine kernel). The compression
    branch also writes the selection's inputs: `scores` is (logits,) on the logits path, (sums, refs) on the
    partials path (docs/decode.md). `chain`: the step's Chain (None: plain)."""
    chain = chain or Chain(d, q.device)
    B, QL = q.shape[0], q.shape[1]
    qlp, gp, chunks = split_rows(d, kind, QL)
    programs = B * d.hkv * chunks * (QL if kind == "selection" else 1)
    tile = d.split_tiles[kind]
    stages = d.num_stages
    warps = 4 if qlp * gp * d.dv < 16384 else 8
    if kind == "selection" and d.mla:
        form, form_tile, form_stages = SELECTION_FORMS[d.selection_form]
        tile, stages = form_tile or tile, form_stages or stages
    if kind == "compression":
        tile, stages, warps, _ = cmp_launch(d, len(scores or ()), QL)
        splits = num_splits or cmp_splits(d, programs, n_keys, q.device)
    else:
        splits = num_splits or _rt.decode_splits(programs, triton.cdiv(max(n_keys, 1), tile), q.device,
                                                 d.split_waves, d.max_splits)
    o_part = torch.empty((splits, B, QL, d.hq, d.dv), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, B, QL, d.hq), dtype=torch.float32, device=q.device)
    kernel = d.branch_kernels[kind]
    extra, flags = (), {}
    if kind == "selection":
        extra = (idx,)
        if d.mla:
            flags = {"FORM": form}
    elif kind == "compression":
        scores = scores or ()  # SCORES: 0 none, 1 logits, 2 partials; unused pointers get o_part
        logits = scores[0] if len(scores) == 1 else o_part
        sums, refs = scores if len(scores) == 2 else (o_part, o_part)
        extra = (logits, sums, refs)
        flags = {"SCORES": len(scores), "SC_COLS": score_tiles(d)[1] if len(scores) == 2 else 16}
    kernel[(programs, splits)](
        q, K, V, block_table, seqlens, o_part, lse_part, *extra,
        q.stride(0), q.stride(1), q.stride(2), K.stride(0), K.stride(1), V.stride(0), V.stride(1),
        block_table.stride(0), B, QL, tcap, splits, d.softmax_scale,
        PAGED=paged, QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, BLOCK_N=tile, WIDEN=d.widen, **flags,
        num_warps=warps, num_stages=stages, **chain.kw())
    return o_part, lse_part, splits


def index_scores(d: DecodeDescriptor, q_idx, k_flat, w_idx, block_table, seqlens, ws, extra, QL, tcap, n_units,
                 paged, qlp, hist0=None, chain=None):
    """The index-score launch of the descriptor's index_form (INDEX_FORMS): both write the same workspace
    entries; with `hist0` (the top-k form "fold": zeroed int32 [top-k rows, 256]) also the top-k's first pass;
    `chain` the step's Chain (None: plain)."""
    chain = chain or Chain(d, ws.device)
    fold = hist0 is not None
    args = (q_idx, k_flat, w_idx, block_table, seqlens, ws, hist0 if fold else ws, *extra, q_idx.stride(0),
            q_idx.stride(1), q_idx.stride(2), k_flat.stride(0), k_flat.stride(1), w_idx.stride(0), w_idx.stride(1),
            block_table.stride(0), QL, tcap, n_units, d.idx_scale)
    widen = _rt.interpreting() if d.fp8 else d.widen
    keys = n_units * d.sel_block
    wide = INDEX_FORMS[d.index_form]
    if wide is None or qlp * d.index_hp > 256:  # the wide tile's columns are one product's N (at most 256)
        d.index_scores_kernel[(d.hkv * ws.shape[0], triton.cdiv(keys, d.index_bs))](
            *args, PAGED=paged, QLP=qlp, BS=d.index_bs, WIDEN=widen, FOLD=fold,
            num_warps=8 if qlp * d.index_hp >= 256 else 4, **chain.kw())
        return
    bs, stages, warps, per_sm = wide
    if paged:
        stages += PAGED_INDEX_STAGES
    bs = max(bs, d.sel_block)
    warps = max(warps, min(8, bs * qlp * d.index_hp // 4096))  # q_len 4 x 64 heads: a [128, 256] fp32 tile
    rows = d.hkv * ws.shape[0]
    if ws.device.type == "cuda":
        chunks = max(1, min(triton.cdiv(keys, bs), triton.cdiv(per_sm * _rt._sm_count(ws.device), rows)))
    else:  # the CPU tests: two tiles a program, so both the chunks and the loop are exercised
        chunks = triton.cdiv(keys, 2 * bs)
    chunk = triton.cdiv(triton.cdiv(keys, chunks), bs) * bs
    d.index_wide_kernel[(rows, triton.cdiv(keys, chunk))](
        *args, chunk, PAGED=paged, QLP=qlp, BS=bs, WIDEN=widen, FOLD=fold, num_warps=warps, num_stages=stages,
        **chain.kw())


def topk_segments(n_units: int, rows: int, segment, programs: int, max_segments: int, sum_segments: int):
    """(segment, segments, BS, SC) of the decode top-k over `rows` rows of `n_units` units: each row is split into
    segments of `segment` units (default: from the shapes alone, about `programs` programs in all, at most
    `max_segments` per row, at least 1024 units each), walked in chunks of BS (a power of two dividing the
    segment), partial histograms summed SC at a time."""
    if segment is None:
        segments = max(1, min(programs // rows, triton.cdiv(n_units, 1024), max_segments))
        segment = triton.cdiv(triton.cdiv(n_units, segments), 1024) * 1024
    segments = triton.cdiv(max(n_units, 1), segment)
    bs = min(1024, segment & -segment)  # the chunk each program walks its segment by: a power of two dividing it
    sc = min(sum_segments, triton.next_power_of_2(segments))
    return segment, segments, bs, sc


def fold_buffer(d: DecodeDescriptor, rows: int, n_units: int, device):
    """The zeroed histogram [rows, 256] int32 that the index-score kernel fills with the top-k's first pass in the
    top-k form "fold"; None in the other forms and where no row can have more than TOP_K candidates."""
    if not TOPK_FORMS[d.topk_form][1] or n_units <= d.top_k:  # FOLD
        return None
    return torch.zeros((rows, 256), dtype=torch.int32, device=device)


def topk(d: DecodeDescriptor, ws, seqlens, indices, segment, programs: int, max_segments: int, sum_segments: int,
         hist0=None, chain=None):
    """The exact top-k of every row of the index-score workspace ws [B, HKV, QL, n_units] by the selection rule,
    into indices [B, QL, HKV, TOP_K] (int32, ascending, -1 padding last), positions from `seqlens` on the device:
    four radix passes, each a launch of (row, segment) programs writing per-segment 256-bin histograms, then one
    that writes every segment's winners at its offset; a cache of at most TOP_K units needs only the last. The
    descriptor's topk_form (TOPK_FORMS) picks the keys' arithmetic and whether pass 0 is `hist0` [rows, 256], the
    histogram the index-score kernel made (fold_buffer). `chain`: the step's Chain (None: plain)."""
    chain = chain or Chain(d, ws.device)
    B, G, QL, n_units = ws.shape
    rows = B * G * QL
    k32, fold, listed, most = TOPK_FORMS[d.topk_form]
    max_segments = most or max_segments
    if fold and n_units > d.top_k and (hist0 is None or hist0.shape != (rows, 256)):
        raise ValueError(f"{d.spec_name}: top-k form {d.topk_form!r} needs the first pass's histogram hist0 "
                         f"[{rows}, 256] from the index-score kernel (decode_step.fold_buffer)")
    segment, segments, bs, sc = topk_segments(n_units, rows, segment, programs, max_segments, sum_segments)
    part = torch.empty((2, rows, segments, 256), dtype=torch.int32, device=ws.device)
    above = torch.empty((rows, segments), dtype=torch.int32, device=ws.device)
    state = torch.empty((rows, 4, 2), dtype=torch.int64, device=ws.device)
    args = (QL, n_units, rows, segments, segment)
    # "fold_list": each segment's list of units still in the running after pass 2 (at most the segment).
    listed = listed and n_units > d.top_k
    lst = torch.empty((rows, segments, segment) if listed else (1,), dtype=torch.int32, device=ws.device)
    count = torch.empty((rows, segments), dtype=torch.int32, device=ws.device) if listed else lst
    if n_units > d.top_k:
        for p in range(1 if fold else 0, 4):
            d.topk_hist_kernel[(rows, segments)](ws, seqlens, part, above, state, hist0 if fold else part, lst, count,
                                                 *args, P=p, BS=bs, SC=sc, K32=k32, FOLD=fold, LIST=listed,
                                                 num_warps=4, **chain.kw())
    d.topk_write_kernel[(rows, segments)](ws, seqlens, indices, part, above, state, lst, count, *args, BS=bs, SC=sc,
                                          K32=k32, LIST=listed, num_warps=4, **chain.kw())
    return indices


def check_step_args(d: DecodeDescriptor, q, cache, cache_seqlens, block_table, gates, q_idx, w_idx, out,
                    num_splits):
    """The step's argument checks (ArgumentError naming the argument): (q, gates, q_idx, w_idx, seqlens,
    block_table, out, num_splits) as the kernels take them. The cache's own lengths and pages are trusted (it
    checked every prefill/append on the host). Explicit ones are range-checked on the host when their values are
    there (CPU tensors), else on the device without a sync: out-of-range values are clamped (no kernel reads or
    writes outside the cache) and flag cache.error_flag, raised by cache.check_errors() /
    runtime.raise_if_flagged(cache) (docs/decode.md)."""
    fn = d.fn
    if not (isinstance(cache, Cache) and cache.DESCRIPTOR is d):
        raise _rt.ArgumentError(f"{fn}: `cache` must be a {d.cache_class}, got {type(cache).__name__}")
    dims = {"B": (cache.batch, "cache")}
    q = _rt.check_tensor(fn, "q", q, ("B", "QL", d.hq, d.dqk), d.dtype, dims, cache.device, device_of="the cache")
    B, QL = q.shape[0], q.shape[1]
    _rt.check_q_len(fn, QL, d.max_q_len, d.spec_name)
    if d.gated:
        _rt.require(fn, "gates", gates, "the spec mixes its branches with gates")
        gates = _rt.check_tensor(fn, "gates", gates, ("B", "QL", d.hq, len(d.branch_names)), d.dtype, dims,
                                 cache.device, device_of="the cache")
    if d.indexer:
        why = "the spec ranks selection candidates with a lightning indexer"
        _rt.require(fn, "q_idx", q_idx, why)
        _rt.require(fn, "w_idx", w_idx, why)
        hi = d.hkv * d.idx_heads
        q_idx = _rt.check_tensor(fn, "q_idx", q_idx, ("B", "QL", hi, d.idx_dim), d.dtype, dims, cache.device,
                                 device_of="the cache")
        w_idx = _rt.check_tensor(fn, "w_idx", w_idx, ("B", "QL", hi), d.dtype, dims, cache.device,
                                 device_of="the cache")
    if cache_seqlens is None:
        _rt.check_queries_fit(fn, QL, cache.host_seqlens)
        seqlens = cache.seqlens
    else:
        seqlens = _rt.check_seqlens_arg(fn, cache_seqlens, B, cache.device)
        seqlens = _rt.guard_cache_seqlens(fn, seqlens, QL, cache.seqlens, cache.host_seqlens, cache.error_flag)
    if block_table is None:
        block_table = cache.block_table
    elif not cache.paged:
        raise _rt.ArgumentError(f"{fn}: `block_table` given for a contiguous cache; build the cache with num_pages")
    else:
        block_table = _rt.check_block_table(fn, block_table, B, cache.num_pages, cache.device, sync=False)
        if block_table.shape[1] < cache.block_table.shape[1]:
            raise _rt.ArgumentError(f"{fn}: `block_table` has {block_table.shape[1]} columns but the cache's has "
                                    f"{cache.block_table.shape[1]}; pass a table at least as wide (the step reads "
                                    f"every page of a sequence's length)")
        block_table = _rt.guard_block_table(fn, block_table, seqlens, cache.num_pages, d.page_size,
                                            cache.error_flag)
    out = _rt.check_out(fn, out, (B, QL, d.hq, d.dv), d.dtype, cache.device)
    if num_splits is not None:
        num_splits = _rt.check_count(fn, "num_splits", num_splits, 1, 1024)
    return q, gates, q_idx, w_idx, seqlens, block_table, out, num_splits


def step(d: DecodeDescriptor, q, cache, cache_seqlens=None, block_table=None, gates=None, q_idx=None, w_idx=None,
         out=None, num_splits=None, return_lse=False, return_indices=False, topk_fn=None):
    """One decoding step (the generated `<family>_decode` documents it); `topk_fn(ws, seqlens, indices, hist0=)` is
    the module's decode top-k (indexer-scored selection; `hist0=`: the fold forms' first pass, fold_buffer)."""
    _forms_checked(d)
    q, gates, q_idx, w_idx, seqlens, block_table, out, num_splits = check_step_args(
        d, q, cache, cache_seqlens, block_table, gates, q_idx, w_idx, out, num_splits)
    form = launch_form(d, q.shape[0], q.device)
    if form in WHOLE_FORMS:  # compression-scored selection in one launch (docs/decode.md "Launch forms")
        QL = q.shape[1]
        out, lse, indices = decode_whole.step(
            d, q, cache, seqlens, block_table, gates, out, split_rows(d, "compression", QL),
            split_rows(d, "selection", QL), score_tiles(d), cmp_launch(d, 2, QL)[:3], stagger=form == "whole_st")
        return checks.results(out, lse, indices, return_lse, return_indices)
    if form in ("fused", "cw", "persist"):  # the compression launch's geometry (docs/decode.md "Launch forms")
        QL = q.shape[1]
        rows_c = split_rows(d, "compression", QL)
        tile, stages, warps, _ = cmp_launch(d, 2, QL)
        cmp = (tile, stages, warps, cmp_splits(d, q.shape[0] * d.hkv * rows_c[2], cache.nc_cap - 1, q.device))
    if form == "persist":  # the split form's programs in one launch
        out, lse, indices = decode_persist.step(
            d, q, cache, seqlens, block_table, gates, out, num_splits, rows_c, split_rows(d, "selection", QL),
            score_tiles(d), topn_chunks(d, triton.cdiv(cache.max_context, d.sel_block), "chunked_ticket"), cmp)
        return checks.results(out, lse, indices, return_lse, return_indices)
    if form == "fused":  # compression-scored selection in three launches
        out, lse, indices = decode_fused.step(d, q, cache, seqlens, block_table, gates, out, num_splits,
                                              rows_c, split_rows(d, "selection", QL), score_tiles(d),
                                              topn_chunks(d, triton.cdiv(cache.max_context, d.sel_block)), cmp)
        return checks.results(out, lse, indices, return_lse, return_indices)
    B, QL = q.shape[0], q.shape[1]
    hkv = d.hkv
    paged = cache.paged
    T = cache.max_context
    chain = Chain(d, q.device)
    parts = {}
    indices = None
    scores = None
    NCV = cache.nc_cap - 1 if d.compressed else 0  # pooled rows a sequence may have (the last is the spare)
    if form == "cw":  # the split form's compression and window, with their partials, in one launch
        parts, scores = decode_fused.cmp_win(d, q, cache, seqlens, block_table, num_splits, rows_c, score_tiles(d),
                                             cmp)
    elif d.scorer == "compression":
        # The compression kernel writes the selection's inputs as it walks the pooled keys: its partial block sums
        # per tile and head, or (logits path) every base-2 logit.
        if d.scoring == "partials":
            tile = cmp_launch(d).tile
            f32 = dict(dtype=torch.float32, device=q.device)
            n_tiles = triton.cdiv(NCV, tile)
            scores = (torch.empty((B, QL, d.hq, n_tiles, score_tiles(d)[0]), **f32),
                      torch.empty((B, QL, d.hq, n_tiles), **f32))
        else:
            scores = (torch.empty((B, QL, d.hq, NCV), dtype=torch.float32, device=q.device),)
    if d.cmp_branch and "compression" not in parts:
        parts["compression"] = branch(
            d, "compression", q, cache.kc.flatten(0, 1), cache.vc.flatten(0, 1), cache, seqlens, block_table,
            cache.nc_cap, NCV, num_splits, False, scores=scores, chain=chain)
    if d.scorer == "compression":
        n_sel = triton.cdiv(T, d.sel_block)
        indices = torch.empty((B, QL, hkv, d.top_k), dtype=torch.int32, device=q.device)
        _, lse_part, splits = parts["compression"]
        if d.scoring == "partials":
            topn(d, *scores, lse_part, splits, seqlens, indices, cache.tickets, QL, NCV, n_sel, chain)
        else:
            # The group's probabilities P (one pass over the logits, each head's lse merged from the splits), then
            # the overlap rule and the top-n in one kernel per (sequence, new query, kv group).
            P = torch.empty((B, QL, hkv, NCV), dtype=torch.float32, device=q.device)
            if NCV > 0:
                d.group_probs_kernel[(B * QL * hkv, triton.cdiv(NCV, 128))](
                    scores[0], lse_part, splits, seqlens, P, B * QL * d.hq, QL, NCV,
                    GP=triton.next_power_of_2(d.group), BLOCK_N=128)
            d.select_blocks_kernel[(B * QL * hkv,)](P, seqlens, indices, QL, NCV, n_sel,
                                                    NSEL_PAD=triton.next_power_of_2(n_sel), num_warps=4)
    elif d.scorer == "indexer":
        # Index scores of the new queries over every cached index key (at block granularity reduced to each
        # block's log-sum-exp over its visible tokens): a workspace of B x HKV x QL x units fp32, written only at
        # the units each query can select; then the exact top-k of every (sequence, new query, kv group) row by
        # the selection rule, positions from `seqlens` on the device (no host sync).
        n_units = triton.cdiv(T, d.sel_block)
        ws = torch.empty((B, hkv, QL, n_units), dtype=torch.float32, device=q.device)
        k_idx_cache = cache.tensors["k_idx"]
        k_flat = k_idx_cache.view(-1, *k_idx_cache.shape[2:])
        qlp = max(triton.next_power_of_2(QL), triton.cdiv(16, d.index_hp))  # rows: new queries x indexer heads
        if d.fp8:
            # e4m3 queries with their row scales folded into the head weights, as in the prefill (runtime.fp8_rows).
            q_idx, w_idx = _rt.fp8_index_queries(q_idx, w_idx)
            extra = (cache.k_idx_scale,)
        else:
            extra = ()
        hist0 = fold_buffer(d, B * QL * hkv, n_units, q.device)  # the top-k form "fold": pass 0 in the scores
        index_scores(d, q_idx, k_flat, w_idx, block_table, seqlens, ws, extra, QL, cache.tcap, n_units, paged,
                     qlp, hist0, chain)
        indices = torch.empty((B, QL, hkv, d.top_k), dtype=torch.int32, device=q.device)
        topk_fn(ws, seqlens, indices, hist0=hist0, chain=chain)
    if d.scorer is not None:
        parts["selection"] = branch(
            d, "selection", q, cache.tensors[d.k_slc].flatten(0, 1), cache.tensors[d.v_slc].flatten(0, 1),
            cache, seqlens, block_table, cache.tcap, d.top_k * d.sel_block, num_splits, paged, indices, chain=chain)
    if d.window and "window" not in parts:
        parts["window"] = branch(
            d, "window", q, cache.tensors[d.k_win].flatten(0, 1), cache.tensors[d.v_win].flatten(0, 1),
            cache, seqlens, block_table, cache.tcap, min(T, d.window + QL), num_splits, paged, chain=chain)
    # Epilogue: merge each branch's splits by log-sum-exp, gate (o = sum_c g_c o_c, each branch its own softmax)
    # when the spec has gates, sum in fp32 and round once into `out`.
    lse = torch.empty((B, QL, d.hq, len(d.branch_names)), dtype=torch.float32, device=q.device)
    rows = B * QL * d.hq
    names = d.branch_names
    br, bd, sb, warps = _rt.decode_combine_tiles(rows, d.dv, max(parts[name][2] for name in names), q.device,
                                                 d.combine_sb)
    if d.gated:
        g = (gates, gates.stride(0), gates.stride(1), gates.stride(2))
    else:
        g = (out, 0, 0, 0)
    d.combine_kernel[(triton.cdiv(rows, br), triton.cdiv(d.dv, bd))](
        *[x for name in names for x in parts[name]], *g,
        out, lse, rows, QL, BR=br, BD=bd, SB=sb, num_warps=warps, **chain.kw())
    return checks.results(out, lse, indices, return_lse, return_indices)
