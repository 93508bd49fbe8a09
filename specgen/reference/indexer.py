"""Lightning indexer (DeepSeek-V3.2) and the token / block top-k it drives, as plain float64-able torch.

    I[t, g, s] = scale * sum_j w[t, g*H_I + j] * ReLU(q_idx[t, g*H_I + j] . k_idx[s, g])    for s <= t, else -inf

with scale = spec.indexer.scale, or d_I^-1/2 * H_I^-1/2 when null. One index key per token and kv group; the
indexer heads of kv group g are columns g*H_I .. g*H_I + H_I - 1 of q_idx and w_idx.

With indexer.dtype fp8_e4m3 the top-k ranks scores of q_I and k_I rounded to e4m3 row by row
(`specgen.runtime.fp8_rows`, the kernels' own quantiser), then computed here in the caller's precision; the
distillation loss trains on the unrounded values (`quantize=False`).
"""

from __future__ import annotations

import torch

from .. import runtime
from ._core import NEG_INF, query_chunks, query_positions, top_units


def indexer_scale(spec) -> float:
    idx = spec.indexer
    return idx.scale if idx.scale is not None else idx.head_dim ** -0.5 * idx.heads ** -0.5


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x as the fp8 indexer sees it: e4m3 values times their row scale, in x's dtype."""
    x8, scale = runtime.fp8_rows(x)
    return x8.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)


def indexer_scores_chunk(spec, q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor,
                         positions: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """Index scores [B, C, Hkv, T] of a chunk of C queries at `positions` against all T index keys (of q_I and k_I
    rounded to fp8 first when the spec's indexer is fp8 and `quantize`)."""
    if quantize and spec.indexer.dtype == "fp8_e4m3":
        q_idx, k_idx = fp8_round_trip(q_idx), fp8_round_trip(k_idx)
    B, C = q_idx.shape[:2]
    Hkv, d_i = k_idx.shape[2], k_idx.shape[3]
    H_I = spec.indexer.heads
    q = q_idx.reshape(B, C, Hkv, H_I, d_i)                                      # head j of group g: column g*H_I+j
    w = w_idx.reshape(B, C, Hkv, H_I)
    dots = torch.einsum("bcgjd,bsgd->bcgjs", q, k_idx)                          # [B, C, Hkv, H_I, T]
    scores = indexer_scale(spec) * torch.einsum("bcgj,bcgjs->bcgs", w, torch.relu(dots))
    s = torch.arange(k_idx.shape[1], device=k_idx.device)
    future = s[None, :] > positions[:, None]                                    # [C, T]: s > t is never visible
    return scores.masked_fill(future[None, :, None, :], NEG_INF)


def indexer_scores(spec, q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor, *,
                   query_chunk: int | None = None) -> torch.Tensor:
    """Index scores I [B, Tq, Hkv, T] (-inf where s > t).

    q_idx [B, Tq, Hkv*H_I, d_I], k_idx [B, T, Hkv, d_I], w_idx [B, Tq, Hkv*H_I]; the Tq queries are the last Tq
    positions (Tq = T for a prefill). The result is T x T per group: fine at test sizes; `query_chunk` only bounds
    the H_I-wide intermediate.
    """
    positions = query_positions(q_idx.shape[1], k_idx.shape[1], q_idx.device)
    return torch.cat([indexer_scores_chunk(spec, q_idx[:, rows], k_idx, w_idx[:, rows], positions[rows])
                      for rows in query_chunks(q_idx.shape[1], query_chunk)], dim=1)


def select_tokens(spec, I: torch.Tensor) -> torch.Tensor:
    """Token top-k: int32 [B, Tq, Hkv, top_k], the k highest I[t, s] over s <= t, ties to the lower s,
    ascending, -1 padding last when fewer than k keys are visible."""
    positions = query_positions(I.shape[1], I.shape[-1], I.device)
    return top_units(I, positions, unit=1, top_k=spec.selection.top_k)


def indexer_block_scores(spec, I: torch.Tensor) -> torch.Tensor:
    """Block scores [B, Tq, Hkv, ceil(T/l')] from index scores: the log-sum-exp of the index scores of the block's
    visible tokens (the block's mass under softmax(I), up to the row's normaliser, which does not change ranking).

    The indexer scorer at block granularity (semantics.md, "Granularity").
    """
    l_sel = spec.selection.block
    T = I.shape[-1]
    n_sel = -(-T // l_sel)
    padded = torch.nn.functional.pad(I, (0, n_sel * l_sel - T), value=NEG_INF)   # the last block may be partial
    return torch.logsumexp(padded.reshape(*I.shape[:-1], n_sel, l_sel), dim=-1)
