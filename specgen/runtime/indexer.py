"""The lightning indexer's host side: `select` (the chunked top-k launches a module's scorer runs) and `index_topk`
(the top-k alone, its checks and packed (varlen) path; the module passes its scorer)."""

from __future__ import annotations

import torch

from . import (check_seqlen, check_tensor, check_varlen, fp8_index_queries, fp8_rows, interpreting, next_pow2,
               require_fp8)


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
        if desc.native_varlen:
            # Natively on the packed rows (docs/varlen.md): outputs [total, ...], nothing padded.
            if desc.fp8_indexer:
                require_fp8(fn, device)
            shape = (packed.total, desc.heads_kv, desc.top_k)
            indices = torch.empty(shape, dtype=torch.int32, device=device)
            scores = torch.empty(shape, dtype=torch.float32, device=device) if return_scores else None
            if packed.total:
                with torch.no_grad():
                    select(q_idx[None], k_idx[None], w_idx[None], indices[None],
                           None if scores is None else scores[None], varlen=packed.layout())
            return (indices, scores) if return_scores else indices
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


# Index scores of this many bytes at most are held at once (a fixed workspace: QC query rows x T keys, with the top-k's
# per-row lists of `list` int32 entries).
INDEX_WORKSPACE_BYTES = 256 * 2**20


def configs(table: dict) -> tuple[dict, dict]:
    """(score config, top-k config) of a module's CONFIGS: the GPU's tuned entries over the plan's defaults (a
    record tuned before a key existed keeps the default's value for it)."""
    from . import launch_config
    return tuple({**table["default"][k], **launch_config(table, k)} for k in ("select", "index_topk"))


