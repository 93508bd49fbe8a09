"""Packed (varlen) calls: checking a packed batch [total, ...] with its cu_seqlens/max_seqlen, padding it to the
[N, max_seqlen] batch the kernels run on, and unpadding the results (docs/varlen.md). One implementation for every
entry point of every generated module, parametrised by the module's descriptor."""

from __future__ import annotations

import torch

from . import check_indices, check_tensor, check_varlen, require, trust_indices
from .checks import check_given_indices


def is_packed_call(cu_seqlens, max_seqlen) -> bool:
    return cu_seqlens is not None or max_seqlen is not None


def pack(desc, fn: str, cu_seqlens, max_seqlen, args: tuple, pad: bool = True):
    """A packed call's inputs [total, H, D] checked, with cu_seqlens and max_seqlen (before any kernel runs): the
    pad/unpad map and the inputs padded to [N, max_seqlen, H, D] (per-token inputs only; pool weights are shared
    by the sequences), or, without `pad` (a native call), as they are."""
    dims: dict = {}
    first = desc.args[0]
    q = check_tensor(fn, first.name, args[0], first.packed_shape, desc.dtype if first.checks_dtype else None, dims)
    device = q.device
    checked = [q]
    for a, x in zip(desc.args[1:], args[1:]):
        if a.keyword:
            require(fn, a.name, x, a.why)
        checked.append(check_tensor(fn, a.name, x, a.packed_shape, desc.dtype if a.checks_dtype else None, dims,
                                    device))
    packed = check_varlen(fn, cu_seqlens, max_seqlen, q.shape[0], device, desc.max_seqlen, desc.spec_name)
    if not pad:
        return packed, tuple(checked)
    return packed, tuple(packed.pad(x) if a.per_token else x for a, x in zip(desc.args, checked))


def native_indices(desc, fn: str, indices, packed, device):
    """A native packed call's given selection [total, HKV, top_k], checked (values per sequence), unpadded."""
    if indices is None or not desc.selects:
        # None, or the batched call's errors (a selection given to a spec without one; fp8 without the GPU for it).
        return check_given_indices(desc, fn, indices, 1, packed.total, device)
    return check_indices(fn, indices, (packed.total, desc.heads_kv, desc.top_k), device, desc.unit, packed)


def pad_indices(desc, fn: str, indices, packed, device):
    """A packed call's given selection [total, HKV, top_k], checked and padded. Padded rows get no selection (-1):
    any valid one would do, but -1 keeps them free of duplicates. Without a selection branch `indices` passes on
    unchanged (the batched call refuses it)."""
    if indices is None or not desc.selects:
        return indices
    return trust_indices(packed.pad(check_indices(
        fn, indices, (packed.total, desc.heads_kv, desc.top_k), device, desc.unit, packed), -1))


def unpad_results(desc, packed, o, lse, idx, return_lse: bool, return_indices: bool, out=None):
    """The padded batch's results packed again ([total, ...]; `out` receives the output when given)."""
    result = (packed.unpad(o, out),)
    if return_lse:
        result += (packed.unpad(lse),)
    if return_indices:
        result += (packed.unpad(idx) if desc.selects else None,)
    return result[0] if len(result) == 1 else result


# ---------------------------------------------------------------------------------------------------------------
# Native packed calls: the kernels run on the packed rows themselves (docs/varlen.md, "Native forward")
# ---------------------------------------------------------------------------------------------------------------


def tile_table(counts: torch.Tensor, n_programs: int) -> torch.Tensor:
    """The (sequence, tile) of each program of a packed launch, int32 [n_programs, 2], built on the device.

    `counts` [N] (int64) are the tiles of each sequence; program p takes the p-th tile of the batch in sequence
    order: `table[p] = (i, p - sum(counts[:i]))`. `n_programs` is an upper bound on sum(counts) known on the host
    (the grid, computed from shapes: no host read of cu_seqlens); programs past the batch's tiles get (-1, 0) and
    exit at once. Empty sequences have no tile."""
    device = counts.device
    ends = torch.cumsum(counts, 0)
    p = torch.arange(n_programs, device=device)
    seq = torch.searchsorted(ends, p, right=True)   # the first sequence whose tiles end after p
    real = seq < counts.numel()
    seq_c = seq.clamp(max=max(counts.numel() - 1, 0))
    tile = p - (ends - counts)[seq_c]
    return torch.stack((torch.where(real, seq_c, -1), torch.where(real, tile, 0)), dim=1).to(torch.int32).contiguous()


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """[N + 1] prefix sums of `counts` [N], 0 first (int32)."""
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)


