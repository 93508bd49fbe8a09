"""The inference entry point (`<family>_forward`): checks, the packed (varlen) path, the generated launches."""

from __future__ import annotations

from . import check_out
from .checks import check_given_indices, check_inputs, results
from .varlen import is_packed_call, pack, pad_indices, unpad_results


def forward(desc, args: tuple, *, indices=None, out=None, return_lse=False, return_indices=False,
            cu_seqlens=None, max_seqlen=None):
    """`<family>_forward` on its tensor inputs `args` (in `desc.args` order); see the generated docstring."""
    fn = desc.forward_name
    if is_packed_call(cu_seqlens, max_seqlen):
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