def select(scores_kernel, topk_kernel, q_idx, k_idx, w_idx, indices, scores=None, *, unit: int, top_k: int,
           heads_kv: int, scale: float, fp8: bool, widen: bool, table: dict, varlen=None):
    """Top-k units by the indexer into `indices` (and, when given, their scores into `scores`), chunk by chunk of
    queries, so no T x T scores ever exist: `scores_kernel` (the module's `_index_scores_kernel`: `bt` query
    positions by `block_n` keys per program, key-major or query-major as the "select" config says) fills a
    workspace of QC query rows, `topk_kernel` (`_radix_topk_kernel`, the "index_topk" config) takes each row's
    top-k. `table`: the module's CONFIGS. `varlen`: a packed batch's runtime.varlen.Layout (inputs
    [1, total, ...]): see `_select_packed`."""
    score_cfg, topk_cfg = configs(table)
    if varlen is not None:
        return _select_packed(scores_kernel, topk_kernel, q_idx, k_idx, w_idx, indices, scores, varlen, unit=unit,
                              top_k=top_k, heads_kv=heads_kv, scale=scale, fp8=fp8, widen=widen,
                              score_cfg=score_cfg, topk_cfg=topk_cfg)
    B, T = q_idx.shape[0], q_idx.shape[1]
    if B * T == 0:  # an empty batch selects nothing (and has no workspace rows to size)
        return
    q_idx, k_idx, w_idx, extra = _index_inputs(q_idx, k_idx, w_idx, fp8)
    units = -(-T // unit)
    QC = _workspace_rows(T, B * heads_kv, units, topk_cfg)
    ws = torch.empty((B * heads_kv, QC, units), dtype=torch.float32, device=q_idx.device)
    lists = _lists(B * heads_kv, QC, units, top_k, topk_cfg, q_idx.device)
    bt, keys = score_cfg["bt"], score_cfg["block_n"]
    for q0 in range(0, T, QC):
        nq = min(QC, T - q0)
        # Rows with at most k candidates keep them all: their scores are needed only when asked for.
        if scores is not None or (q0 + nq - 1) // unit + 1 > top_k:
            scores_kernel[(-(-nq // bt), B * heads_kv, -(-(q0 + nq) // keys))](
                q_idx, k_idx, w_idx, ws, *extra, ws, ws, q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
                k_idx.stride(0), k_idx.stride(1), k_idx.stride(2), w_idx.stride(0), w_idx.stride(1),
                T, q0, QC, units, scale, WIDEN=interpreting() if fp8 else widen, **_score_meta(score_cfg))
        topk_kernel[(nq, B * heads_kv)](ws, indices, scores if scores is not None else ws, ws, ws, lists, T, q0, QC,
                                        units, WITH_SCORES=scores is not None, **_topk_meta(topk_cfg, bt, units, top_k))


def _score_meta(cfg: dict) -> dict:
    return dict(BT=cfg["bt"], KEYS=cfg["block_n"], KEY_MAJOR=bool(cfg["key_major"]), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _compacts(cfg: dict, units: int, top_k: int) -> bool:
    """Whether the top-k compacts: asked, and rows long enough that a list shorter than the row helps."""
    return bool(cfg["compact"]) and units > max(top_k, cfg["list"])


def _topk_meta(cfg: dict, bt: int, units: int, top_k: int) -> dict:
    return dict(BT=bt, COMPACT=_compacts(cfg, units, top_k), CHUNK=cfg["chunk"], LIST_LEN=cfg["list"],
                num_warps=cfg["num_warps"])


def _lists(lanes: int, rows: int, units: int, top_k: int, cfg: dict, device) -> torch.Tensor:
    """The compacting top-k's per-row lists [lanes, rows, list] int32 (one element when it does not compact)."""
    if not _compacts(cfg, units, top_k):
        return torch.empty(1, dtype=torch.int32, device=device)
    return torch.empty((lanes, rows, cfg["list"]), dtype=torch.int32, device=device)


def _workspace_rows(n_rows: int, lanes: int, units: int, topk_cfg: dict | None = None) -> int:
    """Query rows of the fp32 index-score workspace [lanes, rows, units] (with the top-k's int32 lists beside it): a
    power of two within INDEX_WORKSPACE_BYTES, at least 16, at most the rows there are. More rows a chunk mean more
    top-k programs a launch (one per row)."""
    per_row = 4 * lanes * (units + (topk_cfg["list"] if topk_cfg and topk_cfg["compact"] else 0))
    fit = max(1, INDEX_WORKSPACE_BYTES // per_row)
    return max(16, min(n_rows, 1 << (fit.bit_length() - 1)))


def _index_inputs(q_idx, k_idx, w_idx, fp8: bool):
    """The indexer's inputs as the score kernel takes them, and its extra arguments: with fp8, e4m3 rows with fp32
    scales (q_I's scales fold into the head weights, k_I's stay per token, passed as the extra argument)."""
    if not fp8:
        return q_idx, k_idx, w_idx, ()
    q_idx, w_idx = fp8_index_queries(q_idx, w_idx)
    k_idx, k_scale = fp8_rows(k_idx)
    return q_idx, k_idx, w_idx, (k_scale,)


def _select_packed(scores_kernel, topk_kernel, q_idx, k_idx, w_idx, indices, scores, layout, *, unit: int,
                   top_k: int, heads_kv: int, scale: float, fp8: bool, widen: bool, score_cfg: dict,
                   topk_cfg: dict):
    """`select` of a packed batch (docs/varlen.md), natively: both kernels walk the tile table of `bt` query
    positions per sequence (Layout.token_tiles; `bt` of the score config, so the key-major form's tiles are its
    own), C table entries per chunk. The workspace holds the chunk's C * bt query rows x cdiv(max_seqlen, unit)
    units (a fixed size, as in the batched path); a query tile never crosses a sequence, so each row's keys are its
    own sequence's, read from its first packed row."""
    total, max_seqlen = layout.total, layout.max_seqlen
    if layout.prefill:
        # A chunked prefill (runtime.prefill): k_idx is the cache's index keys, stored as the scorer takes them (fp8
        # rows with their scales, runtime.fp8_rows); max_seqlen is the longest sequence, its cache included.
        q_idx, w_idx = fp8_index_queries(q_idx, w_idx) if fp8 else (q_idx, w_idx)
        extra = (layout.k_scale,) if fp8 else ()
    else:
        q_idx, k_idx, w_idx, extra = _index_inputs(q_idx, k_idx, w_idx, fp8)
    bt, keys = score_cfg["bt"], score_cfg["block_n"]
    table, n_entries = layout.token_tiles(bt)
    units = -(-max_seqlen // unit)
    rows = _workspace_rows(total, heads_kv, units, topk_cfg)
    per_chunk = max(1, rows // bt)                 # tile-table entries per chunk
    QC = per_chunk * bt
    ws = torch.empty((heads_kv, QC, units), dtype=torch.float32, device=q_idx.device)
    lists = _lists(heads_kv, QC, units, top_k, topk_cfg, q_idx.device)
    # Rows with at most k candidates keep them all (their scores are needed only when asked for): only when every
    # sequence is that short can the score launches be skipped, since lengths are not read on the host.
    need_scores = scores is not None or (max_seqlen - 1) // unit + 1 > top_k
    tables = (layout.seq_table, table)
    for e0 in range(0, n_entries, per_chunk):
        ne = min(per_chunk, n_entries - e0)
        if need_scores:
            scores_kernel[(ne, heads_kv, -(-max_seqlen // keys))](
                q_idx, k_idx, w_idx, ws, *extra, *tables, q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
                k_idx.stride(0), k_idx.stride(1), k_idx.stride(2), w_idx.stride(0), w_idx.stride(1),
                total, e0, QC, units, scale, WIDEN=interpreting() if fp8 else widen, VARLEN=True,
                **_score_meta(score_cfg), **layout.flags)
        topk_kernel[(ne * bt, heads_kv)](ws, indices, scores if scores is not None else ws, *tables, lists, total, e0,
                                         QC, units, WITH_SCORES=scores is not None, VARLEN=True,
                                         **_topk_meta(topk_cfg, bt, units, top_k), **layout.flags)
