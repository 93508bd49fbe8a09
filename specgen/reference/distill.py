"""The indexer's attention-score distillation loss (DeepSeek-V3.2), float64-able plain torch with autograd.

For query t and kv group g (docs/semantics.md "Distillation loss"; docs/distill.md for the averaging):

    support S(t, g)  dense stage: {s <= t};  sparse stage: the valid selected indices of (t, g) with s <= t
    p[t, g, s]       = mean over the group's query heads h of softmax_{s' in S}(sm_scale * q[t, h] . k[s', g])[s]
                       (k[s', h] instead of k[s', g] when k holds a key per query head: an MLA spec's unabsorbed
                       form, spec.unabsorbed; the same target as the absorbed q and k, docs/distill.md)
                       (each head's main-attention softmax over the support, detached: no gradient to q or k)
    I[t, g, s]       = idx_scale * sum_j w[t, g, j] * relu(q_I[t, g, j] . k_I[s, g])
    KL(t, g)         = sum_{s in S} p * (log p - log softmax_{s' in S}(I)[s])        (natural log, 0 log 0 = 0)
    L                = sum of KL(t, g) over valid rows / N_valid,  N_valid = #(b, t, g) rows with a non-empty support

so dL/dI[t, g, s] = (softmax_S(I)[t, g, s] - p[t, g, s]) / N_valid. In the sparse stage p renormalised over the
support is each head's softmax over the support (the sparse attention's own probabilities, whose log-sum-exp the
sparse forward returns), then averaged over the heads.

The loss is computed one chunk of queries at a time; with `query_chunk` and gradients enabled each chunk is
checkpointed, so at most one chunk's [C, Hkv, T] scores are alive at once, in the forward and in the backward.
"""

from __future__ import annotations

import torch

from ._core import NEG_INF, mask_from_indices, query_chunks, query_positions
from .indexer import indexer_scores_chunk


def _support(spec, k: torch.Tensor, positions: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Bool [B or 1, C, Hkv, T]: the keys each (query, kv group) row distils over."""
    T = k.shape[1]
    causal = torch.arange(T, device=k.device)[None, :] <= positions[:, None]          # [C, T]
    support = causal[None, :, None, :]
    if indices is not None:
        support = support & mask_from_indices(indices, 1, T)
    return support


def _per_head_keys(spec, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k holds a key per query head (the unabsorbed form) rather than one per kv group."""
    Hq, Hkv = spec.heads.q, spec.heads.kv
    if q.shape[2] != Hq or k.shape[2] not in (Hq, Hkv) or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B, T, {Hq}, D] and k [B, T, {Hkv}, D] (or, unabsorbed, [B, T, {Hq}, D]: a key "
                         f"per query head) with the same D; got q {list(q.shape)}, k {list(k.shape)}")
    return k.shape[2] != Hkv


def _main_probs(spec, q: torch.Tensor, k: torch.Tensor, support: torch.Tensor):
    """(p [B, C, Hkv, T] target, lse [B, C, Hq]) of the main attention over the support, without gradients. k: a key
    per kv group [B, T, Hkv, D], or per query head [B, T, Hq, D] (the unabsorbed form)."""
    with torch.no_grad():
        B, C, Hq, D = q.shape
        T, Hkv = k.shape[1], spec.heads.kv
        G = Hq // Hkv
        support = support.expand(B, C, Hkv, T)
        qg = q.reshape(B, C, Hkv, G, D)
        if _per_head_keys(spec, q, k):
            logits = torch.einsum("bcgzd,bsgzd->bcgzs", qg, k.reshape(B, T, Hkv, G, D)) * spec.softmax_scale
        else:
            logits = torch.einsum("bcgzd,bsgd->bcgzs", qg, k) * spec.softmax_scale
        allowed = support[:, :, :, None, :]
        any_ = allowed.any(-1, keepdim=True)
        logits = logits.masked_fill(~allowed, NEG_INF)
        safe = torch.where(any_, logits, torch.zeros_like(logits))                     # empty rows: no NaN
        lse = torch.logsumexp(safe, dim=-1, keepdim=True)
        p_heads = torch.exp(safe - lse).masked_fill(~allowed, 0.0)                     # [B, C, Hkv, G, T]
        lse = torch.where(any_, lse, torch.full_like(lse, NEG_INF))
        return p_heads.mean(dim=3), lse.reshape(B, C, Hq)


