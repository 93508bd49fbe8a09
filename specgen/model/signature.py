"""The call contract: the tensor arguments a spec's entry points take, declared once.

Every view of the argument list reads this: the renderer (the generated signatures, docstrings and descriptor),
the float64 reference (`reference.inputs`), the test kit (which inputs get gradients) and the benchmarks. A new
input is one entry here and, where it needs one, a line in the reference's random-input table.

Shapes use the symbols "B" and "T" for the batch and the sequence length (bound across arguments when a call is
checked); every other entry is fixed by the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import Spec

# The spec's kv branches, by the short name their independent key/value inputs carry (k_cmp, v_slc, ...).
SHORT = {"compression": "cmp", "selection": "slc", "window": "win"}


@dataclass(frozen=True)
class Argument:
    name: str
    shape: tuple          # str entries are symbols bound across arguments ("B", "T")
    doc: str
    differentiable: bool = True   # the backward returns its gradient (the selection, so the indexer, is not)
    keyword: bool = False         # keyword-only: required only because of a spec option, named in `why`
    why: str = ""
    spec_dtype: bool = True       # must have the spec's dtype

    @property
    def dims(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


def signature(spec: Spec) -> tuple[Argument, ...]:
    """The entry points' tensor arguments, in call order (q first)."""
    hq, hkv, dqk, dv = spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v
    args = [Argument("q", ("B", "T", hq, dqk), f"[B, T, {hq}, {dqk}] queries (after RoPE)")]
    if spec.kv == "shared":
        args.append(Argument("k", ("B", "T", hkv, dqk), f"[B, T, {hkv}, {dqk}] keys, every branch"))
        if not spec.mla:  # MLA: V is K[..., :Dv], no second tensor
            args.append(Argument("v", ("B", "T", hkv, dv), f"[B, T, {hkv}, {dv}] values, every branch"))
    else:
        for branch in spec.branches:
            s = SHORT[branch]
            args.append(Argument(f"k_{s}", ("B", "T", hkv, dqk), f"[B, T, {hkv}, {dqk}] {branch} keys"))
            args.append(Argument(f"v_{s}", ("B", "T", hkv, dv), f"[B, T, {hkv}, {dv}] {branch} values"))
    if spec.gated:
        nb = len(spec.branches)
        args.append(Argument("gates", ("B", "T", hq, nb),
                             f"[B, T, {hq}, {nb}] branch gates after the sigmoid, channels {', '.join(spec.branches)}"))
    cmp_ = spec.compression
    if cmp_ is not None and cmp_.pool == "linear":
        l = cmp_.block
        why = "the spec pools compression blocks with a learned linear map"
        args.append(Argument("w_pool_k", (hkv, l * dqk, dqk), f"[{hkv}, {l * dqk}, {dqk}] linear pool weight for keys",
                             keyword=True, why=why))
        if "compression" in spec.branches:
            args.append(Argument("w_pool_v", (hkv, l * dv, dv),
                                 f"[{hkv}, {l * dv}, {dv}] linear pool weight for values", keyword=True, why=why))
        if cmp_.position_embedding:
            why = "the spec adds a learned intra-block position embedding before pooling"
            args.append(Argument("pe_pool_k", (l, dqk), f"[{l}, {dqk}] key position embedding", keyword=True, why=why))
            if "compression" in spec.branches:
                args.append(Argument("pe_pool_v", (l, dv), f"[{l}, {dv}] value position embedding", keyword=True,
                                     why=why))
    if spec.selection is not None and spec.selection.scorer == "indexer":
        hi, di = spec.indexer.heads, spec.indexer.head_dim
        why = "the spec ranks selection candidates with a lightning indexer"
        # Top-k is not differentiated, so neither is the indexer that ranks it (it is trained by distillation).
        args.append(Argument("q_idx", ("B", "T", hkv * hi, di),
                             f"[B, T, {hkv * hi}, {di}] indexer queries ({hi} heads per kv group)",
                             differentiable=False, keyword=True, why=why))
        args.append(Argument("k_idx", ("B", "T", hkv, di), f"[B, T, {hkv}, {di}] indexer keys",
                             differentiable=False, keyword=True, why=why))
        args.append(Argument("w_idx", ("B", "T", hkv * hi), f"[B, T, {hkv * hi}] indexer head weights",
                             differentiable=False, keyword=True, why=why))
    return tuple(args)


def input_names(spec: Spec) -> list[str]:
    """Every tensor input, in call order."""
    return [a.name for a in signature(spec)]


def differentiable_names(spec: Spec) -> list[str]:
    """The inputs the backward returns gradients for, in call order."""
    return [a.name for a in signature(spec) if a.differentiable]
