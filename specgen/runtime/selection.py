"""Host side of the block-outer (kv order) selection passes: the block -> queries work list.

In the kv order each program attends one selected block to a tile of the queries that chose it, so a block's keys
and values are read once per tile of queries instead of once per query (the query order's gathers: 2 * G FLOPs per
byte at GQA group G). The per-block softmax statistics and normalised partial outputs are written per (query, head,
slot) and merged by a second kernel (the flash-decoding merge). Built with no host sync: the grid is
an upper bound computed from shapes alone, and the programs past the real work exit at once.

Two forms build the same list, bit for bit (WORKLIST_FORMS, the `form` argument; the plan's `sel_kv_worklist`):
"torch", one sort of int64 (segment, query, slot) keys over every entry (the reference), and "triton", a counting
sort by two Triton kernels (runtime.worklist).
"""

from __future__ import annotations

import torch

from . import cdiv as _cdiv
from . import worklist as _worklist

WORKLIST_FORMS = ("torch", "triton")


def check_form(form: str) -> None:
    if form not in WORKLIST_FORMS:
        raise ValueError(f"kv-order work list: unknown `form` {form!r}; known: {list(WORKLIST_FORMS)} (the plan's "
                         f"sel_kv_worklist)")


def kv_order_worklist(indices: torch.Tensor, T: int, *, unit: int, tile_queries: int, skip_forced=None,
                      form: str = "torch"):
    """See `kv_order_segments`; without the per-segment item ranges (the forward and the dQ need none)."""
    return kv_order_segments(indices, T, unit=unit, tile_queries=tile_queries, skip_forced=skip_forced,
                             form=form)[:6]


def forced_slots(indices: torch.Tensor, t0: int, unit: int, initial: int, local: int) -> torch.Tensor:
    """[B, TC, Hkv, k] bool: the slots of `indices` (queries t0 .. t0 + TC - 1) that hold a forced block of their
    query: one of the first `initial` blocks or of the `local` most recent (the query's own block and before)."""
    t = t0 + torch.arange(indices.shape[1], device=indices.device).view(1, -1, 1, 1)
    u = indices.long()
    return (u >= 0) & ((u < initial) | (torch.div(t, unit, rounding_mode="floor") - u < local))


def kv_order_segments(indices: torch.Tensor, T: int, *, unit: int, tile_queries: int, skip_forced=None,
                      form: str = "torch"):
    """The work of the block-outer selection passes (forward, backward).

    `indices` [B, TC, Hkv, k] lists, per query and kv head, the selected units of `unit` tokens (ascending, -1 padding
    last), for TC consecutive query positions of sequences of T tokens (a chunk of the queries: TC <= T; positions
    are the chunk's, 0 .. TC - 1, and the units any of the T tokens'). Returns (qpos, slot, item_seg, item_start,
    item_end, n_items, seg_first_item, seg_items):
      - entries sorted by segment seg = (b * Hkv + g) * n_units + unit, queries ascending within a segment:
        qpos[e] the query position, slot[e] the unit's position in that query's list (where the partial output goes);
      - work items of at most `tile_queries` entries of one segment: item i covers entries
        item_start[i] : min(item_start[i] + tile_queries, item_end[i]) (item_end: its segment's end); items past
        the real work have item_seg = -1;
      - n_items, the grid size: an upper bound from the shapes (entries / tile + segments), no host sync;
      - per segment, its first item and item count: a segment's items are contiguous (the block-outer backward's
        reduce sums them in item order).
    `skip_forced` = (t0, initial, local): leave out the slots holding forced blocks (`forced_slots`; the forward's
    forced merge, plan sel_kv_forced, attends them per query tile instead).
    `form`: which of WORKLIST_FORMS builds it (the same outputs).
    """
    check_form(form)
    B, TC, Hkv, K = indices.shape
    n_units = _cdiv(T, unit)
    if form == "triton":
        qpos, slot, offsets = _worklist.sorted_entries(indices, n_units, skip_forced=skip_forced, unit=unit)
        return (qpos, slot, *_items(offsets, B * Hkv * n_units, indices.numel(), tile_queries))
    bg = torch.arange(B * Hkv, device=indices.device).view(B, 1, Hkv, 1)
    if skip_forced is not None:
        indices = torch.where(forced_slots(indices, skip_forced[0], unit, *skip_forced[1:]), -1, indices)
    return _segments(indices, bg * n_units + indices.long().clamp(min=0), B * Hkv * n_units, tile_queries)


