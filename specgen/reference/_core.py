"""Building blocks shared by the NSA and indexer references: query positions, chunking, masked attention, top-k.

Everything here is plain torch in the dtype of its inputs, differentiable where the maths is (top-k is not), and
works on a *chunk* of queries at a time, so that the callers never build a T x T x heads tensor at once.
"""

from __future__ import annotations

from typing import Iterator

import torch

NEG_INF = float("-inf")


def query_positions(n_queries: int, seq_len: int, device) -> torch.Tensor:
    """Positions of `n_queries` query rows that are the *last* rows of a sequence of `seq_len` tokens.

    For a prefill (n_queries == seq_len) that is 0..T-1. For decoding, the new queries are the last positions of
    their sequence, so masks are aligned bottom-right (semantics.md, "Decoding").
    """
    if n_queries > seq_len:
        raise ValueError(f"{n_queries} query rows cannot be the last rows of a {seq_len}-token sequence")
    return torch.arange(seq_len - n_queries, seq_len, device=device)


def query_chunks(n_queries: int, query_chunk: int | None) -> Iterator[slice]:
    """Row slices of at most `query_chunk` queries (all rows at once when None)."""
    if query_chunk is None:
        query_chunk = max(n_queries, 1)
    if not isinstance(query_chunk, int) or isinstance(query_chunk, bool) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive integer or None, got {query_chunk!r}")
    for start in range(0, n_queries, query_chunk):
        yield slice(start, min(start + query_chunk, n_queries))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention of a chunk of queries over keys, restricted to `mask`, with grouped (GQA/MQA) heads.

    q    [B, C, Hq, D]    a chunk of C queries
    k    [B, S, Hkv, D]   keys (query head h reads kv head h // G, G = Hq // Hkv)
    v    [B, S, Hkv, Dv]
    mask bool, broadcastable to [B, C, Hkv, S]: which keys each (query, kv head) may see; all heads of a group
         share the mask, as in every branch of NSA/DSA.

    Returns o [B, C, Hq, Dv], lse [B, C, Hq] (natural log, of the scaled logits), p [B, C, Hq, S] (probabilities).
    A query that sees no key gets o = 0, lse = -inf, p = 0, and no NaN in values or gradients.
    """
    B, C, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q_grouped = q.reshape(B, C, Hkv, G, D)
    logits = torch.einsum("bcgzd,bsgd->bcgzs", q_grouped, k) * scale           # [B, C, Hkv, G, S]

    allowed = mask.expand(B, C, Hkv, S).unsqueeze(-2)                           # [B, C, Hkv, 1, S]
    sees_any = allowed.any(dim=-1, keepdim=True)                                # [B, C, Hkv, 1, 1]
    logits = logits.masked_fill(~allowed, NEG_INF)
    # A row with nothing visible would be logsumexp(-inf, ..., -inf): its value is right (-inf) but its gradient
    # is NaN (0 * exp(-inf - -inf)). Give such rows finite logits for the softmax and fix them up afterwards.
    safe_logits = torch.where(sees_any, logits, torch.zeros_like(logits))
    lse = torch.logsumexp(safe_logits, dim=-1, keepdim=True)                    # [B, C, Hkv, G, 1]
    p = torch.exp(safe_logits - lse).masked_fill(~allowed, 0.0)                 # 0 outside the mask, rows incl.
    o = torch.einsum("bcgzs,bsgd->bcgzd", p, v)                                 # zero rows give o = 0

    lse = torch.where(sees_any, lse, torch.full_like(lse, NEG_INF))
    return o.reshape(B, C, Hq, v.shape[-1]), lse.reshape(B, C, Hq), p.reshape(B, C, Hq, S)


def top_units(scores: torch.Tensor, positions: torch.Tensor, unit: int, top_k: int,
              initial: int = 0, local: int = 0) -> torch.Tensor:
    """The selection rule shared by blocks (unit = l') and tokens (unit = 1), for a chunk of queries.

    scores    [B, C, Hkv, N]  score of unit j (tokens [j*unit, (j+1)*unit)) for each query and kv group
    positions [C]             position t of each query row

    Candidates are the units with j*unit <= t. Units 0..initial-1 and the `local` most recent ones
    (t//unit, t//unit - 1, ...) are forced whenever they are candidates and count within top_k; the rest are taken
    by highest score, ties to the lower j. Returns int32 [B, C, Hkv, top_k]: ascending, -1 padding last.
    """
    B, C, Hkv, N = scores.shape
    j = torch.arange(N, device=scores.device)
    newest = (positions // unit)[:, None]                                       # [C, 1] most recent candidate
    candidate = j[None, :] <= newest                                            # [C, N]  j*unit <= t
    forced = candidate & ((j[None, :] < initial) | (j[None, :] > newest - local))
    # Rank lexicographically by (tier, score, -j): tier 2 = forced, 1 = other candidate, 0 = not a candidate.
    # Two stable sorts do it: first by score (stable, so equal scores keep ascending j), then by tier.
    tier = (candidate.long() + forced.long())[:, None, :].expand(B, C, Hkv, N)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    ranked = by_score.gather(-1, by_tier)[..., :top_k]                          # best first
    chosen = torch.where(tier.gather(-1, ranked) > 0, ranked, -1)               # non-candidates -> padding

    if chosen.shape[-1] < top_k:                                                # fewer units than top_k at all
        pad = chosen.new_full((B, C, Hkv, top_k - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], dim=-1)
    # Ascending with the padding last: sort with -1 read as +infinity.
    chosen = torch.where(chosen < 0, N, chosen).sort(dim=-1).values
    return torch.where(chosen == N, -1, chosen).to(torch.int32)


def mask_from_indices(indices: torch.Tensor, unit: int, n_keys: int) -> torch.Tensor:
    """Token mask [B, C, Hkv, n_keys] of the units listed in `indices` [B, C, Hkv, k] (-1 entries ignored)."""
    n_units = -(-n_keys // unit)
    idx = indices.long()
    if bool(((idx < -1) | (idx >= n_units)).any()):
        raise ValueError(f"indices must lie in [-1, {n_units}) for {n_keys} keys and unit {unit}; got values "
                         f"from {int(idx.min())} to {int(idx.max())}")
    # Scatter into one spare column that stands for the padding, then drop it.
    selected = torch.zeros(*idx.shape[:-1], n_units + 1, dtype=torch.bool, device=idx.device)
    selected.scatter_(-1, torch.where(idx < 0, n_units, idx), True)
    selected = selected[..., :n_units]
    return selected.repeat_interleave(unit, dim=-1)[..., :n_keys]
