"""The keyword inputs a spec's functional API takes, and random ones of the right shapes.

The names are a contract shared with the generated Triton modules:

    q                      [B, T, Hq, Dqk]
    k, v                   [B, T, Hkv, Dqk], [B, T, Hkv, Dv]     kv: shared (with mla there is no v: v = k[..., :Dv])
    k_cmp/v_cmp, k_slc/v_slc, k_win/v_win                         kv: independent, one pair per branch present
    gates                  [B, T, Hq, n_branches]                 gated (nsa) specs; already through the sigmoid
    w_pool_k, w_pool_v     [Hkv, l*Dqk, Dqk], [Hkv, l*Dv, Dv]     compression.pool: linear
    pe_pool_k, pe_pool_v   [l, Dqk], [l, Dv]                      ... with position_embedding
    q_idx, k_idx, w_idx    [B, T, Hkv*H_I, d_I], [B, T, Hkv, d_I], [B, T, Hkv*H_I]    selection.scorer: indexer
"""

from __future__ import annotations

import torch

from ..model import signature

BRANCH_KV = {"compression": ("k_cmp", "v_cmp"), "selection": ("k_slc", "v_slc"), "window": ("k_win", "v_win")}


def kv_names(spec, branch: str) -> tuple[str, str | None]:
    """Names of the key and value inputs one branch reads (value None with mla: V is a slice of K)."""
    if spec.kv == "shared":
        return "k", (None if spec.mla else "v")
    return BRANCH_KV[branch]


def input_names(spec) -> list[str]:
    """Every keyword input of the spec's forward, in call order (q first): the call contract's names."""
    return signature.input_names(spec)


def make_inputs(spec, B: int, T: int, *, dtype=torch.float64, device="cpu",
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random inputs for every name in `input_names(spec)`, scaled so that every score is O(1).

    q, k, v ~ N(0, 1) (with the softmax scale D^-1/2 the logits are ~N(0, 1)); gates = sigmoid(N(0, 1)); linear pool
    weights ~ N(0, 1/(l*D)) so a pooled key keeps unit scale; position embeddings ~ N(0, 0.1^2); indexer q/k ~ N(0, 1)
    and w ~ N(0, 1) (its default scale then makes I ~ O(1)). Nothing is zero, so no branch is trivially checked.
    """
    Hq, Hkv = spec.heads.q, spec.heads.kv
    Dqk, Dv = spec.head_dim.qk, spec.head_dim.v

    def randn(*shape, std=1.0):
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator) * std

    dims = {"k": Dqk, "v": Dv}
    out: dict[str, torch.Tensor] = {}
    for name in input_names(spec):
        if name == "q":
            out[name] = randn(B, T, Hq, Dqk)
        elif name in ("k", "v") or name in {n for pair in BRANCH_KV.values() for n in pair}:
            out[name] = randn(B, T, Hkv, dims[name[0]])
        elif name == "gates":
            out[name] = torch.sigmoid(randn(B, T, Hq, len(spec.branches)))
        elif name in ("w_pool_k", "w_pool_v"):
            D, l = dims[name[-1]], spec.compression.block
            out[name] = randn(Hkv, l * D, D, std=(l * D) ** -0.5)
        elif name in ("pe_pool_k", "pe_pool_v"):
            out[name] = randn(spec.compression.block, dims[name[-1]], std=0.1)
        elif name == "q_idx":
            out[name] = randn(B, T, Hkv * spec.indexer.heads, spec.indexer.head_dim)
        elif name == "k_idx":
            out[name] = randn(B, T, Hkv, spec.indexer.head_dim)
        elif name == "w_idx":
            out[name] = randn(B, T, Hkv * spec.indexer.heads)
        else:  # pragma: no cover - input_names and this table must agree
            raise AssertionError(f"no generator for input {name!r}")
    return out


def make_unabsorbed_qk(spec, B: int, T: int, *, dtype=torch.float64, device="cpu",
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q and k of an MLA spec in its unabsorbed form (spec.unabsorbed: a key per query head), each
    [B, T, Hq, unabsorbed.qk] ~ N(0, 1): what the dense distillation stage takes besides the absorbed q and k."""
    if spec.unabsorbed is None:
        raise ValueError(f"spec {spec.name!r} has no `unabsorbed` head dims")
    shape = (B, T, spec.heads.q, spec.unabsorbed.qk)
    return (torch.randn(*shape, dtype=dtype, device=device, generator=generator),
            torch.randn(*shape, dtype=dtype, device=device, generator=generator))
