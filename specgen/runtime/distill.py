"""Host code of the indexer distillation loss (docs/distill.md): argument checks, the packed (varlen) path, the
stage logic and the custom op's autograd glue, parametrised by the module's descriptor; the generated module keeps
the kernels and the custom ops that launch them (`fwd`, `bwd`)."""

from __future__ import annotations

import torch

from . import ArgumentError, check_indices, check_seqlen, check_tensor, check_varlen

INPUTS = ("q", "k", "q_idx", "k_idx", "w_idx")


def inverse_index(indices, heads_kv: int):
    """CSR of the selection transposed, built with a stable sort (deterministic): (ptr int64 [B*heads_kv*T + 1],
    pos int64 [B*T*heads_kv*k]). pos lists the flat positions of the valid pairs (0 <= s <= t) sorted by (b, g, s)
    then t, invalid ones last; key s of (b, g) owns pos[ptr[(b*heads_kv + g)*T + s] : ptr[... + 1]]."""
    B, T = indices.shape[0], indices.shape[1]
    idx = indices.long()
    t = torch.arange(T, device=indices.device).view(1, T, 1, 1)
    valid = (idx >= 0) & (idx <= t)
    bg = (torch.arange(B, device=indices.device).view(B, 1, 1, 1) * heads_kv
          + torch.arange(heads_kv, device=indices.device).view(1, 1, heads_kv, 1))
    n_keys = B * heads_kv * T
    key = torch.where(valid, bg * T + idx, n_keys).flatten()
    key, pos = torch.sort(key, stable=True)
    ptr = torch.searchsorted(key, torch.arange(n_keys + 1, device=indices.device))
    return ptr, pos


class Distill:
    """The distillation loss of one generated module: `fwd`/`bwd` its custom ops, `index_topk` its indexer top-k,
    `default_stage` the spec's indexer.stage."""

    def __init__(self, desc, fwd, bwd, index_topk, default_stage: str):
        self.desc = desc
        self.fwd, self.bwd, self.index_topk = fwd, bwd, index_topk
        self.default_stage = default_stage
        by_name = {a.name: a for a in desc.args}
        self.inputs = tuple(by_name[n] for n in INPUTS)

    def setup_context(self, ctx, inputs, output):
        q, k, q_idx, k_idx, w_idx, indices, lse_main, row_ok = inputs
        _, stats, lse_out = output
        ctx.save_for_backward(q, k, q_idx, k_idx, w_idx, indices, lse_main if lse_main is not None else lse_out,
                              stats)

    def backward(self, ctx, grad, _grad_stats, _grad_lse):
        q, k, q_idx, k_idx, w_idx, indices, lse, stats = ctx.saved_tensors
        dq_idx, dk_idx, dw_idx = self.bwd(grad, q, k, q_idx, k_idx, w_idx, indices, lse, stats)
        # The target is detached: no gradient reaches the main attention's q and k (nor lse_main).
        return None, None, dq_idx, dk_idx, dw_idx, None, None, None

    def loss(self, q, k, q_idx, k_idx, w_idx, *, indices=None, lse_main=None, stage=None, cu_seqlens=None,
             max_seqlen=None):
        """`distill_loss`; see the generated docstring."""
        d = self.desc
        fn = "distill_loss"
        dims: dict = {}
        if stage is None:
            stage = "sparse" if indices is not None else self.default_stage
        if stage not in ("dense", "sparse"):
            raise ArgumentError(f"{fn}: argument `stage` must be 'dense' or 'sparse' (or None: the spec's "
                                f"'{self.default_stage}'), got {stage!r}")
        if stage == "dense" and indices is not None:
            raise ArgumentError(f"{fn}: the dense warm-up stage distils over every s <= t and takes no "
                                f"`indices`; pass stage='sparse' to distil over a selection")
        row_ok = None
        packed_call = cu_seqlens is not None or max_seqlen is not None
        x = [q, k, q_idx, k_idx, w_idx]
        for i, a in enumerate(self.inputs):
            shape = a.packed_shape if packed_call else a.shape
            x[i] = check_tensor(fn, a.name, x[i], shape, d.dtype, dims, None if i == 0 else device)
            if i == 0:
                device = x[0].device
                if not packed_call:
                    check_seqlen(fn, x[0].shape[1], d.max_seqlen, d.spec_name)
        q, k, q_idx, k_idx, w_idx = x
        rows = (q.shape[0],) if packed_call else (q.shape[0], q.shape[1])
        packed = None
        if len(rows) == 1:
            packed = check_varlen(fn, cu_seqlens, max_seqlen, rows[0], device, d.max_seqlen, d.spec_name)
        if indices is not None:
            indices = check_indices(fn, indices, rows + (d.heads_kv, d.top_k), device, d.unit, packed)
        if lse_main is not None:
            lse_main = check_tensor(fn, "lse_main", lse_main, rows + (d.heads_q,), torch.float32, {}, device).detach()
        if packed is not None:
            # A packed batch runs padded to [N, max_seqlen]; the padding rows are masked out of the loss (row_ok).
            q, k, q_idx, k_idx, w_idx = (packed.pad(t) for t in (q, k, q_idx, k_idx, w_idx))
            if indices is not None:
                indices = packed.pad(indices, -1)
            if lse_main is not None:
                lse_main = packed.pad(lse_main)
            row_ok = packed.row_ok
        if indices is None and stage == "sparse":
            indices = self.index_topk(q_idx.detach(), k_idx.detach(), w_idx.detach())
        if lse_main is not None:
            lse_main = lse_main.contiguous()
        loss, _, _ = self.fwd(q.detach(), k.detach(), q_idx, k_idx, w_idx, indices, lse_main, row_ok)
        return loss
