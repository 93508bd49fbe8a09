"""The block-outer selection's work list sorted on the device by two Triton kernels: the "triton" work-list form
(runtime.selection.WORKLIST_FORMS; the "torch" form, one global sort of int64 keys, is the reference). Both give
the same entries, bit for bit.

The entries enumerated in flattened (b, t, g, slot) order and sorted stably by segment are the torch form's order
(segment, then query, then slot): a segment lies in one (batch, kv group), so within it the enumeration order is
(t, slot). A stable counting sort gives that order with no global sort and no int64 key per entry:
1. `_count_kernel`, one program per (chunk of QC query rows, row): +1 into counts[row, tile, unit] per valid entry
   (a row is a (batch, kv group), or a kv group of a packed batch; a tile is CPT consecutive chunks). Integer
   atomics: the counts do not depend on the order the adds land in.
2. torch, on that [rows, tiles, units] tensor (about TILE_PROGRAMS x units entries, not B * T * Hkv * k): the running sum
   over tiles, in place, and the segments' first positions (`offsets`) by a running sum in the caller's segment
   numbering.
3. `_place_kernel`, one program per (tile, row), walks its tile's chunks last to first. It sorts a chunk's QC x KP
   entries by (unit, position in the chunk) in registers; unit u's run of r entries takes positions
   offsets[seg] + cursor - r .. offsets[seg] + cursor - 1, and the cursor moves down by r. The cursor starts at the
   tile's running sum (the entries of u up to this tile's end) and ends at the tiles before it. The program owns
   its tile's cursors, so no atomics, and every position is fixed by the inputs alone.
Sizes come from shapes only (no host sync); memory is the outputs plus the counts, linear in T for a given number
of tiles (`tiles_for`)."""

from __future__ import annotations

import torch

from . import cdiv as _cdiv, next_pow2

import triton  # noqa: E402  (after specgen.runtime, which may turn the CPU interpreter on)
import triton.language as tl  # noqa: E402

# Entries a program sorts at once (QC query rows x k slots padded to a power of two), and below, the place-kernel
# programs the tiles aim at: 512 x 2048 measured at or near the best of a 256-2048 x 256-4096 sweep at 16k, 32k and
# 64k (H100, commit 2256469; docs/selection_order.md "Work list forms").
CHUNK_ENTRIES = 512
# Place-kernel programs the tiles aim at, over all rows (rows x tiles ~ this: an H100's 132 SMs hold several
# each); the counts take rows x tiles x units int32, so this also bounds them (linear in T).
TILE_PROGRAMS = 2048


