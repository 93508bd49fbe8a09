"""Chunked prefill into a KV cache (`<family>_prefill`, the layers' `prefill`): a chunk of new tokens per sequence
(ragged, thousands each) attends, causally and bottom-right aligned, to everything its sequence already holds in
a contiguous or paged cache plus the chunk itself, and is appended to the cache (docs/varlen.md, "Chunked
prefill"). flash-attn's `flash_attn_with_kvcache` convention: q batched [B, S, ...] or packed [total, ...] with
`cu_seqlens_q`/`max_seqlen_q`; `cache_seqlens` (the tokens held before the chunk) and `block_table`.

One call:
  1. checks every argument before anything runs or the cache changes (ArgumentError naming it), then builds the
     chunk's index lists on the host with numpy (`_Chunk`: O(chunk tokens + pages), from host ints and the cache's
     host copy of its block table) and moves them to the device in one copy;
  2. appends the chunk (`append_chunk`): its per-token tensors at positions held_i + j (index keys rounded as the
     cache stores them, fp8 + scale where the spec says so), the ring's last tokens, and the compression blocks the
     chunk completes, pooled by the module's pool kernel (the one `Cache.prefill` runs) over each sequence's
     tokens from the first incomplete block's start (up to l - 1 cached tokens, read back from the cache, then the
     chunk) — a block straddling the cache/chunk boundary included — so the cache is the one a single prefill
     builds;
  3. runs the module's packed forward (`_forward(..., varlen=PrefillLayout)`) on the chunk's queries with the
     kernels' PREFILL constexpr: each sequence's table row (first query row, queries, position of the first
     query, first key row) replaces its cu_seqlens entry, every visibility rule takes the query's absolute
     position, keys are the cache's (contiguous caches, and paged ones whose chunked sequences have consecutive
     pages: the cache tensors themselves, read in place; other paged caches: each sequence's pages gathered once
     per chunk into a packed key buffer, a window branch's own keys only from its first visible page), the
     compression branch and its scorer read the cache's pooled blocks, the indexer the cache's index keys.

The chunk lengths and the cache lengths are host ints (the cache's host mirror; `cu_seqlens_q` read once): a chunked
prefill is an eager call, not captured in CUDA graphs (the decode step is). No other host read: a batched chunk's
call queues its work without synchronising the stream, so the host prepares a chunk while the GPU runs the last.
"""

from __future__ import annotations

import numpy as np
import torch

from specgen import runtime as _rt
from specgen.runtime import checks
from specgen.runtime.decode_cache import Cache, completed_blocks, index_key_store
from specgen.runtime.varlen import Layout

_ENTRIES: dict = {}  # id(Descriptor) -> the module's prefill function (the layers look theirs up)

# How a paged cache's keys reach the attention (docs/varlen.md, "Keys"): "auto" reads them in place when every
# sequence with a chunk has its pages in consecutive pool order (the pool rows are then the sequence's rows, as in
# a contiguous cache), else gathers whole pages (the window branch's separate keys only from its first visible
# page); "gather" always gathers (tests and bench/prefill_cost.py --gather time the gather on any table).
KEY_READ = "auto"
# Bytes the key gathers of chunked prefills moved (read + written), summed over calls (bench/prefill_cost.py).
GATHERED = {"bytes": 0}