class Layout:
    """A packed batch as the native kernels see it: inputs [total, ...] taken as a batch of one [1, total, ...],
    each program reading its sequence's first row (`bos = cu_seqlens[i]`) and length from cu_seqlens.

    Everything here is built on the device from cu_seqlens, without a host read (torch.compile and CUDA-graph
    friendly); sizes come from host ints only (`total`, N, the spec's block sizes), as upper bounds:
      - `token_tiles(bt)`: the tile table of a launch over query tiles of `bt` positions of each sequence, with
        cdiv(total, bt) + N programs (sum of cdiv(len_i, bt) is at most that);
      - `pooled(block, stride)`: per sequence NC_i = complete compression blocks, `cu_blocks` [N+1] their offsets
        in the packed pooled keys/values [total // stride, HKV, D] (NC_i <= len_i // stride since block >= stride,
        so the buffer holds them all), and the capacity;
      - `block_tiles(block, stride, bi)`: the pooling launch's table over tiles of `bi` pooled blocks;
      - `units(unit)`: per sequence cdiv(len_i, unit) selection units, their offsets `cu_units` [N+1] and the
        sequence of each packed unit [U] (U = total // unit + N bounds the batch's units): the block-outer
        selection's work list numbers the units of the whole batch so no block is shared across sequences.
    Tables are cached per tile size (a model's layers reuse them with the batch's Packed map).

    The forward kernels take `seq_table` where they read cu_seqlens and `flags` among their constexprs: a chunked
    prefill's runtime.prefill.PrefillLayout replaces both (PREFILL: per-sequence query offsets and key rows)."""

    prefill = False
    flags: dict = {}

    @property
    def seq_table(self) -> torch.Tensor:
        return self.cu_seqlens

    def seq_table_of(self, branch: str) -> torch.Tensor:
        """The table a branch's attention launch takes (a chunked prefill's window may read its own key rows)."""
        return self.seq_table

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, seq_of_token: torch.Tensor):
        self.cu_seqlens = cu_seqlens.contiguous()
        self.n = cu_seqlens.numel() - 1
        self.max_seqlen = max_seqlen
        self.total = total
        self.seq_of_token = seq_of_token
        self.lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        self._cache: dict = {}

    def _cached(self, key, build):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def token_tiles(self, bt: int) -> tuple[torch.Tensor, int]:
        """(table, programs) of a launch over tiles of `bt` query positions per sequence."""
        def build():
            n_programs = -(-self.total // bt) + self.n
            return tile_table((self.lengths + bt - 1) // bt, n_programs), n_programs
        return self._cached(("tokens", bt), build)

    def pooled_counts(self, block: int, stride: int) -> torch.Tensor:
        return self._cached(("nc", block, stride),
                            lambda: ((self.lengths - block).div(stride, rounding_mode="floor") + 1).clamp(min=0))

    def pooled(self, block: int, stride: int) -> tuple[torch.Tensor, int]:
        """(cu_blocks int32 [N+1], capacity): sequence i's pooled keys are rows cu_blocks[i] : cu_blocks[i+1] of a
        [capacity, HKV, D] buffer."""
        return self._cached(("pooled", block, stride),
                            lambda: (offsets(self.pooled_counts(block, stride)), self.total // stride))

    def block_tiles(self, block: int, stride: int, bi: int) -> tuple[torch.Tensor, int]:
        """(table, programs) of the pooling launch: tiles of `bi` pooled blocks per sequence."""
        def build():
            n_programs = -(-(self.total // stride) // bi) + self.n
            return tile_table((self.pooled_counts(block, stride) + bi - 1) // bi, n_programs), n_programs
        return self._cached(("pool", block, stride, bi), build)

    def units(self, unit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(cu_units int64 [N+1], unit_seq int32 [U], U) for selection units of `unit` tokens."""
        def build():
            counts = (self.lengths + unit - 1) // unit
            cu_units = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
            bound = self.total // unit + self.n
            u = torch.arange(bound, device=counts.device)
            unit_seq = torch.searchsorted(cu_units[1:], u, right=True).clamp(max=max(self.n - 1, 0))
            return cu_units, unit_seq.to(torch.int32), bound
        return self._cached(("units", unit), build)