@triton.jit
def _chunk_units(IDX, SEQ, CU_UNITS, row, chunk, TC, K, HKV, NU, s_b, s_t, s_g, s_k, t0, unit, initial, local,
                 QC: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr, SKIP: tl.constexpr):
    """The units [QC, KP] of chunk `chunk`'s entries of row `row` (numbered per row: the batch's units when
    PACKED) and which entries are real (not padding, not a forced slot when SKIP)."""
    t = chunk * QC + tl.arange(0, QC)
    k = tl.arange(0, KP)
    in_rows = t < TC
    inside = in_rows[:, None] & (k[None, :] < K)
    if PACKED:
        b = row * 0
        g = row
    else:
        b = row // HKV
        g = row % HKV
    ptr = IDX + b.to(tl.int64) * s_b + t[:, None].to(tl.int64) * s_t + g.to(tl.int64) * s_g + k[None, :] * s_k
    idx = tl.load(ptr, mask=inside, other=-1)
    valid = idx >= 0
    if SKIP:
        # runtime.selection.forced_slots: one of the first `initial` units, or of the `local` up to the query's own.
        forced = (idx < initial) | (((t0 + t) // unit)[:, None] - idx < local)
        valid = valid & (forced == 0)
    if PACKED:
        seq = tl.load(SEQ + t, mask=in_rows, other=0)
        u = (tl.load(CU_UNITS + seq, mask=in_rows, other=0)[:, None] + idx).to(tl.int32)
    else:
        u = idx
    # A unit past the numbering would land in another segment's range: left out (the inputs never hold one).
    valid = valid & (u < NU)
    return u, valid


@triton.jit
def _count_kernel(IDX, SEQ, CU_UNITS, COUNTS, TC, K, HKV, NU, NT, CPT, s_b, s_t, s_g, s_k, t0, unit, initial, local,
                  QC: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr, SKIP: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    u, valid = _chunk_units(IDX, SEQ, CU_UNITS, row, chunk, TC, K, HKV, NU, s_b, s_t, s_g, s_k, t0, unit, initial,
                            local, QC, KP, PACKED, SKIP)
    tile = chunk // CPT
    tl.atomic_add(COUNTS + (row * NT + tile).to(tl.int64) * NU + u, 1, mask=valid, sem="relaxed")


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _place_kernel(IDX, SEQ, CU_UNITS, CURSOR, OFFSETS, QPOS, SLOT, TC, K, HKV, NU, NT, CPT, s_b, s_t, s_g, s_k, t0,
                  unit, initial, local, QC: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr,
                  SKIP: tl.constexpr, KEY64: tl.constexpr):
    tile = tl.program_id(0)
    row = tl.program_id(1)
    CH: tl.constexpr = QC * KP
    i = tl.arange(0, CH)   # also an entry's place in its chunk, row-major: row * KP + slot
    cursor = CURSOR + (row * NT + tile).to(tl.int64) * NU
    if KEY64:
        none = 0x7FFFFFFFFFFFFFFF
    else:
        none = 0x7FFFFFFF
    for step in range(0, CPT):
        # Last chunk first: the cursors count down from the tile's end. Chunks past TC have no real entries.
        chunk = tile * CPT + CPT - 1 - step
        u, valid = _chunk_units(IDX, SEQ, CU_UNITS, row, chunk, TC, K, HKV, NU, s_b, s_t, s_g, s_k, t0, unit,
                                initial, local, QC, KP, PACKED, SKIP)
        u = tl.reshape(u, (CH,))
        valid = tl.reshape(valid, (CH,))
        if KEY64:
            key = u.to(tl.int64) * CH + i
        else:
            key = u * CH + i
        # Sorted by unit, then position in the chunk (row, slot): the enumeration order within each unit.
        key = tl.sort(tl.where(valid, key, none), 0)
        real = key != none
        us = (key // CH).to(tl.int32)
        es = (key % CH).to(tl.int32)
        head = (i == 0) | (tl.gather(us, tl.maximum(i - 1, 0), 0) != us)
        last = (i == CH - 1) | (tl.gather(us, tl.minimum(i + 1, CH - 1), 0) != us)
        run_end = tl.associative_scan(tl.where(last, i, CH), 0, _min_combine, reverse=True)
        cur = tl.load(cursor + us, mask=real, other=0)
        # Every lane of a run has read its cursor before the run's head moves it.
        tl.debug_barrier()
        rel = cur - 1 - (run_end - i)
        if PACKED:
            seg = us.to(tl.int64) * HKV + row
        else:
            seg = row.to(tl.int64) * NU + us
        pos = tl.load(OFFSETS + seg, mask=real, other=0) + rel
        tl.store(QPOS + pos, chunk * QC + es // KP, mask=real)
        tl.store(SLOT + pos, es % KP, mask=real)
        tl.store(cursor + us, rel, mask=real & head)
        # The next chunk's runs read these cursors, from other threads.
        tl.debug_barrier()


def tiles_for(TC: int, K: int, rows: int, queries_per_tile: int | None = None) -> tuple[int, int, int, int]:
    """(QC, KP, CPT, NT): query rows a chunk, slots padded, chunks a tile, tiles a row. `queries_per_tile` (rounded
    up to whole chunks) overrides the default, which aims at TILE_PROGRAMS programs over all rows."""
    KP = next_pow2(K)
    QC = max(1, min(CHUNK_ENTRIES // KP, next_pow2(TC)))
    n_chunks = _cdiv(TC, QC)
    if queries_per_tile is None:
        CPT = _cdiv(n_chunks, max(1, TILE_PROGRAMS // max(1, rows)))
    else:
        CPT = max(1, _cdiv(queries_per_tile, QC))
    return QC, KP, CPT, max(1, _cdiv(n_chunks, CPT))


def sorted_entries(indices: torch.Tensor, n_units: int, *, seq_of_row=None, cu_units=None, skip_forced=None,
                   unit: int = 1, queries_per_tile: int | None = None, key64: bool | None = None):
    """(qpos, slot, offsets) of the work list of `indices` [B, TC, Hkv, k] (runtime.selection._segments' sort):
    qpos, slot [B * TC * Hkv * k] int32 (entries past the real ones 0), offsets [n_seg + 1] int64, each segment's
    first entry and the number of real entries last.

    Padded (`seq_of_row` None): segment (b * Hkv + g) * n_units + unit. Packed (B = 1): unit u = cu_units[seq_of_row
    [t]] + index, segment u * Hkv + g, `n_units` the batch's bound. `skip_forced` = (t0, initial, local) leaves the
    forced slots out (padded; `unit` tokens a unit). `key64` forces the width of the sort keys (default: 32 bits
    where unit x chunk entries fit)."""
    B, TC, Hkv, K = indices.shape
    packed = seq_of_row is not None
    rows = Hkv if packed else B * Hkv
    n_seg = rows * n_units
    device = indices.device
    E = B * TC * Hkv * K
    qpos = torch.zeros(E, dtype=torch.int32, device=device)
    slot = torch.zeros(E, dtype=torch.int32, device=device)
    offsets = torch.zeros(n_seg + 1, dtype=torch.int64, device=device)
    if E == 0 or n_seg == 0:
        return qpos, slot, offsets
    QC, KP, CPT, NT = tiles_for(TC, K, rows, queries_per_tile)
    if key64 is None:
        key64 = n_units * QC * KP >= 0x7FFFFFFF
    t0, initial, local = skip_forced if skip_forced is not None else (0, 0, 0)
    tables = (seq_of_row, cu_units) if packed else (indices, indices)   # unused unless PACKED
    args = (indices, *tables)
    shape = (TC, K, Hkv, n_units, NT, CPT, *indices.stride(), t0, unit, initial, local)
    meta = dict(QC=QC, KP=KP, PACKED=packed, SKIP=skip_forced is not None)
    counts = torch.zeros((rows, NT, n_units), dtype=torch.int32, device=device)
    _count_kernel[(NT * CPT, rows)](*args, counts, *shape, **meta, num_warps=4)
    # counts -> the entries of each unit up to each tile's end; a row's last tile holds its segments' sizes.
    counts.cumsum_(1)
    sizes = counts[:, -1]
    torch.cumsum((sizes.t() if packed else sizes).reshape(-1), 0, out=offsets[1:])
    # One stage: a software pipeline must not load the next chunk's cursors before this chunk's barrier.
    _place_kernel[(NT, rows)](*args, counts, offsets, qpos, slot, *shape, **meta, KEY64=key64, num_warps=4,
                              num_stages=1)
    return qpos, slot, offsets
