"""The decode KV cache, for every spec: a generated module subclasses `Cache` with its `DecodeDescriptor`
(`class NSACache(Cache): DESCRIPTOR = _DECODE`) and keeps only the class docstring (docs/decode.md).

Host logic only (torch ops, no Triton kernel but the descriptor's prefill pooling), so it is tested directly with
plain torch (tests/test_runtime_decode.py). Runtime checks go through the `specgen.runtime` package's functions,
looked up at call time (tests replace some of them).
"""

from __future__ import annotations

import numpy as np
import torch

from specgen import runtime as _rt
from specgen.runtime.decode_descriptor import DecodeDescriptor


def index_key_store(d: DecodeDescriptor, k_idx: torch.Tensor):
    """Index keys as the cache stores them: (values, per-(token, kv group) fp32 scales or None). fp8 specs store
    e4m3 rows scaled by amax/448 (runtime.fp8_rows: the prefill's own rounding), others the spec's dtype."""
    if d.fp8:
        return _rt.fp8_rows(k_idx)
    return k_idx.to(d.dtype), None


def pool_blocks(d: DecodeDescriptor, blocks: torch.Tensor, weight=None, pe=None) -> torch.Tensor:
    """Pool whole blocks [N, l, Hkv, D] -> [N, Hkv, D_out] as the pool kernel does (fp32 accumulation, one
    rounding): linear pooling flattens the block's rows (plus the position embedding, when the spec has one) to
    l*D and multiplies by the kv head's [l*D, D_out] weight; mean pooling takes the mean of the block's l rows."""
    if d.pool_kind == "linear":
        x = blocks.float()
        if d.position_embedding:
            x = x + pe.float()[None, :, None, :]
        flat = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
        return torch.einsum("ngf,gfe->nge", flat, weight.float()).to(d.dtype)
    return (blocks.float().sum(dim=1) * (1.0 / d.cmp_block)).to(d.dtype)


