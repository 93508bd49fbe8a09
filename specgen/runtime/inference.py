"""The inference entry point (`<family>_forward`): checks, the packed (varlen) path, the generated launches."""

from __future__ import annotations

import torch

from . import check_out
from .checks import check_given_indices, check_inputs, results
from .varlen import is_packed_call, native_indices, pack, pad_indices, unpad_results


def forward(desc, args: tuple, *, indices=None, out=None, return_lse=False, return_indices=False,
            cu_seqlens=None, max_seqlen=None):
    """`<family>_forward` on its tensor inputs `args` (in `desc.args` order); see the generated docstring."""
    fn = desc.forward_name
    if is_packed_call(cu_seqlens, max_seqlen):
        if desc.native_varlen:
            return _forward_packed(desc, fn, args, indices, out, return_lse, return_indices, cu_seqlens, max_seqlen)
        packed, args = pack(desc, fn, cu_seqlens, max_seqlen, args)
        device = args[0].device
        out = check_out(fn, out, (packed.total, desc.heads_q, desc.dim_v), desc.dtype, device)
        indices = pad_indices(desc, fn, indices, packed, device)
        o, lse, idx = forward(desc, args, indices=indices, return_lse=True, return_indices=True)
        return unpad_results(desc, packed, o, lse, idx, return_lse, return_indices, out)
    args = check_inputs(desc, fn, args)
    q = args[0]
    device = q.device
    B, T = q.shape[0], q.shape[1]
    out = check_out(fn, out, (B, T, desc.heads_q, desc.dim_v), desc.dtype, device)
    indices = check_given_indices(desc, fn, indices, B, T, device)
    state = desc.forward(*args, indices=indices, out=out)
    return results(state.out, state.lse, state.indices, return_lse, return_indices)


def _forward_packed(desc, fn, args, indices, out, return_lse, return_indices, cu_seqlens, max_seqlen):
    """A packed call run natively (docs/varlen.md): the packed inputs [total, ...] go to the kernels as a batch of
    one [1, total, ...] with the batch's runtime.varlen.Layout; nothing is padded, every buffer is linear in
    total, and the results are views of the [1, total, ...] outputs (`out` itself when given)."""
    packed, args = pack(desc, fn, cu_seqlens, max_seqlen, args, pad=False)
    device = args[0].device
    out = check_out(fn, out, (packed.total, desc.heads_q, desc.dim_v), desc.dtype, device)
    indices = native_indices(desc, fn, indices, packed, device)
    if packed.total == 0:  # only empty sequences: nothing to launch
        lse = torch.empty((0, desc.heads_q, desc.n_branches), dtype=torch.float32, device=device)
        idx = torch.empty((0, desc.heads_kv, desc.top_k), dtype=torch.int32, device=device) if desc.selects else None
        return results(out, lse, idx, return_lse, return_indices)
    args = tuple(x.unsqueeze(0) if a.per_token else x for a, x in zip(desc.args, args))
    state = desc.forward(*args, indices=None if indices is None else indices.unsqueeze(0), out=out.unsqueeze(0),
                         varlen=packed.layout())
    idx = state.indices[0] if state.indices is not None else None
    return results(out, state.lse[0], idx, return_lse, return_indices)
