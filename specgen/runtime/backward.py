"""Host-side pieces of the backward pass that are plain torch (the launch sequence itself stays generated)."""

from __future__ import annotations

import torch

from . import cdiv as _cdiv


def selection_inverse_index(indices, T: int, tile: int, *, unit: int, heads_kv: int, units_per_tile: int,
                            varlen=None):
    """The block -> queries index of a selection, as CSR over (batch, kv head, key tile of `tile` tokens).

    `indices` [B, T, heads_kv, k] selects units of `unit` tokens; the kernel's tile holds `units_per_tile` units.
    Entry e: a query position qpos[e] that selected a unit inside the tile; with several units per tile, bits[e]
    says which of the tile's units it selected (bit u = unit u). The entries of segment
    seg = (b * heads_kv + g) * n_tiles + j are offsets[seg] : offsets[seg + 1], queries ascending.
    Built by one sort of (segment, query[, unit]) keys, then running sums, searches and gathers: deterministic by
    construction, with no atomics, no scatter, no host sync (padding entries sort to the end, past every offset)
    and no op that torch.use_deterministic_algorithms swaps for another algorithm. Returns (offsets, qpos, bits);
    bits is unused with one unit per tile (and 0 in the slots past the last offset).

    Packed (`varlen` = (layout, r0), docs/varlen.md): `indices` [1, R, heads_kv, k] are the packed rows r0 .. r0 +
    R - 1 of a batch of T = total tokens (runtime.varlen.Layout `layout`), their units relative to each row's
    sequence. The key tiles are each sequence's, numbered over the batch as the layout's tile table numbers them
    (p = the sequence's first tile + j), so no tile spans two sequences; seg = p * heads_kv + g, and qpos holds
    packed rows.
    """
    B, R = indices.shape[0], indices.shape[1]
    device = indices.device
    valid = indices >= 0
    # The keys are built in place in one int64 buffer (DeepSeek-V3.2 at 64k: 2^27 entries, 1 GiB each array; the
    # build holds ~3 of them at once, its sort's included; docs/backward.md, "Memory of a training step").
    tok = indices.to(torch.int64, copy=True)
    if unit != 1:
        tok.mul_(unit)
    key = tok.div(tile, rounding_mode="floor")                        # the slot's key tile, then its segment
    g = torch.arange(heads_kv, device=device).view(1, 1, heads_kv, 1)
    if varlen is None:
        n_tiles = _cdiv(T, tile)
        key.add_((torch.arange(B, device=device).view(B, 1, 1, 1) * heads_kv + g) * n_tiles)
        n_seg = B * heads_kv * n_tiles
    else:
        layout, r0 = varlen
        counts = (layout.lengths + tile - 1) // tile
        first_tile = torch.cumsum(counts, 0) - counts
        key.add_(first_tile[layout.seq_of_token[r0:r0 + R].view(1, R, 1, 1)]).mul_(heads_kv).add_(g)
        n_seg = layout.token_tiles(tile)[1] * heads_kv
    key.mul_(R).add_(torch.arange(R, device=device).view(1, R, 1, 1))   # (segment, query)
    if units_per_tile > 1:
        key.mul_(units_per_tile).add_(tok.remainder_(tile).div_(unit, rounding_mode="floor"))   # (.., unit)
    del tok
    key.masked_fill_(~valid, PADDING)
    del valid
    comp = torch.sort(key.flatten()).values
    del key
    offsets, qpos, bits = _csr(comp, R, n_seg, units_per_tile)
    return offsets, qpos if varlen is None else qpos + varlen[1], bits


PADDING = torch.iinfo(torch.int64).max


def _csr(comp, R: int, n_seg: int, units_per_tile: int):
    """The CSR of `selection_inverse_index` from its sorted keys `comp` (segment * R + row, times units_per_tile
    plus the unit's place in its tile when there are several; PADDING for a padding slot; consumed: modified in
    place): qpos is the row (0 .. R - 1)."""
    device = comp.device
    if units_per_tile == 1:
        # One unit per tile: a (query, kv head) lists a unit at most once, so keys are unique.
        key = bits = comp  # bits unused
        qpos = (key % R).to(torch.int32)
        return torch.searchsorted(key // R, torch.arange(n_seg + 1, device=device)), qpos, bits
    upt = units_per_tile
    n = comp.numel()
    real = comp != PADDING
    low = comp.remainder(upt).masked_fill_(~real, 0)                 # the unit's place in its tile
    key = comp.div_(upt, rounding_mode="floor").masked_fill_(~real, PADDING)
    # Entries of one (segment, query) are adjacent: keep the first of each run, its bits the OR (= sum,
    # distinct bits) of the run's, from a running sum. Run i starts at the (i+1)-th first entry: a search of
    # the running count of firsts (start[i] = n past the last run). Gathers and searches only, whatever
    # torch.use_deterministic_algorithms says: a scatter of the non-first entries into one spare slot took,
    # in deterministic mode on CUDA, torch's sort-based index_put_ that walks one index's duplicates serially
    # (~29 M at V3.2's 16k: seconds; docs/backward.md, "Determinism"). Positions in int32 where they fit.
    first = real.clone()
    first[1:] &= key[1:] != key[:-1]
    small = n + 1 < 2**31
    pos_t = torch.int32 if small else torch.int64
    start = torch.searchsorted(torch.cumsum(first, 0, dtype=pos_t), torch.arange(1, n + 2, device=device, dtype=pos_t),
                               out_int32=small)
    del first
    last = max(n - 1, 0)
    csum = torch.ones_like(low).bitwise_left_shift_(low).masked_fill_(~real, 0).cumsum_(0)
    del low, real
    end = (start[1:] - 1).clamp_(0, last)                             # the run of slot i ends where slot i+1 starts
    bits = csum[end]
    del end
    before = (start[:n] - 1).clamp_(min=0)
    below = csum[before].masked_fill_(start[:n] <= 0, 0)
    del before, csum
    bits.sub_(below)
    del below
    first_of_run = start[:n].clamp(max=last)
    key = key[first_of_run].masked_fill_(start[:n] >= n, PADDING)
    del first_of_run, start
    qpos = key.remainder(R).to(torch.int32)
    offsets = torch.searchsorted(key.div_(R, rounding_mode="floor"), torch.arange(n_seg + 1, device=device))
    return offsets, qpos, bits