def kv_order_segments_packed(indices: torch.Tensor, seq_of_row: torch.Tensor, cu_units: torch.Tensor,
                             n_batch_units: int, *, tile_queries: int, form: str = "torch"):
    """`kv_order_segments` of a packed batch (docs/varlen.md): `indices` [1, TC, Hkv, k] are packed rows (a chunk
    t0 .. t0 + TC - 1 of them, qpos counting from t0) whose units are relative to each row's sequence
    (`seq_of_row` [TC], int64). A unit of sequence i is numbered u = cu_units[i] + unit over the whole batch
    (`cu_units` [N+1]: per-sequence unit offsets; `n_batch_units` a host bound on their total), and a segment is
    seg = u * Hkv + g: one per (sequence, unit, kv group), so no block is shared across sequences, and the
    segments number O(total / unit + N) (never N x max_seqlen). The kernel decodes seg back (select_kv.j2)."""
    check_form(form)
    _, TC, Hkv, K = indices.shape
    if form == "triton":
        qpos, slot, offsets = _worklist.sorted_entries(indices, n_batch_units, seq_of_row=seq_of_row,
                                                       cu_units=cu_units)
        return (qpos, slot, *_items(offsets, n_batch_units * Hkv, indices.numel(), tile_queries))
    g = torch.arange(Hkv, device=indices.device).view(1, 1, Hkv, 1)
    u = cu_units[seq_of_row].view(1, TC, 1, 1) + indices.long().clamp(min=0)
    return _segments(indices, u * Hkv + g, n_batch_units * Hkv, tile_queries)


def _segments(indices: torch.Tensor, segment: torch.Tensor, n_seg: int, tile_queries: int):
    """The work list of `kv_order_segments`, given each (query, kv group, slot)'s segment [B, TC, Hkv, k] (any
    value where the slot is padding) and the number of segments."""
    B, TC, Hkv, K = indices.shape
    device = indices.device
    valid = indices >= 0
    t = torch.arange(TC, device=device).view(1, TC, 1, 1)
    slots = torch.arange(K, device=device).view(1, 1, 1, K)
    # key = ((segment * TC + query) * K + slot): unique (a query lists a unit once); padding sorts past every segment.
    key = (segment * TC + t) * K + slots
    padding = torch.iinfo(torch.int64).max
    key = torch.sort(torch.where(valid, key, padding).flatten()).values
    real = key != padding
    seg_of = torch.where(real, key // (TC * K), n_seg)
    qpos = torch.where(real, (key // K) % TC, 0).to(torch.int32)
    slot = torch.where(real, key % K, 0).to(torch.int32)
    offsets = torch.searchsorted(seg_of, torch.arange(n_seg + 1, device=device))
    return (qpos, slot, *_items(offsets, n_seg, B * TC * Hkv * K, tile_queries))


def _items(offsets: torch.Tensor, n_seg: int, n_entries: int, tile_queries: int):
    """(item_seg, item_start, item_end, n_items, seg_first_item, seg_items) of `_segments`, from each segment's
    first entry `offsets` [n_seg + 1] (int64; the real entries' count last) and the entries' number with padding
    (the grid's bound): the same for every work-list form."""
    device = offsets.device
    # Items per segment, and where each segment's items start in the item list.
    per_seg = (offsets[1:] - offsets[:-1] + tile_queries - 1) // tile_queries
    first_item = torch.cumsum(per_seg, 0) - per_seg
    n_items = _cdiv(n_entries, tile_queries) + n_seg
    item = torch.arange(n_items, device=device)
    seg = torch.searchsorted(first_item + per_seg, item, right=True)   # the segment whose item range holds `item`
    in_range = seg < n_seg
    seg_c = seg.clamp(max=n_seg - 1)
    item_start = offsets[seg_c] + (item - first_item[seg_c]) * tile_queries
    item_end = offsets[seg_c + 1]
    item_seg = torch.where(in_range, seg_c, -1).to(torch.int32)
    return (item_seg, item_start.to(torch.int64), item_end.to(torch.int64), n_items, first_item, per_seg)


def query_chunks(B: int, T: int, bytes_per_query: int, budget: int) -> list[tuple[int, int]]:
    """[(t0, t1), ...]: the query positions cut into chunks whose per-(query, slot) partial buffers, B *
    (t1 - t0) * bytes_per_query bytes, stay within `budget` (one chunk when they fit): the block-outer passes then
    hold a bounded buffer at any T and batch, at the cost of one more work list and reduce per chunk."""
    per_chunk = max(1, budget // max(1, B * bytes_per_query))
    return [(t0, min(T, t0 + per_chunk)) for t0 in range(0, T, per_chunk)] or [(0, 0)]
