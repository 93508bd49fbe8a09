"""Chunked prefill into a KV cache (`<family>_prefill`, the layers' `prefill`): a chunk of new tokens per sequence
(ragged, thousands each) attends, causally and bottom-right aligned, to everything its sequence already holds in
a contiguous or paged cache plus the chunk itself, and is appended to the cache (docs/varlen.md, "Chunked
prefill"). flash-attn's `flash_attn_with_kvcache` convention: q batched [B, S, ...] or packed [total, ...] with
`cu_seqlens_q`/`max_seqlen_q`; `cache_seqlens` (the tokens held before the chunk) and `block_table`.

One call:
  1. checks every argument before anything runs or the cache changes (ArgumentError naming it);
  2. appends the chunk (`append_chunk`): its per-token tensors at positions held_i + j (index keys rounded as the
     cache stores them, fp8 + scale where the spec says so), the ring's last tokens, and the compression blocks the
     chunk completes, pooled by the module's pool kernel (the one `Cache.prefill` runs) over each sequence's
     tokens from the first incomplete block's start (up to l - 1 cached tokens, read back from the cache, then the
     chunk) — a block straddling the cache/chunk boundary included — so the cache is the one a single prefill
     builds;
  3. runs the module's packed forward (`_forward(..., varlen=PrefillLayout)`) on the chunk's queries with the
     kernels' PREFILL constexpr: each sequence's table row (first query row, queries, position of the first
     query, first key row) replaces its cu_seqlens entry, every visibility rule takes the query's absolute
     position, keys are the cache's (contiguous caches: the cache tensors themselves, sequence i from row
     i * capacity; paged caches: each sequence's rows gathered once per chunk into a packed key buffer), the
     compression branch and its scorer read the cache's pooled blocks, the indexer the cache's index keys.

The chunk lengths and the cache lengths are host ints (the cache's host mirror; `cu_seqlens_q` read once): a chunked
prefill is an eager call, not captured in CUDA graphs (the decode step is).
"""

from __future__ import annotations

import torch

from specgen import runtime as _rt
from specgen.runtime import checks
from specgen.runtime.decode_cache import Cache, completed_blocks, index_key_store
from specgen.runtime.varlen import Layout

_ENTRIES: dict = {}  # id(Descriptor) -> the module's prefill function (the layers look theirs up)