def _chunk_kl(spec, q, k, q_idx, k_idx, w_idx, indices, positions):
    """(sum of KL over the chunk's valid rows, number of valid rows) for a chunk of queries."""
    support = _support(spec, k, positions, indices)
    p, _ = _main_probs(spec, q, k, support)                                            # detached
    B, C, Hkv, T = p.shape
    support = support.expand(B, C, Hkv, T)
    valid = support.any(-1)                                                            # [B, C, Hkv]
    I = indexer_scores_chunk(spec, q_idx, k_idx, w_idx, positions, quantize=False)     # [B, C, Hkv, T]
    I = I.masked_fill(~support, NEG_INF)
    I = torch.where(valid[..., None], I, torch.zeros_like(I))                          # empty rows: finite
    log_q = torch.log_softmax(I, dim=-1)
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q))
    kl = torch.where(valid, term.sum(-1), torch.zeros_like(valid, dtype=term.dtype))
    return kl.sum(), valid.sum()


def distill_row_kl(spec, q, k, q_idx, k_idx, w_idx, *, indices=None):
    """(KL [B, T, Hkv] per row (0 on rows with an empty support), valid [B, T, Hkv] bool), materialising T x T."""
    positions = query_positions(q.shape[1], k.shape[1], q.device)
    support = _support(spec, k, positions, indices)
    p, _ = _main_probs(spec, q, k, support)
    support = support.expand(p.shape)
    valid = support.any(-1)
    I = indexer_scores_chunk(spec, q_idx, k_idx, w_idx, positions, quantize=False).masked_fill(~support, NEG_INF)
    log_q = torch.log_softmax(torch.where(valid[..., None], I, torch.zeros_like(I)), dim=-1)
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q))
    return torch.where(valid, term.sum(-1), torch.zeros_like(valid, dtype=term.dtype)), valid


def main_lse(spec, q: torch.Tensor, k: torch.Tensor, *, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Log-sum-exp [B, T, Hq] (natural log) of the main attention over the distillation support: dense causal
    attention (indices None) or the sparse attention over the selected tokens; -inf on empty rows. What the
    kernels take as `lse_main`."""
    positions = query_positions(q.shape[1], k.shape[1], q.device)
    return _main_probs(spec, q, k, _support(spec, k, positions, indices))[1]


def distill_target(spec, q: torch.Tensor, k: torch.Tensor, *, indices: torch.Tensor | None = None) -> torch.Tensor:
    """The target p [B, T, Hkv, T] (detached; rows sum to 1 on their support, 0 elsewhere and on empty rows)."""
    positions = query_positions(q.shape[1], k.shape[1], q.device)
    return _main_probs(spec, q, k, _support(spec, k, positions, indices))[0]


def distill_loss(spec, q, k, q_idx, k_idx, w_idx, *, indices=None, query_chunk: int | None = None) -> torch.Tensor:
    """The distillation loss L (a 0-dim tensor in the inputs' dtype); differentiable in q_idx, k_idx and w_idx only.

    q [B, T, Hq, Dqk], k [B, T, Hkv, Dqk] (main attention, after RoPE; detached here; or both [B, T, Hq, D], a key
    per query head: an MLA spec's unabsorbed form), q_idx [B, T, Hkv*H_I, d_I],
    k_idx [B, T, Hkv, d_I], w_idx [B, T, Hkv*H_I]; indices [B, T, Hkv, top_k] int32 (-1 padding) selects the sparse
    stage, None the dense warm-up stage. L = (sum of the rows' KL) / N_valid (0 when no row is valid).
    """
    q, k = q.detach(), k.detach()
    B, T = q.shape[:2]
    if indices is not None and tuple(indices.shape[:3]) != (B, T, spec.heads.kv):
        raise ValueError(f"indices must be [B, T, Hkv, top_k] with B={B}, T={T}, Hkv={spec.heads.kv}; "
                         f"got {list(indices.shape)}")
    positions = query_positions(T, k.shape[1], q.device)
    checkpoint = query_chunk is not None and torch.is_grad_enabled()
    total = q_idx.new_zeros(())
    n_valid = 0
    for rows in query_chunks(T, query_chunk):
        args = (q[:, rows], k, q_idx[:, rows], k_idx, w_idx[:, rows],
                None if indices is None else indices[:, rows], positions[rows])
        if checkpoint:
            # Recompute the chunk's scores in the backward instead of keeping every chunk's [C, Hkv, T] alive.
            kl, n = torch.utils.checkpoint.checkpoint(_chunk_kl, spec, *args, use_reentrant=False)
        else:
            kl, n = _chunk_kl(spec, *args)
        total = total + kl
        n_valid += int(n)
    return total / max(n_valid, 1)


__all__ = ["distill_loss", "distill_row_kl", "distill_target", "main_lse"]