_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def _dev(x: torch.Tensor, device) -> torch.Tensor:
    """A host-built index tensor on the device without a stream synchronisation (a blocking copy would wait for
    the kernels already queued, so the host could not prepare a chunk while the GPU runs the previous one). Pinned
    first: from pageable memory the driver may synchronise with the stream to stage the copy; torch's caching host
    allocator reuses the pinned block once the copy is done."""
    if torch.device(device).type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _ship(arrays: dict, device) -> dict:
    """Host-built index arrays (numpy int64/int32, by name) on the device in one copy (`_dev`): laid out in one byte
    buffer, the int64 ones first; returns device views of it with the arrays' dtypes and shapes. A chunk's index
    lists are built with numpy on the host (O(tokens of the chunk) and O(pages), never O(tokens cached)) and moved
    at once: torch ops on small host tensors, and a copy per list, cost more host time than the lists."""
    groups = {dt: [(k, np.ascontiguousarray(a).reshape(-1)) for k, a in arrays.items() if a.dtype == dt]
              for dt in (np.dtype(np.int64), np.dtype(np.int32))}
    assert sum(len(g) for g in groups.values()) == len(arrays), "int64 and int32 arrays only"
    flat = {dt: np.concatenate([a for _, a in g] + [np.zeros(0, dt)]) for dt, g in groups.items()}
    n64 = flat[np.dtype(np.int64)].nbytes
    buf = np.empty(max(n64 + flat[np.dtype(np.int32)].nbytes, 8), dtype=np.uint8)
    buf[:n64] = flat[np.dtype(np.int64)].view(np.uint8)
    buf[n64:n64 + flat[np.dtype(np.int32)].nbytes] = flat[np.dtype(np.int32)].view(np.uint8)
    on_device = _dev(torch.from_numpy(buf), device)
    out = {}
    for dt, g in groups.items():
        if not g:
            continue
        part = on_device[:n64] if dt == np.int64 else on_device[n64:n64 + flat[dt].nbytes]
        part = part.view(_TORCH_DTYPES[dt])
        at = 0
        for name, a in g:
            view = part[at:at + a.size]
            out[name] = view if arrays[name].ndim == 1 else view.view(arrays[name].shape)
            at += a.size
    return out


def _pairs(lengths, starts=None):
    """(seq, pos) of positions starts[i] .. starts[i] + lengths[i] - 1 of every sequence i (numpy int64)."""
    n = np.asarray(lengths, dtype=np.int64)
    seq = np.repeat(np.arange(n.size, dtype=np.int64), n)
    first = np.cumsum(n) - n
    pos = np.arange(int(n.sum()), dtype=np.int64) - first[seq]
    if starts is not None:
        pos = pos + np.asarray(starts, dtype=np.int64)[seq]
    return seq, pos


def _offsets(counts) -> np.ndarray:
    """[N + 1] prefix sums, 0 first (int32): varlen.offsets on the host."""
    return np.concatenate(([0], np.cumsum(np.asarray(counts, dtype=np.int64)))).astype(np.int32)


def _tile_table(counts, n_programs: int) -> np.ndarray:
    """varlen.tile_table on the host: program p takes the p-th tile of the batch, (sequence, tile), or (-1, 0) past
    the batch's tiles (int32 [n_programs, 2], the same values as the device-built table)."""
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    p = np.arange(n_programs, dtype=np.int64)
    seq = np.searchsorted(ends, p, side="right")
    real = seq < counts.size
    seq_c = np.minimum(seq, max(counts.size - 1, 0))
    tile = p - (ends - counts)[seq_c]
    return np.stack((np.where(real, seq_c, -1), np.where(real, tile, 0)), axis=1).astype(np.int32)


