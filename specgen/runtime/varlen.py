"""Packed (varlen) calls: checking a packed batch [total, ...] with its cu_seqlens/max_seqlen, padding it to the
[N, max_seqlen] batch the kernels run on, and unpadding the results (docs/varlen.md). One implementation for every
entry point of every generated module, parametrised by the module's descriptor."""

from __future__ import annotations

from . import check_indices, check_tensor, check_varlen, require, trust_indices


def is_packed_call(cu_seqlens, max_seqlen) -> bool:
    return cu_seqlens is not None or max_seqlen is not None


def pack(desc, fn: str, cu_seqlens, max_seqlen, args: tuple):
    """A packed call's inputs [total, H, D] checked, with cu_seqlens and max_seqlen (before any kernel runs): the
    pad/unpad map and the inputs padded to [N, max_seqlen, H, D] (per-token inputs only; pool weights are shared
    by the sequences)."""
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
    return packed, tuple(packed.pad(x) if a.per_token else x for a, x in zip(desc.args, checked))


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
