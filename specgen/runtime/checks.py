"""Argument checking of a generated module's entry points, parametrised by its descriptor (errors: one line,
raised before any kernel runs; tests/test_call_errors.py is their table)."""

from __future__ import annotations

import torch

from . import ArgumentError, check_indices, check_seqlen, check_tensor, require, require_fp8


def check_inputs(desc, fn: str, args: tuple) -> tuple:
    """A [B, T, ...] call's tensor inputs (in `desc.args` order) checked: shapes, dtypes, one device, required
    keyword inputs present, T within the spec's max_seqlen. Returns them (a copy only where the last dim was
    strided)."""
    dims: dict = {}
    first = desc.args[0]
    q = check_tensor(fn, first.name, args[0], first.shape, desc.dtype if first.checks_dtype else None, dims)
    device = q.device
    check_seqlen(fn, q.shape[1], desc.max_seqlen, desc.spec_name)
    checked = [q]
    for a, x in zip(desc.args[1:], args[1:]):
        if a.keyword:
            require(fn, a.name, x, a.why)
        checked.append(check_tensor(fn, a.name, x, a.shape, desc.dtype if a.checks_dtype else None, dims, device))
    return tuple(checked)


def check_given_indices(desc, fn: str, indices, B: int, T: int, device: torch.device):
    """A caller's `indices` (or, without them, what the spec's own scorer needs)."""
    if not desc.selects:
        if indices is not None:
            raise ArgumentError(f"{fn}: spec {desc.spec_name} has no selection branch, so it takes no `indices`")
        return None
    if indices is not None:
        return check_indices(fn, indices, (B, T, desc.heads_kv, desc.top_k), device, desc.unit)
    if desc.fp8_indexer:
        require_fp8(fn, device)
    return None


def results(out, lse, indices, return_lse: bool, return_indices: bool):
    """The entry points' return value: out, then lse and indices when asked for."""
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_indices:
        result += (indices,)
    return result[0] if len(result) == 1 else result
