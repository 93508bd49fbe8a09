"""`index_topk`: the lightning indexer's top-k alone (DSA modules), its checks and packed (varlen) path; the
generated module passes its chunked scorer (`select`: the kernel launches)."""

from __future__ import annotations

import torch

from . import check_seqlen, check_tensor, check_varlen, require_fp8


def index_topk(desc, select, q_idx, k_idx, w_idx, *, return_scores=False, cu_seqlens=None, max_seqlen=None):
    """See the generated `index_topk`. `select(q_idx, k_idx, w_idx, indices, scores)` fills `indices` (and
    `scores` when not None)."""
    fn = "index_topk"
    dims: dict = {}
    a_q, a_k, a_w = desc.index_inputs
    if cu_seqlens is not None or max_seqlen is not None:
        q_idx = check_tensor(fn, "q_idx", q_idx, a_q.packed_shape, desc.dtype, dims)
        device = q_idx.device
        k_idx = check_tensor(fn, "k_idx", k_idx, a_k.packed_shape, desc.dtype, dims, device)
        w_idx = check_tensor(fn, "w_idx", w_idx, a_w.packed_shape, desc.dtype, dims, device)
        packed = check_varlen(fn, cu_seqlens, max_seqlen, q_idx.shape[0], device, desc.max_seqlen, desc.spec_name)
        result = index_topk(desc, select, packed.pad(q_idx), packed.pad(k_idx), packed.pad(w_idx),
                            return_scores=return_scores)
        return tuple(packed.unpad(x) for x in result) if return_scores else packed.unpad(result)
    q_idx = check_tensor(fn, "q_idx", q_idx, a_q.shape, desc.dtype, dims)
    device = q_idx.device
    check_seqlen(fn, q_idx.shape[1], desc.max_seqlen, desc.spec_name, "q_idx")
    k_idx = check_tensor(fn, "k_idx", k_idx, a_k.shape, desc.dtype, dims, device)
    w_idx = check_tensor(fn, "w_idx", w_idx, a_w.shape, desc.dtype, dims, device)
    if desc.fp8_indexer:
        require_fp8(fn, device)
    B, T = q_idx.shape[0], q_idx.shape[1]
    indices = torch.empty((B, T, desc.heads_kv, desc.top_k), dtype=torch.int32, device=device)
    scores = (torch.empty((B, T, desc.heads_kv, desc.top_k), dtype=torch.float32, device=device) if return_scores
              else None)
    with torch.no_grad():
        select(q_idx, k_idx, w_idx, indices, scores)
    return (indices, scores) if return_scores else indices
