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
    idx = indices.long()
    tok = idx * unit
    g = torch.arange(heads_kv, device=device).view(1, 1, heads_kv, 1)
    if varlen is None:
        n_tiles = _cdiv(T, tile)
        bg = torch.arange(B, device=device).view(B, 1, 1, 1) * heads_kv + g
        segment, n_seg = bg * n_tiles + tok // tile, B * heads_kv * n_tiles
    else:
        layout, r0 = varlen
        counts = (layout.lengths + tile - 1) // tile
        first_tile = torch.cumsum(counts, 0) - counts
        seq = layout.seq_of_token[r0:r0 + R].view(1, R, 1, 1)
        segment = (first_tile[seq] + tok // tile) * heads_kv + g
        n_seg = layout.token_tiles(tile)[1] * heads_kv
    offsets, qpos, bits = _csr(segment, tok, idx >= 0, n_seg, tile, unit, units_per_tile)
    return offsets, qpos if varlen is None else qpos + varlen[1], bits


def _csr(segment, tok, valid, n_seg: int, tile: int, unit: int, units_per_tile: int):
    """The CSR of `selection_inverse_index` from each (row, kv head, slot)'s segment [B, R, heads_kv, k], its
    first token `tok` and whether the slot is real: qpos is the row (0 .. R - 1)."""
    R = segment.shape[1]
    device = segment.device
    t = torch.arange(R, device=device).view(1, R, 1, 1)
    key = segment * R + t                                              # (segment, query)
    padding = torch.iinfo(torch.int64).max
    if units_per_tile == 1:
        # One unit per tile: a (query, kv head) lists a unit at most once, so keys are unique.
        key = torch.sort(torch.where(valid, key, padding).flatten()).values
        bits = key  # unused
    else:
        upt = units_per_tile
        comp = torch.sort(torch.where(valid, key * upt + (tok % tile) // unit, padding).flatten()).values
        real = comp != padding
        key = torch.where(real, comp // upt, padding)
        # Entries of one (segment, query) are adjacent: keep the first of each run, its bits the OR (= sum,
        # distinct bits) of the run's, from a running sum. Run i starts at the (i+1)-th first entry: a search of
        # the running count of firsts (start[i] = n past the last run). Gathers and searches only, whatever
        # torch.use_deterministic_algorithms says: a scatter of the non-first entries into one spare slot took,
        # in deterministic mode on CUDA, torch's sort-based index_put_ that walks one index's duplicates serially
        # (~29 M at V3.2's 16k: seconds; docs/backward.md, "Determinism").
        n = comp.numel()
        first = real.clone()
        first[1:] &= key[1:] != key[:-1]
        start = torch.searchsorted(torch.cumsum(first, 0), torch.arange(1, n + 2, device=device))
        last = max(n - 1, 0)
        csum = torch.cumsum(torch.where(real, torch.ones_like(comp) << torch.where(real, comp % upt, 0), 0), 0)
        end = start[1:] - 1                                           # the run of slot i ends where slot i+1 starts
        bits = csum[end.clamp(0, last)] - torch.where(start[:n] > 0, csum[(start[:n] - 1).clamp(0)], 0)
        key = torch.where(start[:n] < n, key[start[:n].clamp(max=last)], padding)
    qpos = (key % R).to(torch.int32)
    offsets = torch.searchsorted(key // R, torch.arange(n_seg + 1, device=device))
    return offsets, qpos, bits