def completed_blocks(T: int, block: int, stride: int) -> int:
    """Complete compression blocks (l = block, stride d) of a sequence of T tokens."""
    return max(0, (T - block) // stride + 1)


class Cache:
    """KV cache for decoding; see the generated subclass's docstring. `DESCRIPTOR` (class attribute) is the
    generated module's DecodeDescriptor."""

    DESCRIPTOR: DecodeDescriptor = None

    def __init__(self, batch, max_seqlen=None, *, num_pages=None, block_table=None, device=None, page_size=None,
                 dtype=None):
        self._setup(batch, max_seqlen, num_pages, block_table, device, page_size, dtype, None)

    def _setup(self, batch, max_seqlen, num_pages, block_table, device, page_size, dtype, pool):
        """The constructor's body; `pool` holds the linear pooling's weights (specs that pool that way pass them
        to their own __init__, which calls this)."""
        d = self.DESCRIPTOR
        fn = d.cache_class
        batch, max_seqlen, num_pages, device = _rt.check_cache_args(fn, batch, max_seqlen, num_pages, block_table,
                                                                    device)
        # page_size and dtype are the spec's (optional here, for callers that pass them): checked, never changed.
        _rt.check_fixed(fn, "page_size", page_size, d.page_size, "decode.page_size", d.spec_name)
        _rt.check_fixed(fn, "dtype", dtype, d.dtype, "dtype", d.spec_name)
        self.batch = batch
        self.paged = num_pages is not None
        if self.paged:
            if block_table is None:
                per = num_pages // batch
                if per < 1:
                    raise _rt.ArgumentError(f"{fn}: {num_pages} pages cannot hold {batch} sequences; "
                                            "give at least one page per sequence")
                block_table = torch.arange(batch * per, dtype=torch.int32, device=device).reshape(batch, per)
            # The cache owns a copy: editing the caller's table later cannot point a step outside the pool.
            self.block_table = _rt.check_block_table(fn, block_table, batch, num_pages, device).clone()
            self.capacity = _rt.page_capacity(self.block_table, d.page_size)
            self._host_table = None
            self.host_table()   # read at construction (as the checks above did), not in a chunk
            self.tcap = 0
            rows = (num_pages, d.page_size)
        else:
            self.block_table = torch.zeros((batch, 1), dtype=torch.int32, device=device)  # unused placeholder
            self.capacity = [max_seqlen] * batch
            self.tcap = max_seqlen
            rows = (batch, max_seqlen)
        self.device = device
        self.num_pages = num_pages
        self.max_context = max(self.capacity)
        if d.fp8:
            _rt.require_fp8(fn, device)
        self.tensors = {name: torch.zeros((*(rows if name not in d.ring_tensors else (batch, d.ring)), d.hkv, dim),
                                          dtype=d.dtype, device=device)
                        for name, dim in d.cache_tensors.items()}
        if d.fp8:
            # fp8 index keys: e4m3 values and one fp32 scale per (token, kv group), in the same rows (runtime.fp8_rows).
            self.tensors["k_idx"] = self.tensors["k_idx"].to(torch.float8_e4m3fn)
            self.k_idx_scale = torch.zeros(self.tensors["k_idx"].shape[:-1], dtype=torch.float32, device=device)
        if d.compressed:
            # Complete compression blocks a sequence of max_context tokens can have, plus the spare row that absorbs
            # the writes of new tokens that complete no block (no data-dependent branch in the step).
            self.nc_cap = completed_blocks(self.max_context, d.cmp_block, d.cmp_stride) + 1
            self.kc = torch.zeros((batch, self.nc_cap, d.hkv, d.dqk), dtype=d.dtype, device=device)
            if d.cmp_branch:
                self.vc = torch.zeros((batch, self.nc_cap, d.hkv, d.dv), dtype=d.dtype, device=device)
            if d.pool_kind == "linear":
                self.pool = dict(pool)
                for name, _, _ in d.pool_weights:
                    _rt.require(fn, name, self.pool[name], "the spec pools compression blocks with learned weights")
                for name, shape, dtype_ in d.pool_weights:
                    if self.pool[name] is not None:
                        self.pool[name] = _rt.check_tensor(fn, name, self.pool[name], shape, dtype_, {}, device,
                                                           device_of="the cache")
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.host_seqlens = [0] * batch
        self.capacity_t = torch.tensor(self.capacity, dtype=torch.int32, device=device)  # for the in-graph guard
        # Device-side error flag: steps given explicit cache_seqlens / block_table whose values only the device
        # knows, and appends replayed past capacity, set a bit here instead of reading or writing outside the
        # cache (runtime.FLAG_TEXT); check_errors() raises it.
        self.error_flag = torch.zeros(1, dtype=torch.int32, device=device)
        if d.scorer == "compression":
            # The fused step form's tickets, one per selection program row (B x HKV x head chunks x q_len: at
            # most B x HQ x max_q_len); each step's last program of a row resets its ticket to 0
            # (specgen.runtime.decode_fused), so they need no memset per step.
            self.tickets = torch.zeros(batch * d.hq * d.max_q_len, dtype=torch.int32, device=device)
            # The persist form's counters (the layout of decode.j2's _decode_persist_kernel: 2 + 2 x B x HKV + B),
            # apart from the tickets because its top-n takes those during the same launch; its last program resets
            # them to 0.
            self.persist_counters = torch.zeros(2 + (2 * d.hkv + 1) * batch, dtype=torch.int32, device=device)

    def check_errors(self):
        """Raise ArgumentError if a decode step flagged out-of-range `cache_seqlens` / `block_table` values on
        the device (or a captured `append` ran past a sequence's pages), and clear the flag
        (runtime.raise_if_flagged: reads one int, so it synchronises)."""
        _rt.raise_if_flagged(self)

    def _rows(self, pos):
        """Flat row (page * page_size + slot, or b * T + s) of token positions pos [B, n] (int64) of every sequence
        in order (a chunked prefill's (sequence, position) pairs: host_rows)."""
        b = torch.arange(self.batch, device=pos.device)[:, None]
        if self.paged:
            page_size = self.DESCRIPTOR.page_size
            page = self.block_table.long()[b, pos // page_size]
            return page * page_size + pos % page_size
        return b * self.tcap + pos

    def host_table(self) -> np.ndarray:
        """The block table on the host (int32 numpy [batch, max_pages]), from which a chunked prefill builds its index
        lists without device ops: read at construction, and again only if `block_table` was replaced or edited in
        place since (the tensor's version counter), which reads it back once (a synchronisation)."""
        t = self.block_table
        mirror = self._host_table
        if mirror is None or mirror[0] is not t or mirror[1] != t._version:
            mirror = self._host_table = (t, t._version, t.cpu().numpy())
        return mirror[2]

    def host_rows(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """`_rows` of (sequence, position) pairs on the host (numpy int64 in and out; paged: the host table's)."""
        if self.paged:
            page_size = self.DESCRIPTOR.page_size
            return self.host_table()[seq, pos // page_size].astype(np.int64) * page_size + pos % page_size
        return seq * self.tcap + pos

    def host_ring_rows(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """`_ring_rows` of (sequence, position) pairs on the host (numpy int64)."""
        ring = self.DESCRIPTOR.ring
        return seq * ring + pos % ring

    def _ring_rows(self, pos):
        """Flat row of token positions in the per-sequence rings (b * RING + pos % RING); pos as in _rows."""
        ring = self.DESCRIPTOR.ring
        b = torch.arange(self.batch, device=pos.device)[:, None]
        return b * ring + pos % ring

    def _flat(self, name):
        x = self.tensors[name]
        return x.view(-1, *x.shape[2:])

    def _store(self, name, rows, x):
        """Write x [n, Hkv, D] at flat rows of tensor `name` (index_copy_ has no fp8 kernels: fp8 moves as bytes)."""
        dst = self._flat(name)
        if dst.dtype == torch.float8_e4m3fn:
            dst, x = dst.view(torch.uint8), x.view(torch.uint8)
        dst.index_copy_(0, rows, x)

    def _check_new(self, fn, tensors, n):
        d = self.DESCRIPTOR
        for name, dim in d.cache_tensors.items():
            _rt.require(fn, name, tensors.get(name), "the cache stores it for every token")
            tensors[name] = _rt.check_tensor(fn, name, tensors[name], (self.batch, n, d.hkv, dim),
                                             d.dtype, {}, self.device, device_of="the cache")
        unknown = sorted(set(tensors) - set(d.cache_tensors))
        if unknown:
            raise _rt.ArgumentError(f"{fn}: unexpected arguments {unknown}; the cache takes "
                                    f"{', '.join(d.cache_tensors)}")

    def prefill(self, seqlens=None, **tensors):
        """Write a prompt: tensors [batch, T, Hkv, D]; sequence b keeps its first seqlens[b] tokens (default T)."""
        d = self.DESCRIPTOR
        fn = f"{d.cache_class}.prefill"
        first = next(iter(tensors.values()), None)
        T = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 4 else None
        if T is None:
            raise _rt.ArgumentError(f"{fn}: pass the prompt's {', '.join(d.cache_tensors)} as [batch, T, Hkv, D]")
        self._check_new(fn, tensors, T)
        lengths = _rt.host_lengths(fn, seqlens, self.batch, T)
        _rt.check_fits(fn, lengths, self.capacity)
        pos = torch.arange(T, device=self.device)[None, :].expand(self.batch, T)
        keep = pos < torch.tensor(lengths, device=self.device)[:, None]
        rows = self._rows(torch.where(keep, pos, 0))[keep]
        # Ring tensors keep each sequence's last RING tokens.
        keep_ring = keep & (pos >= torch.tensor(lengths, device=self.device)[:, None] - d.ring)
        ring_rows = self._ring_rows(pos)[keep_ring]
        for name, x in tensors.items():
            if name == "k_idx":
                x, scale = index_key_store(d, x)
                if d.fp8:
                    self.k_idx_scale.view(-1, d.hkv).index_copy_(0, rows, scale[keep])
            if name in d.ring_tensors:
                self._store(name, ring_rows, x[keep_ring])
            else:
                self._store(name, rows, x[keep])
        if d.compressed:
            # Complete blocks of the padded prompt, pooled by the prefill kernel; blocks past a sequence's end are
            # invisible (visibility follows the length) and are rewritten when appended tokens complete them.
            NC = min(completed_blocks(T, d.cmp_block, d.cmp_stride), self.nc_cap - 1)
            if NC > 0:
                if d.pool_kind == "linear":
                    self.kc[:, :NC] = d.pool(tensors[d.k_cmp], d.dqk, NC, self.pool["w_pool_k"], self.pool["pe_pool_k"])
                    if d.cmp_branch:
                        self.vc[:, :NC] = d.pool(tensors[d.v_cmp], d.dv, NC, self.pool["w_pool_v"],
                                                 self.pool["pe_pool_v"])
                else:
                    self.kc[:, :NC] = d.pool(tensors[d.k_cmp], d.dqk, NC)
                    if d.cmp_branch:
                        self.vc[:, :NC] = d.pool(tensors[d.v_cmp], d.dv, NC)
        self.host_seqlens = list(lengths)
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        return self

    def append(self, **tensors):
        """Add q_len new tokens to every sequence (tensors [batch, q_len, Hkv, D]); graph-capturable (no host sync)."""
        d = self.DESCRIPTOR
        fn = f"{d.cache_class}.append"
        first = next(iter(tensors.values()), None)
        n = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 4 else None
        if n is None:
            raise _rt.ArgumentError(f"{fn}: pass the new tokens' {', '.join(d.cache_tensors)} as [batch, q_len, Hkv, D]")
        _rt.check_q_len(fn, n, d.max_q_len, d.spec_name)
        self._check_new(fn, tensors, n)
        _rt.check_fits(fn, [x + n for x in self.host_seqlens], self.capacity)
        pos = self.seqlens.long()[:, None] + torch.arange(n, device=self.device)[None, :]  # [B, n] new positions
        guarded = _rt.no_host_reads()
        if guarded:
            # Captured in a CUDA graph (or compiled): replays move the device lengths past what the host mirror
            # checked. Positions past a sequence's capacity are flagged and land on its last slot, so no write
            # leaves the sequence's rows and the lengths stay within its pages (cache.check_errors()).
            over = pos >= self.capacity_t.long()[:, None]
            self.error_flag.bitwise_or_(over.any().to(torch.int32) * _rt.FLAG_CAPACITY)
            pos = torch.minimum(pos, self.capacity_t.long()[:, None] - 1)
        rows = self._rows(pos).reshape(-1)
        ring_rows = self._ring_rows(pos).reshape(-1)
        for name, x in tensors.items():
            if name == "k_idx":
                x, scale = index_key_store(d, x)
                if d.fp8:
                    self.k_idx_scale.view(-1, d.hkv).index_copy_(0, rows, scale.reshape(-1, d.hkv))
            self._store(name, ring_rows if name in d.ring_tensors else rows, x.reshape(-1, *x.shape[2:]))
        if d.compressed:
            self._pool_completed(pos, n)
        if guarded:
            torch.minimum(self.seqlens + n, self.capacity_t, out=self.seqlens)
        else:
            self.seqlens += n
        self.host_seqlens = [x + n for x in self.host_seqlens]
        return self

    def _pool_completed(self, pos, n):
        """Pool the compression blocks the new tokens at positions pos [B, n] complete into kc (and vc)."""
        d = self.DESCRIPTOR
        l, stride = d.cmp_block, d.cmp_stride
        # A new token at p completes block i = (p - l + 1) / d when that is a whole number >= 0: pool exactly those
        # blocks (l tokens each, read back from the cache; indexed torch ops, no host sync); other rows go to the
        # spare row.
        start = pos - (l - 1)
        done = (start >= 0) & (start % stride == 0)
        start = torch.where(done, start, 0)
        # Clamped to the new token itself: rows of blocks not completed stay inside the sequence's pages.
        tokens = torch.minimum(start[:, :, None] + torch.arange(l, device=self.device), pos[:, :, None])
        if d.ring_tensors:
            # kv: independent: the compression keys/values live in the per-sequence rings.
            block_rows = self._ring_rows(tokens.reshape(self.batch, -1)).reshape(-1)
        else:
            # kv: shared: the block's rows are those of the full per-token k/v (pages or contiguous rows).
            block_rows = self._rows(tokens.reshape(self.batch, -1)).reshape(-1)
        dest = (torch.arange(self.batch, device=self.device)[:, None] * self.nc_cap
                + torch.where(done, start // stride, self.nc_cap - 1)).reshape(-1)
        linear = d.pool_kind == "linear"
        k_blocks = self._flat(d.k_cmp)[block_rows].view(self.batch * n, l, d.hkv, d.dqk)
        k_pooled = (pool_blocks(d, k_blocks, self.pool["w_pool_k"], self.pool["pe_pool_k"]) if linear
                    else pool_blocks(d, k_blocks))
        self.kc.view(-1, d.hkv, d.dqk).index_copy_(0, dest, k_pooled)
        if d.cmp_branch:
            v_blocks = self._flat(d.v_cmp)[block_rows].view(self.batch * n, l, d.hkv, d.dv)
            v_pooled = (pool_blocks(d, v_blocks, self.pool["w_pool_v"], self.pool["pe_pool_v"]) if linear
                        else pool_blocks(d, v_blocks))
            self.vc.view(-1, d.hkv, d.dv).index_copy_(0, dest, v_pooled)
