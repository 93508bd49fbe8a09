"""The descriptor: the table of constants, argument names and callables a generated module hands the runtime.

A generated module keeps its @triton.jit kernels and their launch sequence (`forward`, `backward`), and describes
everything else with one frozen `Descriptor`; the host code in `specgen.runtime` (argument checks, varlen packing,
custom ops and autograd, the layer) is plain Python parametrised by it. The generator fills the fields with plan
values; nothing here is computed from a spec (this package imports nothing of the generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Indexer inputs: they only rank the selection, which is not differentiated (no gradients reach them).
INDEX_INPUTS = ("q_idx", "k_idx", "w_idx")


@dataclass(frozen=True)
class Arg:
    """One tensor argument of the generated functions, in call order."""
    name: str
    shape: tuple          # str entries are symbols bound across arguments ("B", "T")
    keyword: bool = False  # keyword-only (required by the spec, checked with `why`)
    why: str = ""
    checks_dtype: bool = True  # must be the spec's dtype

    @property
    def per_token(self) -> bool:
        """One row per token: padded in a packed (varlen) call; pool weights are shared by the sequences."""
        return "T" in self.shape

    @property
    def packed_shape(self) -> tuple:
        """The shape in a packed call: [B, T, ...] becomes [total, ...]."""
        if self.shape[:2] == ("B", "T"):
            return ("total",) + tuple(self.shape[2:])
        return tuple(self.shape)


@dataclass(frozen=True)
class Descriptor:
    """What the runtime needs to know of one generated module (one spec and tuning record)."""
    spec_name: str
    spec_hash: str
    records_hash: str     # the tuning record baked in: part of the custom ops' names
    family: str           # "nsa" or "dsa": names the public functions (nsa_forward, nsa_attention, ...)
    dtype: torch.dtype
    heads_q: int
    heads_kv: int
    dim_qk: int
    dim_v: int
    branches: tuple       # gate channel order
    max_seqlen: int
    args: tuple           # Arg, in call order
    top_k: int = 0        # 0: no selection branch
    unit: int = 1         # tokens per selection unit (checks of given indices)
    fp8_indexer: bool = False  # the indexer scores in fp8: the scorer needs a GPU that has it
    needs_compressed_kv: bool = False
    cmp_block: int = 0
    cmp_stride: int = 0
    gated: bool = False
    mla: bool = False     # v is k[..., :dim_v]
    linear_pool: bool = False
    pool_pe: bool = False
    indexer_heads: int = 0
    indexer_dim: int = 0
    softmax_scale: float = 0.0  # the kernels' sm_scale argument (the spec's scale, or d_qk ** -0.5)
    # The generated launch sequences, on checked arguments (in `args` order):
    #   forward(*args, indices=None, out=None, save_branch_outputs=False) -> ForwardState
    #   backward(dout, *diff_args, lse, indices, branch_out, kc, vc) -> gradients of diff_args
    #   (forward also takes varlen=<runtime.varlen.Layout> for a native packed call when native_varlen is set)
    forward: Optional[Callable] = field(default=None, compare=False)
    backward: Optional[Callable] = field(default=None, compare=False)
    # The forward's kernels take packed batches natively (docs/varlen.md); else packed calls are padded.
    native_varlen: bool = False
    # The selection backward's dK/dV (docs/backward.md): "inverse" (the key-tile kernel over the inverse index,
    # deterministic) or "scatter" (query-outer with fp32 atomics; the inverse-index kernels still run under
    # torch.use_deterministic_algorithms). The plan's choice (specgen.compile.loop_order.scatter_backward).
    selection_backward: str = "inverse"
    # Derived once here (not per call).
    arg_names: tuple = field(init=False, compare=False)
    diff_args: tuple = field(init=False, compare=False)
    index_args: tuple = field(init=False, compare=False)
    diff_positions: tuple = field(init=False, compare=False)
    index_inputs: tuple = field(init=False, compare=False)  # the Args of q_idx, k_idx, w_idx (indexer specs)
    forward_name: str = field(init=False, compare=False)    # nsa_forward, dsa_forward
    attention_name: str = field(init=False, compare=False)  # nsa_attention, dsa_attention
    kv_inputs: tuple = field(init=False, compare=False)

    def __post_init__(self):
        names = tuple(a.name for a in self.args)
        object.__setattr__(self, "arg_names", names)
        object.__setattr__(self, "diff_args", tuple(n for n in names if n not in INDEX_INPUTS))
        object.__setattr__(self, "index_args", tuple(n for n in names if n in INDEX_INPUTS))
        object.__setattr__(self, "index_inputs", tuple(a for a in self.args if a.name in INDEX_INPUTS))
        object.__setattr__(self, "diff_positions", tuple(i for i, n in enumerate(names) if n not in INDEX_INPUTS))
        object.__setattr__(self, "forward_name", f"{self.family}_forward")
        object.__setattr__(self, "attention_name", f"{self.family}_attention")
        # Per-token key/value inputs (the layer's fused kv projection), with their last dim.
        kv = tuple((n, self.dim_qk if n[0] == "k" else self.dim_v) for n in names
                   if (n in ("k", "v") or n[:2] in ("k_", "v_")) and n not in INDEX_INPUTS)
        object.__setattr__(self, "kv_inputs", kv)

    @property
    def selects(self) -> bool:
        return self.top_k > 0

    @property
    def n_branches(self) -> int:
        return len(self.branches)

    @property
    def has_compression_branch(self) -> bool:
        return "compression" in self.branches

    @property
    def op_name(self) -> str:
        """The custom ops' stem: the tuning record is part of it, since modules of one spec with different launch
        configs (a tuned committed copy and an untuned cache copy, say) must not share ops, whose implementation
        is the first registrant's; and the runtime schema, since the ops' outputs are the runtime's (their fake
        shapes: runtime.autograd) and torch.compile's on-disk caches (inductor's FX graph cache) know a custom op
        by its name alone: a graph compiled against a former runtime's outputs would be reused."""
        from specgen import RUNTIME_SCHEMA
        return f"{self.spec_name}_{self.spec_hash}_{self.records_hash}_s{RUNTIME_SCHEMA}"