class HostLayout(Layout):
    """A packed batch whose lengths the host knows (a chunk's, a pooling's segments): the tables of `Layout` —
    tile tables, pooled-block offsets, selection units — built with numpy on the host and moved to the device
    (`_ship`), the same values Layout's device ops give, in a fraction of the host time (no torch op per table
    entry kind, one copy per table). `cu_seqlens` is the device tensor the kernels take for the batch."""

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list, max_seqlen: int | None = None):
        self.cu_seqlens = cu_seqlens
        self.host_lengths = np.asarray(lengths, dtype=np.int64)
        self.n = len(lengths)
        self.total = int(self.host_lengths.sum())
        self.max_seqlen = max(lengths, default=0) if max_seqlen is None else max_seqlen
        self.device = cu_seqlens.device
        self._cache: dict = {}

    def _shipped(self, key, build):
        """`build()`'s numpy arrays (a tuple) on the device, once per key."""
        def make():
            arrays = build()
            dev = _ship({str(i): a for i, a in enumerate(arrays)}, self.device)
            return tuple(dev[str(i)] for i in range(len(arrays)))
        return self._cached(key, make)

    @property
    def lengths(self) -> torch.Tensor:
        return self._shipped("lengths", lambda: (self.host_lengths,))[0]

    @property
    def seq_of_token(self) -> torch.Tensor:
        return self._shipped("seq_of_token", lambda: (np.repeat(np.arange(self.n, dtype=np.int64),
                                                                self.host_lengths),))[0]

    def _pooled_counts(self, block: int, stride: int) -> np.ndarray:
        return np.maximum((self.host_lengths - block) // stride + 1, 0)

    def token_tiles(self, bt: int):
        n_programs = -(-self.total // bt) + self.n
        return self._shipped(("tokens", bt), lambda: (_tile_table(-(-self.host_lengths // bt), n_programs),))[0], \
            n_programs

    def pooled_counts(self, block: int, stride: int) -> torch.Tensor:
        return self._shipped(("nc", block, stride), lambda: (self._pooled_counts(block, stride),))[0]

    def pooled(self, block: int, stride: int):
        return self._shipped(("pooled", block, stride), lambda: (_offsets(self._pooled_counts(block, stride)),))[0], \
            self.total // stride

    def block_tiles(self, block: int, stride: int, bi: int):
        n_programs = -(-(self.total // stride) // bi) + self.n
        return self._shipped(("pool", block, stride, bi), lambda: (
            _tile_table(-(-self._pooled_counts(block, stride) // bi), n_programs),))[0], n_programs

    def units(self, unit: int):
        counts = -(-self.host_lengths // unit)
        bound = self.total // unit + self.n
        return self._units(("units", unit), counts, bound)

    def _units(self, key, counts, bound: int):
        def build():
            cu_units = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            u = np.arange(bound, dtype=np.int64)
            unit_seq = np.minimum(np.searchsorted(cu_units[1:], u, side="right"), max(self.n - 1, 0))
            return cu_units, unit_seq.astype(np.int32)
        cu_units, unit_seq = self._shipped(key, build)
        return cu_units, unit_seq, bound


class PrefillLayout(HostLayout):
    """A chunk as the forward kernels see it: the queries a packed batch of one [1, total_q, ...] (token tiles of
    each sequence's q_len_i queries, as a packed forward's), each sequence's row of `seq_table` int32 [N, 4] =
    (first query row, q_len_i, held_i = position of its first query, first key row) passed where the kernels take
    cu_seqlens (with PREFILL), pooled blocks the cache's (`pooled`: sequence i's from row i * nc_cap of the cache's
    kc/vc), selection units counted over each sequence's whole length (held_i + q_len_i). The window branch may read
    its own key buffer (`seq_table_of("window")`: its first key rows), see `_keys`."""

    prefill = True

    def __init__(self, cu_q: torch.Tensor, q_lens: list, held: list, tables: dict, nc_cap: int, kc=None, vc=None,
                 k_scale=None):
        self.k_lens = [h + q for h, q in zip(held, q_lens)]
        super().__init__(cu_q, q_lens, max(self.k_lens))
        self.flags = {"PREFILL": True}
        self._seq_table, self._win_table = tables["seq_table"], tables.get("win_table")
        self._cmp_rows = tables["cmp_rows"], self.n * nc_cap
        self.kc, self.vc, self.k_scale = kc, vc, k_scale

    @property
    def seq_table(self) -> torch.Tensor:
        return self._seq_table

    def seq_table_of(self, branch: str) -> torch.Tensor:
        return self._win_table if branch == "window" and self._win_table is not None else self._seq_table

    def pooled(self, block: int, stride: int):
        return self._cmp_rows

    def pooled_for(self, x, which: int):
        """The cache's pooled keys (which = 0) or values (1): the prefill's compression inputs."""
        return self.kc if which == 0 else self.vc

    def units(self, unit: int):
        counts = -(-np.asarray(self.k_lens, dtype=np.int64) // unit)
        return self._units(("units", unit), counts, max(1, int(counts.sum())))


class _Chunk:
    """One chunk's host plan: the index lists of its append (token rows, ring rows, the pooling's segments and
    pooled rows) and of its attention (the per-sequence tables; a paged cache's pages to gather, or none), built
    with numpy from host ints (the cache's lengths and block table mirror) and moved in one copy (`_ship`)."""

    def __init__(self, cache: Cache, q_lens: list, attended: list | None, cu_q_host: bool):
        d = cache.DESCRIPTOR
        self.cache, self.d = cache, d
        self.q_lens = q_lens
        self.held = held = list(cache.host_seqlens)
        self.new_len = new_len = [h + n for h, n in zip(held, q_lens)]
        n = len(q_lens)
        self.total = total = sum(q_lens)
        a: dict = {}
        seq, pos = _pairs(q_lens, held)
        a["rows"] = cache.host_rows(seq, pos)
        if d.ring_tensors:
            keep = np.nonzero(pos >= np.asarray(new_len, dtype=np.int64)[seq] - d.ring)[0]
            a["ring_rows"] = cache.host_ring_rows(seq[keep], pos[keep])
            a["ring_keep"] = keep.astype(np.int64)
        if d.compressed:
            self._plan_pool(a, seq, pos)
        a["seqlens"] = np.asarray(new_len, dtype=np.int32)
        if cu_q_host:
            a["cu_q"] = _offsets(q_lens)
        self.window = None
        if attended is not None and total:
            self._plan_keys(a, attended)
            starts = np.cumsum([0] + q_lens[:-1])
            a["seq_table"] = np.stack([starts, q_lens, held, self.key_start], axis=1).astype(np.int32)
            if self.window is not None:
                a["win_table"] = np.stack([starts, q_lens, held, self.window[1]], axis=1).astype(np.int32)
            a["cmp_rows"] = (np.arange(n, dtype=np.int64) * (cache.nc_cap if d.compressed else 1)).astype(np.int32)
        self.dev = _ship(a, cache.device)

    def _plan_pool(self, a: dict, seq, pos) -> None:
        """Per sequence, the tokens from the start of its first incomplete compression block (i0 * d, at most l - 1
        cached tokens before the chunk) to the chunk's end, packed into one segment each; the blocks they complete."""
        cache, d = self.cache, self.d
        l, stride = d.cmp_block, d.cmp_stride
        held, q_lens = self.held, self.q_lens
        self.i0 = i0 = [completed_blocks(h, l, stride) for h in held]
        start = np.asarray([i * stride for i in i0], dtype=np.int64)
        prefix = np.asarray(held, dtype=np.int64) - start               # cached tokens of the first incomplete block
        self.seg = seg = (prefix + np.asarray(q_lens, dtype=np.int64)).tolist()
        cu = np.concatenate(([0], np.cumsum(seg))).astype(np.int64)
        p_seq, p_pos = _pairs(prefix, start)
        a["p_dst"] = cu[:-1][p_seq] + p_pos - start[p_seq]
        a["p_src"] = (cache.host_ring_rows(p_seq, p_pos) if d.ring_tensors else cache.host_rows(p_seq, p_pos))
        c_seq = seq
        a["c_dst"] = cu[:-1][c_seq] + prefix[c_seq] + (pos - np.asarray(held, dtype=np.int64)[c_seq])
        a["cu_seg"] = cu.astype(np.int32)
        self.n_new = n_new = [completed_blocks(h + n, l, stride) - i for h, n, i in zip(held, q_lens, i0)]
        cu_blocks = np.concatenate(([0], np.cumsum([completed_blocks(s, l, stride) for s in seg]))).astype(np.int64)
        b_seq, b_j = _pairs(n_new)
        a["pool_src"] = cu_blocks[b_seq] + b_j
        a["pool_dst"] = b_seq * cache.nc_cap + np.asarray(i0, dtype=np.int64)[b_seq] + b_j

    def _plan_keys(self, a: dict, attended: list) -> None:
        """Where the attention reads each sequence's keys (`key_start`: the row of its position 0 in the key
        tensors). Contiguous caches, and paged ones whose chunked sequences have consecutive pages (KEY_READ
        "auto"): the cache's tensors themselves. Otherwise whole pages are gathered into one packed buffer: every
        page of the sequence's held_i + q_len_i tokens for the selection's (and the indexer's) keys; for a window
        branch with its own keys only the pages from the first one its queries see (position held_i - (w - 1))."""
        cache, d = self.cache, self.d
        held, q_lens, n = self.held, self.q_lens, len(self.q_lens)
        self.names = attended
        self.gather = None
        if not cache.paged:
            self.key_start = [i * cache.tcap for i in range(n)]
            return
        ps = d.page_size
        table = cache.host_table()
        pages = [-(-k // ps) if q else 0 for k, q in zip(self.new_len, q_lens)]
        if KEY_READ not in ("auto", "gather"):
            raise ValueError(f"runtime.prefill.KEY_READ must be 'auto' or 'gather', got {KEY_READ!r}")
        consecutive = all(p <= 1 or bool((np.diff(table[i, :p]) == 1).all()) for i, p in enumerate(pages))
        # (the tables' key rows are int32: a pool past 2**31 rows is gathered, whatever its order)
        in_range = all(int(table[i, 0]) * ps + p * ps < 2 ** 31 for i, p in enumerate(pages) if p)
        if KEY_READ == "auto" and consecutive and in_range:
            self.key_start = [int(table[i, 0]) * ps if p else 0 for i, p in enumerate(pages)]
            return
        own_window = d.window and d.k_win in attended and d.k_win not in (d.k_slc, d.v_slc)
        first = np.cumsum([0] + pages[:-1]) * ps
        self.key_start = first.tolist()
        a["pages"] = np.concatenate([table[i, :p] for i, p in enumerate(pages)] + [np.zeros(0, np.int32)]).astype(
            np.int64)
        self.gather = {"pages": int(sum(pages))}
        if own_window:
            lo = [max(0, h - (d.window - 1)) // ps if q else 0 for h, q in zip(held, q_lens)]
            w_pages = [p - f for p, f in zip(pages, lo)]
            w_first = np.cumsum([0] + w_pages[:-1]) * ps
            self.window = ({d.k_win, d.v_win}, (w_first - np.asarray(lo, dtype=np.int64) * ps).tolist())
            a["win_pages"] = np.concatenate([table[i, f:p] for i, (f, p) in enumerate(zip(lo, pages))]
                                            + [np.zeros(0, np.int32)]).astype(np.int64)
            self.gather["win_pages"] = int(sum(w_pages))

    def keys(self):
        """(key tensors [1, rows, Hkv, D] by name, fp8 index-key scales [rows, Hkv] or None)."""
        cache, d = self.cache, self.d
        scale = cache.k_idx_scale.view(-1, d.hkv) if d.fp8 else None
        if self.gather is None:
            return {name: cache._flat(name)[None] for name in self.names}, scale
        keys = {}
        for name in self.names:
            which = "win_pages" if self.window is not None and name in self.window[0] else "pages"
            keys[name] = _gather_pages(cache.tensors[name], self.dev[which])[None]
            GATHERED["bytes"] += 2 * keys[name].numel() * keys[name].element_size()
        if scale is not None:
            scale = _gather_pages(cache.k_idx_scale, self.dev["pages"])
            GATHERED["bytes"] += 2 * scale.numel() * scale.element_size()
        return keys, scale


def _gather_pages(x: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Pages of a paged cache tensor [num_pages, page_size, ...] in the given order, as rows [n * page_size, ...]
    (index_select has no fp8 kernels: fp8 moves as bytes)."""
    src = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
    out = src.index_select(0, pages)
    out = out.view(torch.float8_e4m3fn) if x.dtype == torch.float8_e4m3fn else out
    return out.view(-1, *x.shape[2:])


def append_chunk(cache: Cache, new: dict, q_lens: list, chunk: _Chunk | None = None) -> None:
    """Append a checked chunk (packed tensors [total, Hkv, D], sequence i's q_lens[i] rows in order) to the cache:
    per-token tensors, ring tensors, index keys, the compression blocks it completes, and the lengths. `chunk`:
    its plan (`_Chunk`, built from the cache's state before the append), made here when not given."""
    d = cache.DESCRIPTOR
    chunk = chunk if chunk is not None else _Chunk(cache, q_lens, None, False)
    dev = chunk.dev
    pool_in = _pool_inputs(cache, new, chunk) if d.compressed else None   # before the ring is overwritten
    for name, x in new.items():
        if name == "k_idx":
            x, scale = index_key_store(d, x)
            if d.fp8:
                cache.k_idx_scale.view(-1, d.hkv).index_copy_(0, dev["rows"], scale)
        if name in d.ring_tensors:
            cache._store(name, dev["ring_rows"], x.index_select(0, dev["ring_keep"]))
        else:
            cache._store(name, dev["rows"], x)
    if pool_in is not None:
        _pool_chunk(cache, pool_in, chunk)
    cache.host_seqlens = list(chunk.new_len)
    cache.seqlens.copy_(dev["seqlens"])


def _pool_inputs(cache: Cache, new: dict, chunk: _Chunk) -> list:
    """Each sequence's segment (up to l - 1 cached tokens, then the chunk's), packed: the pooling's inputs."""
    d, dev = cache.DESCRIPTOR, chunk.dev
    rows = sum(chunk.seg)
    xs = []
    for name in ((d.k_cmp, d.v_cmp) if d.cmp_branch else (d.k_cmp,)):
        x = torch.empty((rows, d.hkv, new[name].shape[-1]), dtype=d.dtype, device=cache.device)
        if dev["p_src"].numel():
            x[dev["p_dst"]] = cache._flat(name).index_select(0, dev["p_src"])
        x[dev["c_dst"]] = new[name]
        xs.append(x)
    return xs


def _pool_chunk(cache: Cache, xs: list, chunk: _Chunk) -> None:
    """Pool the chunk's newly complete blocks with the module's pool kernel (packed, one segment per sequence
    starting on a block boundary) and write them to rows i * nc_cap + i0[i] + j of kc (and vc)."""
    d, dev = cache.DESCRIPTOR, chunk.dev
    if sum(chunk.n_new) == 0:
        return
    lay = HostLayout(dev["cu_seg"], chunk.seg)
    _, cap = lay.pooled(d.cmp_block, d.cmp_stride)
    linear = d.pool_kind == "linear"
    for x, out, which, D in zip(xs, (cache.kc, getattr(cache, "vc", None)), "kv", (d.dqk, d.dv)):
        weights = (cache.pool[f"w_pool_{which}"], cache.pool[f"pe_pool_{which}"]) if linear else ()
        pooled = d.pool(x[None], D, cap, *weights, varlen=lay, cmp_block=d.cmp_block, cmp_stride=d.cmp_stride)
        out.view(-1, d.hkv, D).index_copy_(0, dev["pool_dst"], pooled[0].index_select(0, dev["pool_src"]))


def _check(desc, d, fn, q, cache, new, gates, q_idx, w_idx, cu_seqlens_q, max_seqlen_q, cache_seqlens, block_table,
           out):
    """Every argument, before anything runs: (q, new, gates, q_idx, w_idx packed [total, ...], cu_q (None for a
    batched q), q_lens, out)."""
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
        q_lens = [q.shape[1]] * N
        cu_q = None   # built on the host with the chunk's other index lists (_Chunk)
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


def prefill(desc, d, q, cache, new: dict, *, gates=None, q_idx=None, w_idx=None, cu_seqlens_q=None, max_seqlen_q=None,
            cache_seqlens=None, block_table=None, out=None, return_lse=False, return_indices=False):
    """`<family>_prefill` (see `entry`)."""
    fn = f"{desc.family}_prefill"
    q, new, gates, q_idx, w_idx, cu_q, q_lens, out, packed = _check(
        desc, d, fn, q, cache, new, gates, q_idx, w_idx, cu_seqlens_q, max_seqlen_q, cache_seqlens, block_table, out)
    total = sum(q_lens)
    out_flat = out.view(total, d.hq, d.dv)
    attended = {name for name in (d.k_slc, d.v_slc, d.k_win, d.v_win) if name in d.cache_tensors} - set(
        d.ring_tensors)
    if d.indexer:
        attended.add("k_idx")
    chunk = _Chunk(cache, q_lens, sorted(attended), cu_q is None)   # from the cache's state before the append
    cu_q = chunk.dev["cu_q"] if cu_q is None else cu_q
    held = chunk.held
    append_chunk(cache, new, q_lens, chunk)
    if total:
        keys, k_scale = chunk.keys()
        nc_cap = cache.nc_cap if d.compressed else 1
        kc = cache.kc.view(1, -1, d.hkv, d.dqk) if d.compressed else None
        vc = cache.vc.view(1, -1, d.hkv, d.dv) if d.cmp_branch else None
        lay = PrefillLayout(cu_q, q_lens, held, chunk.dev, nc_cap, kc, vc, k_scale)
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
        idx = state.indices[0] if desc.selects else None
    else:
        lse = torch.empty((0, d.hq, d.n_branches), dtype=torch.float32, device=cache.device)
        idx = torch.empty((0, d.hkv, d.top_k), dtype=torch.int32, device=cache.device) if desc.selects else None
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