def _dev(x: torch.Tensor, device) -> torch.Tensor:
    """A host-built index tensor on the device without a stream synchronisation (a blocking copy would wait for
    the kernels already queued, so the host could not prepare a chunk while the GPU runs the previous one). Pinned
    first: from pageable memory the driver may synchronise with the stream to stage the copy; torch's caching host
    allocator reuses the pinned block once the copy is done."""
    if torch.device(device).type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class PrefillLayout(Layout):
    """A chunk as the forward kernels see it: the queries a packed batch of one [1, total_q, ...] (token tiles of
    each sequence's q_len_i queries, as a packed forward's), each sequence's row of `seq_table` int32 [N, 4] =
    (first query row, q_len_i, held_i = position of its first query, first key row) passed where the kernels take
    cu_seqlens (with PREFILL), pooled blocks the cache's (`pooled`: sequence i's from row i * nc_cap of the cache's
    kc/vc), selection units counted over each sequence's whole length (held_i + q_len_i)."""

    prefill = True

    def __init__(self, cu_q: torch.Tensor, q_lens: list, held: list, key_start: list, nc_cap: int, kc=None,
                 vc=None, k_scale=None):
        device = cu_q.device
        total = sum(q_lens)
        n = len(q_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(n), torch.tensor(q_lens, dtype=torch.long))
        seq_of_token = _dev(seq_of_token, device)
        self.k_lens = [h + q for h, q in zip(held, q_lens)]
        super().__init__(cu_q, max(self.k_lens), total, seq_of_token)
        starts = [sum(q_lens[:i]) for i in range(n)]
        self._seq_table = torch.tensor([[s, q, h, k] for s, q, h, k in zip(starts, q_lens, held, key_start)],
                                       dtype=torch.int32)
        self._seq_table = _dev(self._seq_table, device)
        self.flags = {"PREFILL": True}
        self._cmp_rows = _dev(torch.arange(n, dtype=torch.int32) * nc_cap, device), n * nc_cap
        self.kc, self.vc, self.k_scale = kc, vc, k_scale

    @property
    def seq_table(self) -> torch.Tensor:
        return self._seq_table

    def pooled(self, block: int, stride: int):
        return self._cmp_rows

    def pooled_for(self, x, which: int):
        """The cache's pooled keys (which = 0) or values (1): the prefill's compression inputs."""
        return self.kc if which == 0 else self.vc

    def units(self, unit: int):
        def build():
            counts = [-(-k // unit) for k in self.k_lens]
            cu_units = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
            bound = max(1, cu_units[-1].item())
            unit_seq = torch.searchsorted(cu_units[1:], torch.arange(bound), right=True).clamp(max=self.n - 1)
            device = self.cu_seqlens.device
            return _dev(cu_units, device), _dev(unit_seq.to(torch.int32), device), bound
        return self._cached(("units", unit), build)


def _rows(cache: Cache, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Flat cache rows of (sequence, position) pairs (int64, CPU tensors in, device out)."""
    return cache._rows(_dev(pos, cache.device), _dev(seq, cache.device))


def _pairs(lengths: list, starts: list | None = None):
    """(seq, pos) of positions starts[i] .. starts[i] + lengths[i] - 1 of every sequence i (CPU int64)."""
    n = torch.tensor(lengths, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), n)
    first = torch.cumsum(n, 0) - n
    pos = torch.arange(int(n.sum())) - first[seq]
    if starts is not None:
        pos = pos + torch.tensor(starts, dtype=torch.long)[seq]
    return seq, pos


def append_chunk(cache: Cache, new: dict, q_lens: list) -> None:
    """Append a checked chunk (packed tensors [total, Hkv, D], sequence i's q_lens[i] rows in order) to the cache:
    per-token tensors, ring tensors, index keys, the compression blocks it completes, and the lengths."""
    d = cache.DESCRIPTOR
    held = list(cache.host_seqlens)
    new_len = [h + n for h, n in zip(held, q_lens)]
    seq, pos = _pairs(q_lens, held)
    rows = _rows(cache, seq, pos)
    pool_in = _pool_inputs(cache, new, held, q_lens) if d.compressed else None   # before the ring is overwritten
    if d.ring_tensors:
        ring_keep = pos >= torch.tensor(new_len, dtype=torch.long)[seq] - d.ring
        ring_rows = _dev(cache._ring_rows(pos, seq)[ring_keep], cache.device)
        ring_keep = _dev(ring_keep.nonzero().flatten(), cache.device)   # indices: a device mask would sync
    for name, x in new.items():
        if name == "k_idx":
            x, scale = index_key_store(d, x)
            if d.fp8:
                cache.k_idx_scale.view(-1, d.hkv).index_copy_(0, rows, scale)
        if name in d.ring_tensors:
            cache._store(name, ring_rows, x.index_select(0, ring_keep))
        else:
            cache._store(name, rows, x)
    if pool_in is not None:
        _pool_chunk(cache, *pool_in)
    cache.host_seqlens = new_len
    cache.seqlens.copy_(torch.tensor(new_len, dtype=torch.int32), non_blocking=True)


def _pool_inputs(cache: Cache, new: dict, held: list, q_lens: list):
    """Per sequence, the tokens from the start of its first incomplete compression block (i0 * d, at most l - 1
    cached tokens before the chunk) to the chunk's end, packed: (x_k, x_v, cu, first block i0 per sequence)."""
    d = cache.DESCRIPTOR
    l, stride = d.cmp_block, d.cmp_stride
    i0 = [completed_blocks(h, l, stride) for h in held]
    start = [i * stride for i in i0]
    prefix = [h - s for h, s in zip(held, start)]                   # cached tokens of the first incomplete block
    seg = [p + n for p, n in zip(prefix, q_lens)]
    cu = torch.tensor([0] + seg, dtype=torch.long).cumsum(0)
    p_seq, p_pos = _pairs(prefix, start)
    p_dst = _dev(cu[:-1][p_seq] + p_pos - torch.tensor(start, dtype=torch.long)[p_seq], cache.device)
    c_seq, c_pos = _pairs(q_lens)
    c_dst = _dev(cu[:-1][c_seq] + torch.tensor(prefix, dtype=torch.long)[c_seq] + c_pos, cache.device)
    if d.ring_tensors:
        src = _dev(cache._ring_rows(p_pos, p_seq), cache.device)
    else:
        src = _rows(cache, p_seq, p_pos)
    xs = []
    for name in ((d.k_cmp, d.v_cmp) if d.cmp_branch else (d.k_cmp,)):
        x = torch.empty((int(cu[-1]), d.hkv, new[name].shape[-1]), dtype=d.dtype, device=cache.device)
        x[p_dst] = cache._flat(name)[src]
        x[c_dst] = new[name]
        xs.append(x)
    return xs, cu, i0, [completed_blocks(h + n, l, stride) - i for h, n, i in zip(held, q_lens, i0)]


def _pool_chunk(cache: Cache, xs: list, cu: torch.Tensor, i0: list, n_new: list) -> None:
    """Pool the chunk's newly complete blocks with the module's pool kernel (packed, one segment per sequence
    starting on a block boundary) and write them to rows i * nc_cap + i0[i] + j of kc (and vc)."""
    d = cache.DESCRIPTOR
    if sum(n_new) == 0:
        return
    total = int(cu[-1])
    lay = Layout(_dev(cu.to(torch.int32), cache.device), max(1, int((cu[1:] - cu[:-1]).max())), total, None)
    _, cap = lay.pooled(d.cmp_block, d.cmp_stride)
    # The segments' complete blocks, on the host (the kernel's cu_blocks, without reading it back).
    segs = (cu[1:] - cu[:-1]).tolist()
    cu_blocks = torch.tensor([0] + [completed_blocks(n, d.cmp_block, d.cmp_stride) for n in segs]).cumsum(0)
    b_seq, b_j = _pairs(n_new)
    src = _dev(cu_blocks[b_seq] + b_j, cache.device)
    dst = _dev(b_seq * cache.nc_cap + torch.tensor(i0, dtype=torch.long)[b_seq] + b_j, cache.device)
    linear = d.pool_kind == "linear"
    for x, out, which, D in zip(xs, (cache.kc, getattr(cache, "vc", None)), "kv", (d.dqk, d.dv)):
        weights = (cache.pool[f"w_pool_{which}"], cache.pool[f"pe_pool_{which}"]) if linear else ()
        pooled = d.pool(x[None], D, cap, *weights, varlen=lay, cmp_block=d.cmp_block, cmp_stride=d.cmp_stride)
        out.view(-1, d.hkv, D).index_copy_(0, dst, pooled[0][src])


def _check(desc, d, fn, q, cache, new, gates, q_idx, w_idx, cu_seqlens_q, max_seqlen_q, cache_seqlens, block_table,
           out):
    """Every argument, before anything runs: (q, new, gates, q_idx, w_idx packed [total, ...], cu_q, q_lens, out)."""
    if not (isinstance(cache, Cache) and cache.DESCRIPTOR is d):
        raise _rt.ArgumentError(f"{fn}: `cache` must be a {d.cache_class} of this module, got {type(cache).__name__}")
    if _rt.no_host_reads():
        raise _rt.ArgumentError(f"{fn}: a chunked prefill reads the chunk and cache lengths on the host; call it "
                                f"eagerly (outside torch.compile and CUDA-graph capture)")
    N, device = cache.batch, cache.device
    packed = cu_seqlens_q is not None or max_seqlen_q is not None
    dims: dict = {}
    lead = ("total",) if packed else ("B", "S")
    if not packed:
        dims["B"] = (N, "cache")
    q = _rt.check_tensor(fn, "q", q, lead + (d.hq, d.dqk), d.dtype, dims, device, device_of="the cache")
    if packed:
        p = _rt.check_varlen(fn, cu_seqlens_q, max_seqlen_q, q.shape[0], device, desc.max_seqlen, d.spec_name)
        if p.n != N:
            raise _rt.ArgumentError(f"{fn}: `cu_seqlens_q` describes {p.n} sequences but the cache holds {N}; pass "
                                    f"one (possibly empty) chunk per cache sequence")
        cu_q = cu_seqlens_q
        cu = cu_q.tolist()
        q_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    else:
        S = q.shape[1]
        q_lens = [S] * N
        cu_q = torch.arange(0, N * S + 1, S, dtype=torch.int32, device=device) if S else \
            torch.zeros(N + 1, dtype=torch.int32, device=device)
    per_token = {}
    for name, dim in d.cache_tensors.items():
        _rt.require(fn, name, new.get(name), "the cache stores it for every token (the chunk's are appended)")
        per_token[name] = _rt.check_tensor(fn, name, new[name], lead + (d.hkv, dim), d.dtype, dims, device,
                                           device_of="the cache")
    unknown = sorted(set(new) - set(d.cache_tensors))
    if unknown:
        raise _rt.ArgumentError(f"{fn}: unexpected arguments {unknown}; the chunk's per-token tensors are "
                                f"{', '.join(d.cache_tensors)}")
    if d.gated:
        _rt.require(fn, "gates", gates, "the spec mixes its branches with gates")
        gates = _rt.check_tensor(fn, "gates", gates, lead + (d.hq, d.n_branches), d.dtype, dims, device,
                                 device_of="the cache")
    if d.indexer:
        why = "the spec ranks selection candidates with a lightning indexer"
        _rt.require(fn, "q_idx", q_idx, why)
        _rt.require(fn, "w_idx", w_idx, why)
        hi = d.hkv * d.idx_heads
        q_idx = _rt.check_tensor(fn, "q_idx", q_idx, lead + (hi, d.idx_dim), d.dtype, dims, device,
                                 device_of="the cache")
        w_idx = _rt.check_tensor(fn, "w_idx", w_idx, lead + (hi,), d.dtype, dims, device, device_of="the cache")
    if cache_seqlens is not None:
        seqlens = _rt.check_seqlens_arg(fn, cache_seqlens, N, device).tolist()
        if seqlens != list(cache.host_seqlens):
            raise _rt.ArgumentError(f"{fn}: `cache_seqlens` {seqlens} differ from the tokens the cache holds "
                                    f"{list(cache.host_seqlens)}; a chunk continues each sequence where it ends "
                                    f"(pass the cache's own lengths, or leave cache_seqlens out)")
    if block_table is not None:
        if not cache.paged:
            raise _rt.ArgumentError(f"{fn}: `block_table` given for a contiguous cache; build the cache with "
                                    f"num_pages")
        block_table = _rt.check_block_table(fn, block_table, N, cache.num_pages, device, sync=False)
        if block_table.shape != cache.block_table.shape or not torch.equal(block_table, cache.block_table):
            raise _rt.ArgumentError(f"{fn}: `block_table` differs from the cache's; the chunk is written through the "
                                    f"cache's own table (pass it, or leave block_table out)")
    new_len = [h + n for h, n in zip(cache.host_seqlens, q_lens)]
    for i, (n, cap) in enumerate(zip(new_len, cache.capacity)):
        if n > cap:
            raise _rt.ArgumentError(f"{fn}: sequence {i} holds {cache.host_seqlens[i]} tokens and its chunk has "
                                    f"{q_lens[i]}: {n} exceeds the cache's capacity of {cap} for it; give it more "
                                    f"pages (or a larger max_seqlen for a contiguous cache), or a shorter chunk")
        if n > desc.max_seqlen:
            raise _rt.ArgumentError(f"{fn}: sequence {i} would reach {n} tokens, past the spec's max_seqlen="
                                    f"{desc.max_seqlen} (spec {d.spec_name}); raise it and rebuild")
    total = sum(q_lens)
    out = _rt.check_out(fn, out, (total, d.hq, d.dv) if packed else (N, q_lens[0], d.hq, d.dv), d.dtype, device)

    def flat(x):
        return x if x is None or packed else x.reshape(-1, *x.shape[2:])

    return (flat(q), {k: flat(v) for k, v in per_token.items()}, flat(gates), flat(q_idx), flat(w_idx), cu_q, q_lens,
            out, packed)


def _keys(cache: Cache, names: list, k_lens: list, q_lens: list):
    """The key axis of each name: (tensors [1, rows, Hkv, D] by name, per-sequence first key row, fp8 index-key
    scales or None). Contiguous: the cache's tensors, sequence i from row i * capacity. Paged: each sequence's rows
    0 .. k_len - 1 (sequences with a chunk only) gathered into one packed buffer."""
    d = cache.DESCRIPTOR
    if not cache.paged:
        keys = {name: cache._flat(name)[None] for name in names}
        scale = cache.k_idx_scale.view(-1, d.hkv) if d.fp8 else None
        return keys, [i * cache.tcap for i in range(cache.batch)], scale
    lens = [k if n else 0 for k, n in zip(k_lens, q_lens)]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    rows = _rows(cache, *_pairs(lens))
    keys = {}
    for name in names:
        src = cache._flat(name)
        if src.dtype == torch.float8_e4m3fn:  # index_select has no fp8 kernels: gather the bytes
            keys[name] = src.view(torch.uint8).index_select(0, rows).view(torch.float8_e4m3fn)[None]
        else:
            keys[name] = src.index_select(0, rows)[None]
    scale = cache.k_idx_scale.view(-1, d.hkv).index_select(0, rows) if d.fp8 else None
    return keys, starts, scale


def prefill(desc, d, q, cache, new: dict, *, gates=None, q_idx=None, w_idx=None, cu_seqlens_q=None, max_seqlen_q=None,
            cache_seqlens=None, block_table=None, out=None, return_lse=False, return_indices=False):
    """`<family>_prefill` (see `entry`)."""
    fn = f"{desc.family}_prefill"
    q, new, gates, q_idx, w_idx, cu_q, q_lens, out, packed = _check(
        desc, d, fn, q, cache, new, gates, q_idx, w_idx, cu_seqlens_q, max_seqlen_q, cache_seqlens, block_table, out)
    held = list(cache.host_seqlens)
    total = sum(q_lens)
    out_flat = out.view(total, d.hq, d.dv)
    append_chunk(cache, new, q_lens)
    lse = torch.empty((total, d.hq, d.n_branches), dtype=torch.float32, device=cache.device)
    idx = torch.empty((total, d.hkv, d.top_k), dtype=torch.int32, device=cache.device) if desc.selects else None
    if total:
        k_lens = [h + n for h, n in zip(held, q_lens)]
        attended = {name for name in (d.k_slc, d.v_slc, d.k_win, d.v_win) if name in d.cache_tensors} - set(
            d.ring_tensors)
        if d.indexer:
            attended.add("k_idx")
        keys, key_start, k_scale = _keys(cache, sorted(attended), k_lens, q_lens)
        nc_cap = cache.nc_cap if d.compressed else 1
        kc = cache.kc.view(1, -1, d.hkv, d.dqk) if d.compressed else None
        vc = cache.vc.view(1, -1, d.hkv, d.dv) if d.cmp_branch else None
        lay = PrefillLayout(cu_q, q_lens, held, key_start, nc_cap, kc, vc, k_scale)
        per_query = {"q": q, "gates": gates, "q_idx": q_idx, "w_idx": w_idx}
        args = []
        for a in desc.args:
            if a.name in per_query:
                args.append(per_query[a.name][None])
            elif a.name in keys:
                args.append(keys[a.name])
            elif a.name in (d.k_cmp, d.v_cmp) and d.compressed:
                args.append(kc if a.name == d.k_cmp else vc)   # pooled by the append: Forward.pool reads the layout
            else:
                args.append(cache.pool.get(a.name) if d.pool_kind == "linear" else None)
        state = desc.forward(*args, indices=None, out=out_flat[None], varlen=lay)
        lse = state.lse[0]
        if idx is not None:
            idx = state.indices[0]
    if not packed:
        lse, idx = lse.view(cache.batch, -1, *lse.shape[1:]), None if idx is None else idx.view(cache.batch, -1,
                                                                                                  *idx.shape[1:])
    return checks.results(out, lse, idx, return_lse, return_indices)


def entry(desc, d):
    """The module's `<family>_prefill(q, cache, **tensors)`, registered for its layer."""
    def fn(q, cache, *, gates=None, q_idx=None, w_idx=None, cu_seqlens_q=None, max_seqlen_q=None, cache_seqlens=None,
           block_table=None, out=None, return_lse=False, return_indices=False, **new):
        return prefill(desc, d, q, cache, new, gates=gates, q_idx=q_idx, w_idx=w_idx, cu_seqlens_q=cu_seqlens_q,
                       max_seqlen_q=max_seqlen_q, cache_seqlens=cache_seqlens, block_table=block_table, out=out,
                       return_lse=return_lse, return_indices=return_indices)

    fn.__name__ = fn.__qualname__ = f"{desc.family}_prefill"
    fn.__doc__ = _doc(desc, d)
    _ENTRIES[id(desc)] = fn
    return fn


def entry_of(desc):
    return _ENTRIES.get(id(desc))


def _doc(desc, d) -> str:
    names = ", ".join(f"{n} [.., {d.hkv}, {dim}]" for n, dim in d.cache_tensors.items())
    extra = (" gates [.., %d, %d]," % (d.hq, d.n_branches) if d.gated else "") + (
        " q_idx [.., %d, %d], w_idx [.., %d]," % (d.hkv * d.idx_heads, d.idx_dim, d.hkv * d.idx_heads)
        if d.indexer else "")
    return f"""Chunked prefill of `{d.spec_name}` into a {d.cache_class} (flash_attn_with_kvcache's convention).

    Each cache sequence i gets a chunk of q_len_i new tokens (0 allowed) at positions cache_seqlens[i] + 0 ..
    q_len_i - 1: the chunk's tensors ({names}) are appended to the cache (with the compression blocks and index keys
    they complete), then its queries attend causally (bottom-right aligned) to the sequence's cached tokens and the
    chunk. Prefilling a prompt in chunks of any sizes gives the outputs and the cache of one prefill.

    Arguments ({d.dtype}, on the cache's device): q [B, S, {d.hq}, {d.dqk}] (every sequence a chunk of S) or packed
    [total, {d.hq}, {d.dqk}] with cu_seqlens_q (int32 [B+1]) and max_seqlen_q; the per-token tensors and{extra}
    laid out like q. cache_seqlens: optional int32 [B], the tokens held before the chunk (must be the cache's).
    block_table: optional, must be the cache's own. out: optional preallocated output like q with {d.dv} dims.

    Returns out ([B, S, {d.hq}, {d.dv}] or [total, {d.hq}, {d.dv}]); with return_lse the per-branch log-sum-exp,
    with return_indices the selection (positions within each sequence, cache included). docs/varlen.md."""
