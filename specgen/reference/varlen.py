"""Packed (varlen) batches for the reference: the per-sequence reference, run sequence by sequence.

A packed batch holds N sequences back to back along dim 0 ([total, H, D], flash-attn's convention): sequence i is
rows cu_seqlens[i] : cu_seqlens[i+1], and positions restart at 0 in each (docs/semantics.md). The reference of a
packed batch is, by definition, the ordinary reference of each sequence (batch of one), concatenated: nothing can
cross a sequence boundary because no sequence sees another.

`rows` restricts the queries to the last `rows` positions of each sequence (bottom-right aligned, as the reference
treats fewer queries than keys): GPU tests at 64k tokens check sampled rows this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distill import _chunk_kl
from .nsa import nsa_forward

# Inputs read at the query positions (sliced to the sampled rows); the other per-token inputs are keys/values.
QUERY_SIDE = ("q", "gates", "q_idx", "w_idx")
# Inputs shared by every sequence (learned pooling weights): passed whole.
SHARED = ("w_pool_k", "w_pool_v", "pe_pool_k", "pe_pool_v")


def sequences(cu_seqlens) -> list[tuple[int, int]]:
    """(start, end) of every sequence, empty ones included."""
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    return list(zip(cu[:-1], cu[1:]))


def query_rows(cu_seqlens, rows: int | None = None) -> torch.Tensor:
    """Packed row numbers of the queries a check covers: every row, or the last `rows` of each sequence."""
    out = [torch.arange(max(a, b - rows) if rows else a, b) for a, b in sequences(cu_seqlens)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def sequence_inputs(inputs: dict, start: int, end: int, rows: int | None = None) -> dict:
    """One sequence's inputs as a batch of one: keys [1, len, ...], queries [1, r, ...] (its last r rows)."""
    first = start if rows is None else max(start, end - rows)
    out = {}
    for name, x in inputs.items():
        if name in SHARED:
            out[name] = x
        elif name in QUERY_SIDE:
            out[name] = x[first:end][None]
        else:
            out[name] = x[start:end][None]
    return out


@dataclass
class VarlenResult:
    out: torch.Tensor                    # [R, Hq, Dv] over the covered rows (`query_rows`), packed order
    lse: torch.Tensor                    # [R, Hq, n_branches]
    indices: torch.Tensor | None         # [R, Hkv, top_k], relative to each sequence's start


def nsa_forward_varlen(spec, cu_seqlens, *, indices: torch.Tensor | None = None, rows: int | None = None,
                       query_chunk: int | None = None, dtype: torch.dtype | None = None, **inputs) -> VarlenResult:
    """The reference forward of a packed batch (NSA and DSA specs): `inputs` as the kernels take them, packed
    [total, ...]; `indices` (packed over the covered rows, like the result) replace the scorer's choice. With
    `dtype` (float64), each sequence's inputs are converted when it is computed: a 64k-token batch of wide heads
    never exists in float64 at once."""
    outs, lses, idxs = [], [], []
    offset = 0
    for start, end in sequences(cu_seqlens):
        if end == start:
            continue
        seq = sequence_inputs(inputs, start, end, rows)
        if dtype is not None:
            seq = {n: x.to(dtype) for n, x in seq.items()}
        r = seq["q"].shape[1]
        idx = None if indices is None else indices[offset:offset + r][None]
        res = nsa_forward(spec, **seq, indices=idx, query_chunk=query_chunk)
        offset += r
        outs.append(res.out[0])
        lses.append(res.lse[0])
        if res.indices is not None:
            idxs.append(res.indices[0])
    if not outs:  # every sequence empty
        q = inputs["q"].to(dtype or inputs["q"].dtype)
        return VarlenResult(q.new_zeros((0, spec.heads.q, spec.head_dim.v)),
                            q.new_zeros((0, spec.heads.q, len(spec.branches))), None)
    # Each sequence's full result (scores, branch outputs) is dropped as soon as its rows are kept: at 64k tokens
    # of wide heads the float64 results of all sequences at once would not fit beside the kernels' tensors.
    return VarlenResult(torch.cat(outs), torch.cat(lses), torch.cat(idxs) if idxs else None)


def distill_loss_varlen(spec, q, k, q_idx, k_idx, w_idx, cu_seqlens, *, indices=None) -> torch.Tensor:
    """The distillation loss of a packed batch: the KL of every valid (sequence, t, kv group) row, summed over all
    sequences and divided by the number of valid rows of the whole batch (not a mean of per-sequence means)."""
    q, k = q.detach(), k.detach()
    total = q_idx.new_zeros(())
    n_valid = 0
    for start, end in sequences(cu_seqlens):
        if end == start:
            continue
        s = slice(start, end)
        positions = torch.arange(end - start, device=q.device)
        kl, n = _chunk_kl(spec, q[s][None], k[s][None], q_idx[s][None], k_idx[s][None], w_idx[s][None],
                          None if indices is None else indices[s][None], positions)
        total = total + kl
        n_valid += int(n)
    return total / max(n_valid, 1)


__all__ = ["QUERY_SIDE", "SHARED", "VarlenResult", "distill_loss_varlen", "nsa_forward_varlen", "query_rows",
           "sequence_inputs", "sequences"]
