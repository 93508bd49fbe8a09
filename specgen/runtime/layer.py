"""The attention layer (`NSAttention`, `DSAttention`): projections, rotary embedding and the differentiable
attention of one generated module, parametrised by its descriptor. The generated class subclasses `AttentionLayer`
and names its descriptor and attention (`_desc`, `_attention`)."""

from __future__ import annotations

import torch

from . import ArgumentError, check_varlen


def rope(x, theta, positions=None):
    """Rotary position embedding (rotate-half form) over the whole head dim of x [..., T, H, D], at `positions` [T]
    (default 0..T-1; a packed batch passes positions that restart at each sequence)."""
    T, half = x.shape[-3], x.shape[-1] // 2
    if positions is None:
        positions = torch.arange(T, device=x.device)
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None] * freq  # [T, half], or [B, T, half] (a batched chunk)
    cos, sin = angle.cos()[..., None, :], angle.sin()[..., None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class AttentionLayer(torch.nn.Module):
    """hidden [B, T, hidden_size] -> [B, T, hidden_size], or a packed batch [total, hidden_size] with
    `cu_seqlens`/`max_seqlen`; see the generated subclass's docstring for its projections."""

    _desc = None       # the generated module's Descriptor
    _attention = None  # its runtime.autograd.Attention

    def __init__(self, hidden_size, *, rope_theta=10000.0, bias=False, device=None, dtype=None):
        super().__init__()
        d = self._desc
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.rope_theta = rope_theta
        self.q_proj = torch.nn.Linear(hidden_size, d.heads_q * d.dim_qk, bias=bias, **factory)
        self.kv_proj = torch.nn.Linear(hidden_size, sum(n for _, n in d.kv_inputs) * d.heads_kv, bias=bias,
                                       **factory)
        if d.gated:
            self.gate_proj = torch.nn.Linear(hidden_size, d.heads_q * d.n_branches, bias=True, **factory)
        self.o_proj = torch.nn.Linear(d.heads_q * d.dim_v, hidden_size, bias=bias, **factory)
        if d.linear_pool:
            for which, dim in (("k", d.dim_qk), ("v", d.dim_v)):
                # [HKV, l*D, D]: row r*D + a of a block's flattened rows maps to column a with weight 1/l (mean
                # pooling).
                setattr(self, f"w_pool_{which}", torch.nn.Parameter(
                    (torch.eye(dim, **factory).repeat(d.cmp_block, 1) / d.cmp_block)
                    .expand(d.heads_kv, -1, -1).clone()))
                if d.pool_pe:
                    setattr(self, f"pe_pool_{which}", torch.nn.Parameter(torch.zeros(d.cmp_block, dim, **factory)))
        if d.index_args:
            self.idx_q_proj = torch.nn.Linear(hidden_size, d.heads_kv * d.indexer_heads * d.indexer_dim, bias=False,
                                              **factory)
            self.idx_k_proj = torch.nn.Linear(hidden_size, d.heads_kv * d.indexer_dim, bias=False, **factory)
            self.idx_w_proj = torch.nn.Linear(hidden_size, d.heads_kv * d.indexer_heads, bias=False, **factory)

    def _check_hidden(self, fn, hidden, packed_call):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != (2 if packed_call else 3) \
                or hidden.shape[-1] != self.hidden_size:
            want = "[total, hidden_size] (a packed batch)" if packed_call else "[B, T, hidden_size]"
            raise ArgumentError(f"{fn}: argument `hidden` must be {want} with hidden_size="
                                f"{self.hidden_size}, got {getattr(hidden, 'shape', type(hidden).__name__)}")

    def forward(self, hidden, *, cu_seqlens=None, max_seqlen=None):
        d = self._desc
        positions, varlen = None, {}
        fn = f"{type(self).__name__}.forward"
        packed_call = cu_seqlens is not None or max_seqlen is not None
        self._check_hidden(fn, hidden, packed_call)
        if packed_call:
            packed = check_varlen(fn, cu_seqlens, max_seqlen, hidden.shape[0], hidden.device, d.max_seqlen,
                                  d.spec_name)
            positions, varlen = packed.positions(), {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        args = self._inputs(hidden, positions)
        o = self._attention.attention(args, **varlen)
        return self._project_out(hidden, o)

    @torch.no_grad()
    def prefill(self, hidden, cache, *, cu_seqlens_q=None, max_seqlen_q=None):
        """Chunked prefill (inference): the chunk's hidden states [B, S, hidden_size] (or packed [total,
        hidden_size] with cu_seqlens_q / max_seqlen_q), one chunk per sequence of `cache` (built with this layer's
        pooling weights when the spec learns them), at positions cache.host_seqlens[i] + 0 ... (RoPE there): the
        chunk's keys/values/index keys are appended to the cache and its queries attend to the cache and the chunk
        (runtime.prefill). Prefilling in chunks of any sizes equals one prefill; decode afterwards from `cache`."""
        from . import prefill as _prefill

        d = self._desc
        fn = f"{type(self).__name__}.prefill"
        packed_call = cu_seqlens_q is not None or max_seqlen_q is not None
        self._check_hidden(fn, hidden, packed_call)
        held = torch.tensor(list(getattr(cache, "host_seqlens", [])), dtype=torch.long)
        if packed_call:
            packed = check_varlen(fn, cu_seqlens_q, max_seqlen_q, hidden.shape[0], hidden.device, d.max_seqlen,
                                  d.spec_name)
            if packed.n != held.numel():
                raise ArgumentError(f"{fn}: `cu_seqlens_q` describes {packed.n} sequences but the cache holds "
                                    f"{held.numel()}; pass one (possibly empty) chunk per cache sequence")
            positions = packed.positions() + held.to(hidden.device)[packed.seq]
        else:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :] + held.to(hidden.device)[:, None]
        args = dict(zip(d.arg_names, self._inputs(hidden, positions)))
        new = {name: args[name] for name in cache.DESCRIPTOR.cache_tensors}
        extra = {name: args[name] for name in ("gates", "q_idx", "w_idx") if name in args}
        o = _prefill.entry_of(d)(args["q"], cache, **new, **extra, cu_seqlens_q=cu_seqlens_q,
                                 max_seqlen_q=max_seqlen_q)
        return self._project_out(hidden, o)

    def _project_out(self, hidden, o):
        o = o.flatten(-2)
        if not torch.is_autocast_enabled(hidden.device.type):
            o = o.to(self.o_proj.weight.dtype)
        return self.o_proj(o)

    def _inputs(self, hidden, positions):
        """The attention's inputs (in the descriptor's argument order) from hidden states, RoPE at `positions`
        (None: 0 .. T - 1; [total] for a packed batch; [B, S] for a batched chunk)."""
        d = self._desc
        x = {"q": self.q_proj(hidden).unflatten(-1, (d.heads_q, d.dim_qk))}
        kv = self.kv_proj(hidden)
        ofs = 0
        for name, dim in d.kv_inputs:
            x[name] = kv[..., ofs:ofs + d.heads_kv * dim].unflatten(-1, (d.heads_kv, dim))
            ofs += d.heads_kv * dim
        if self.rope_theta is not None:
            x["q"] = rope(x["q"], self.rope_theta, positions)
            for name, _ in d.kv_inputs:
                if name[0] == "k":
                    x[name] = rope(x[name], self.rope_theta, positions)
        if d.gated:
            x["gates"] = torch.sigmoid(self.gate_proj(hidden).float()).unflatten(-1, (d.heads_q, d.n_branches))
        if d.index_args:
            x["q_idx"] = self.idx_q_proj(hidden).unflatten(-1, (d.heads_kv * d.indexer_heads, d.indexer_dim))
            x["k_idx"] = self.idx_k_proj(hidden).unflatten(-1, (d.heads_kv, d.indexer_dim))
            x["w_idx"] = self.idx_w_proj(hidden)
        return tuple((x[n] if n in x else getattr(self, n)).to(d.dtype) for n in d.arg_names)
