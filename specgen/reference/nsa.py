"""The NSA forward pass (arXiv 2502.11089) with the exact rules of docs/semantics.md, in plain torch.

This is the specification the kernels are checked against, so it is written to be read: each branch is one masked
softmax over the keys its rule allows. It runs in the dtype of its inputs (tests use float64) and processes the
queries in chunks (`query_chunk`), so that at realistic sizes (T = 8192, 64 heads) no T x T x H tensor is built at
once.

Layout [B, T, H, D]. Query head h belongs to kv head h // G, G = Hq // Hkv. Every function that takes fewer
queries than keys treats the queries as the *last* positions of the sequence (decoding, bottom-right aligned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._core import masked_attention, mask_from_indices, query_chunks, query_positions, top_units
from .indexer import indexer_block_scores, indexer_scores_chunk
from .inputs import input_names, kv_names


@dataclass
class NSAResult:
    out: torch.Tensor                 # [B, T, Hq, Dv]   gated sum of the branch outputs
    lse: torch.Tensor                 # [B, T, Hq, n_branches] per-branch log-sum-exp, in spec.branches order
    indices: torch.Tensor | None      # [B, T, Hkv, top_k] int32, the selection used (given or chosen), or None
    scores: torch.Tensor | None       # what ranked them: S [B, T, Hkv, Nsel] (blocks) or I [B, T, Hkv, T] (tokens)
    branch_out: dict[str, torch.Tensor] = field(default_factory=dict)   # branch name -> o [B, T, Hq, Dv]


# ---------------------------------------------------------------------------------------------------------------
# Compression branch
# ---------------------------------------------------------------------------------------------------------------

def num_compressed_blocks(spec, T: int) -> int:
    """Complete compression blocks of a T-token sequence: block i covers [i*d, i*d + l) and exists iff i*d + l <= T."""
    l, d = spec.compression.block, spec.compression.stride
    return max(0, (T - l) // d + 1)


def pool_kv(spec, x: torch.Tensor, weight: torch.Tensor | None = None, pe: torch.Tensor | None = None) -> torch.Tensor:
    """Pool the complete compression blocks of x [B, T, Hkv, D] into [B, Nc, Hkv, D_out].

    mean:   the average of the block's l rows.
    linear: concat over r = 0..l-1 of (x[i*d + r] + pe[r]), flattened row-major to l*D, times weight[g] [l*D, D_out].
    A trailing partial block is never pooled.
    """
    B, T, Hkv, D = x.shape
    l, d = spec.compression.block, spec.compression.stride
    n_blocks = num_compressed_blocks(spec, T)
    linear = spec.compression.pool == "linear"
    d_out = weight.shape[-1] if linear else D
    if n_blocks == 0:
        return x.new_zeros(B, 0, Hkv, d_out)
    # blocks[b, i, r, g, :] = x[b, i*d + r, g, :]
    blocks = torch.stack([x[:, i * d: i * d + l] for i in range(n_blocks)], dim=1)   # [B, Nc, l, Hkv, D]
    if not linear:
        return blocks.mean(dim=2)
    if weight is None:
        raise TypeError("the linear pool needs its weight [Hkv, l*D, D]")
    if spec.compression.position_embedding:
        if pe is None:
            raise TypeError("the linear pool with position_embedding needs pe [l, D]")
        blocks = blocks + pe[None, None, :, None, :]
    flat = blocks.permute(0, 1, 3, 2, 4).reshape(B, n_blocks, Hkv, l * D)              # row r occupies [r*D, (r+1)*D)
    return torch.einsum("bngf,gfe->bnge", flat, weight)


def _compression_chunk(spec, q, k_pooled, v_pooled, positions):
    """Query t sees compressed block i iff i*d + l - 1 <= t (its last token is not in the future)."""
    l, d = spec.compression.block, spec.compression.stride
    block_end = torch.arange(k_pooled.shape[1], device=q.device) * d + l - 1       # last token of each block
    visible = block_end[None, :] <= positions[:, None]                             # [C, Nc]
    return masked_attention(q, k_pooled, v_pooled, visible[None, :, None, :], spec.softmax_scale)


def compression_attention(spec, q, k_cmp_pooled, v_cmp_pooled, T: int, *, query_chunk: int | None = None):
    """Attention over the visible compressed blocks: (o [B,Tq,Hq,Dv], lse [B,Tq,Hq], p [B,Tq,Hq,Nc]).

    T is the sequence length (the pooled keys do not tell it); q holds its last Tq positions (Tq = T for a
    prefill). A query that sees no block (t < l - 1) gets o = 0, lse = -inf, p = 0.
    """
    positions = query_positions(q.shape[1], T, q.device)
    parts = [_compression_chunk(spec, q[:, rows], k_cmp_pooled, v_cmp_pooled, positions[rows])
             for rows in query_chunks(q.shape[1], query_chunk)]
    return tuple(torch.cat(x, dim=1) for x in zip(*parts))


# ---------------------------------------------------------------------------------------------------------------
# Selection branch: scores, top-n, sparse attention
# ---------------------------------------------------------------------------------------------------------------

def overlap_weights(spec, n_cmp: int, n_sel: int, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """W [Nc, Nsel]: W[i, j] = |[i*d, i*d + l) intersect [j*l', (j+1)*l')| / d, the number of d-token chunks that
    compression block i shares with selection block j. (For l=32, d=16, l'=64: 1, 2, 2, 2, 1 on blocks 4j-1..4j+3.)"""
    l, d, l_sel = spec.compression.block, spec.compression.stride, spec.selection.block
    cmp_start = torch.arange(n_cmp, device=device)[:, None] * d
    sel_start = torch.arange(n_sel, device=device)[None, :] * l_sel
    shared = torch.minimum(cmp_start + l, sel_start + l_sel) - torch.maximum(cmp_start, sel_start)
    return (shared.clamp(min=0) / d).to(dtype)


def selection_scores(spec, p: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """Block scores S [B, Tq, Hkv, Nsel] from the compression probabilities p [B, Tq, Hq, Nc].

    P[t, g, i] = sum of p[t, h, i] over the query heads h of group g (probabilities, not logits), then
    S[t, g, j] = sum_i P[t, g, i] * W[i, j] with the overlap weights above. Nsel = ceil(T / l'); T defaults to
    p.shape[1] (a prefill).
    """
    T = p.shape[1] if T is None else T
    B, Tq, Hq, n_cmp = p.shape
    Hkv = spec.heads.kv
    P = p.reshape(B, Tq, Hkv, Hq // Hkv, n_cmp).sum(dim=3)                           # [B, Tq, Hkv, Nc]
    W = overlap_weights(spec, n_cmp, -(-T // spec.selection.block), dtype=p.dtype, device=p.device)
    return torch.einsum("btgi,ij->btgj", P, W)


def select_blocks(spec, S: torch.Tensor, T: int) -> torch.Tensor:
    """Top-n blocks: int32 [B, Tq, Hkv, top_k]. Candidates j*l' <= t; blocks 0..initial-1 and the `local` most
    recent (t//l', t//l' - 1, ...) forced when candidates; the rest by highest S, ties to the lower j; ascending,
    -1 padding last. The Tq query rows are the last positions of a T-token sequence."""
    sel = spec.selection
    positions = query_positions(S.shape[1], T, S.device)
    return top_units(S, positions, unit=sel.block, top_k=sel.top_k, initial=sel.initial, local=sel.local)


def _sparse_chunk(spec, q, k, v, indices, unit, positions):
    """Query t of head h attends to the keys s <= t inside the units listed for (t, h // G)."""
    n_keys = int(positions.max()) + 1                        # keys after the chunk's last query are never visible
    k, v = k[:, :n_keys], v[:, :n_keys]
    selected = mask_from_indices(indices, unit, n_keys)                               # [B, C, Hkv, n_keys]
    causal = torch.arange(n_keys, device=q.device)[None, :] <= positions[:, None]     # [C, n_keys]
    o, lse, _ = masked_attention(q, k, v, selected & causal[None, :, None, :], spec.softmax_scale)
    return o, lse


def sparse_attention(spec, q, k, v, indices, unit: int, *, query_chunk: int | None = None):
    """Attention over selected units: (o [B,Tq,Hq,Dv], lse [B,Tq,Hq]).

    indices [B, Tq, Hkv, k]: unit j covers tokens [j*unit, (j+1)*unit) (unit = l' for blocks, 1 for tokens); -1
    entries are ignored. No visible token: o = 0, lse = -inf. q holds the last Tq of the T = k.shape[1] positions.
    """
    positions = query_positions(q.shape[1], k.shape[1], q.device)
    parts = [_sparse_chunk(spec, q[:, rows], k, v, indices[:, rows], unit, positions[rows])
             for rows in query_chunks(q.shape[1], query_chunk)]
    return tuple(torch.cat(x, dim=1) for x in zip(*parts))


# ---------------------------------------------------------------------------------------------------------------
# Window branch
# ---------------------------------------------------------------------------------------------------------------

def _window_chunk(spec, q, k, v, positions):
    """Keys with t - w < s <= t: w tokens, the query's own included."""
    w = spec.window.size
    first, last = max(0, int(positions.min()) - w + 1), int(positions.max()) + 1   # only the keys the chunk can see
    s = torch.arange(first, last, device=q.device)
    inside = (s[None, :] <= positions[:, None]) & (s[None, :] > positions[:, None] - w)
    o, lse, _ = masked_attention(q, k[:, first:last], v[:, first:last], inside[None, :, None, :], spec.softmax_scale)
    return o, lse


def window_attention(spec, q, k, v, *, query_chunk: int | None = None):
    """Sliding-window attention: (o [B,Tq,Hq,Dv], lse [B,Tq,Hq]); q holds the last Tq of k.shape[1] positions."""
    positions = query_positions(q.shape[1], k.shape[1], q.device)
    parts = [_window_chunk(spec, q[:, rows], k, v, positions[rows])
             for rows in query_chunks(q.shape[1], query_chunk)]
    return tuple(torch.cat(x, dim=1) for x in zip(*parts))


# ---------------------------------------------------------------------------------------------------------------
# The whole forward
# ---------------------------------------------------------------------------------------------------------------

def selection_unit(spec) -> int:
    """Tokens per selection unit: l' at block granularity, 1 at token granularity."""
    return spec.selection.block if spec.selection.granularity == "block" else 1


def _branch_kv(spec, inputs: dict, branch: str):
    k_name, v_name = kv_names(spec, branch)
    k = inputs[k_name]
    v = inputs[v_name] if v_name is not None else k[..., :spec.head_dim.v]     # MLA: V is the first Dv dims of K
    return k, v


def _check_inputs(spec, q, gates, extra: dict) -> dict:
    """All keyword inputs by name; TypeError for a missing or unexpected one (a misspelt name must not pass)."""
    expected = set(input_names(spec))
    given = {"q": q, **extra}
    if gates is not None:
        given["gates"] = gates
    unknown = sorted(set(given) - expected)
    missing = sorted(expected - set(given))
    if unknown:
        raise TypeError(f"nsa_forward() got unexpected inputs {unknown} for spec {spec.name!r}; "
                        f"it takes {sorted(expected)}")
    if missing:
        raise TypeError(f"nsa_forward() is missing inputs {missing} for spec {spec.name!r}")
    return given


def nsa_forward(spec, *, q, gates=None, indices=None, query_chunk: int | None = None, **kv_and_extra) -> NSAResult:
    """The spec's forward: every branch, gated (nsa) or alone (dsa).

    Keyword inputs are those of `input_names(spec)`. `indices` [B, Tq, Hkv, top_k], when given, replace the
    selection (to feed a kernel's choice to the reference); the scores are computed either way, for checking.
    q (and gates, q_idx, w_idx) may hold only the last Tq positions of the T = k.shape[1] keys (decoding).
    """
    inputs = _check_inputs(spec, q, gates, kv_and_extra)
    B, Tq, Hq, _ = q.shape
    has = spec.has
    first_branch = spec.branches[0]
    T = _branch_kv(spec, inputs, first_branch)[0].shape[1]
    positions = query_positions(Tq, T, q.device)

    # The compressed keys/values are needed by the compression branch and by the compression scorer; they are
    # O(T/d) rows, so they are pooled once for all chunks.
    if spec.needs_compressed_kv:
        k_cmp, v_cmp = _branch_kv(spec, inputs, "compression")
        k_cmp = pool_kv(spec, k_cmp, inputs.get("w_pool_k"), inputs.get("pe_pool_k"))
        v_cmp = pool_kv(spec, v_cmp, inputs.get("w_pool_v"), inputs.get("pe_pool_v"))
    if has["selection"]:
        sel = spec.selection
        unit = selection_unit(spec)
        if indices is not None and tuple(indices.shape) != (B, Tq, spec.heads.kv, sel.top_k):
            raise ValueError(f"indices must be [B, Tq, Hkv, top_k] = {[B, Tq, spec.heads.kv, sel.top_k]}, "
                             f"got {list(indices.shape)}")
    elif indices is not None:
        raise TypeError(f"spec {spec.name!r} has no selection branch, so it takes no indices")

    outs = {b: [] for b in spec.branches}
    lses = {b: [] for b in spec.branches}
    chosen, scores = [], []
    for rows in query_chunks(Tq, query_chunk):
        q_c, pos = q[:, rows], positions[rows]
        p_cmp = None
        if spec.needs_compressed_kv:
            o, lse, p_cmp = _compression_chunk(spec, q_c, k_cmp, v_cmp, pos)
            if has["compression"]:
                outs["compression"].append(o)
                lses["compression"].append(lse)
        if has["window"]:
            o, lse = _window_chunk(spec, q_c, *_branch_kv(spec, inputs, "window"), pos)
            outs["window"].append(o)
            lses["window"].append(lse)
        if has["selection"]:
            # Rank the units, pick (unless given), then attend. The ranking never gets gradients (top-n is not
            # differentiated), so it is computed without autograd history.
            with torch.no_grad():
                if sel.scorer == "compression":
                    S = selection_scores(spec, p_cmp, T)
                else:
                    S = indexer_scores_chunk(spec, inputs["q_idx"][:, rows], inputs["k_idx"],
                                             inputs["w_idx"][:, rows], pos)
                    if sel.granularity == "block":
                        S = indexer_block_scores(spec, S)
                if indices is None:
                    idx = top_units(S, pos, unit, sel.top_k, sel.initial, sel.local)
                else:
                    idx = indices[:, rows]
            o, lse = _sparse_chunk(spec, q_c, *_branch_kv(spec, inputs, "selection"), idx, unit, pos)
            outs["selection"].append(o)
            lses["selection"].append(lse)
            chosen.append(idx)
            scores.append(S)

    branch_out = {b: torch.cat(outs[b], dim=1) for b in spec.branches}
    lse = torch.stack([torch.cat(lses[b], dim=1) for b in spec.branches], dim=-1)
    if spec.gated:
        # o[t, h] = sum_c g[t, h, c] * o_c[t, h]; each branch has its own softmax.
        out = sum(gates[..., c, None] * branch_out[b] for c, b in enumerate(spec.branches))
    else:
        (out,) = branch_out.values()
    return NSAResult(out=out, lse=lse,
                     indices=torch.cat(chosen, dim=1) if has["selection"] else None,
                     scores=torch.cat(scores, dim=1) if has["selection"] else None,
                     branch_out=branch_out)
