"""Tier 2 (docs/testing.md): the full matrix of generated kernels on small mirror specs, against float64.

Every variant is derived from specs/nsa_small.yaml (or a miniature of specs/nsa_token.yaml) with `replace`,
built with `specgen.load` into a temporary cache, and checked with `specgen.testing.check_forward` at two
sequence lengths, both odd so that they are a multiple of no block size (every block size is a power of two):
a short one (B=2, a few blocks) and a long one (B=1) past (top_k + 2) * l', so that top-n must drop candidates.

Two more tests check selection exactly: a planted block must win for every later query, and indices passed in
with `indices=` must be the ones attended.

Under the CPU interpreter a kernel loop trip costs ~10 ms, so the shapes are tiny: the file runs in ~3 minutes.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime
from specgen import reference as R
from specgen import testing
from specgen.reference._core import query_positions, top_units
from small_specs import small_token_spec
from specgen.model.spec import Spec, load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")   # GQA 4/2, d 48/32, fp16, l=8 d=4 l'=16, top_k 4 (1+1 forced), w=16


def small(name: str, **changes) -> Spec:
    return replace(SMALL, name=f"nsa_small_{name}", **changes)


def token(name: str, **changes) -> Spec:
    return small_token_spec(f"nsa_token_{name}", **changes)


# Each variant is built lazily (a lambda), so a spec the validator refuses fails its own test only.
VARIANTS = {
    # head layouts
    "gqa": lambda: small("gqa"),
    "mha": lambda: small("mha", **{"heads.q": 2, "heads.kv": 2}),
    "mqa": lambda: small("mqa", **{"heads.q": 4, "heads.kv": 1}),
    "group3": lambda: small("group3", **{"heads.q": 6, "heads.kv": 2}),          # non-power-of-two group
    # dtypes (bf16 runs the interpreter's widening path)
    "fp32": lambda: small("fp32", dtype="fp32"),
    "bf16": lambda: small("bf16", dtype="bf16"),
    # k/v layouts
    "kv_shared": lambda: small("kv_shared", kv="shared"),
    "mla": lambda: small("mla", kv="shared", mla=True, **{"heads.q": 4, "heads.kv": 1, "head_dim.qk": 48,
                                                          "head_dim.v": 32}),
    # pooling
    "linear_pool": lambda: small("linear_pool", **{"compression.pool": "linear"}),
    "linear_pool_pe": lambda: small("linear_pool_pe", **{"compression.pool": "linear",
                                                         "compression.position_embedding": True}),
    # block geometry: l = d = l'; l > l' = d; l > l' > d; l' = 8 (two units per key tile)
    "l16_d16_sel16": lambda: small("l16_d16_sel16", **{"compression.block": 16, "compression.stride": 16,
                                                        "selection.block": 16}),
    "l16_d8_sel8": lambda: small("l16_d8_sel8", **{"compression.block": 16, "compression.stride": 8,
                                                    "selection.block": 8}),
    "l32_d8_sel16": lambda: small("l32_d8_sel16", **{"compression.block": 32, "compression.stride": 8,
                                                      "selection.block": 16}),
    "sel8": lambda: small("sel8", **{"selection.block": 8}),
    # branch subsets (the compression scorer needs the compression branch)
    "cmp_sel": lambda: small("cmp_sel", branches=["compression", "selection"], window=None),
    "cmp_win": lambda: small("cmp_win", branches=["compression", "window"], selection=None),
    "win_only_shared": lambda: small("win_only_shared", branches=["window"], kv="shared", compression=None,
                                     selection=None),
    # token granularity, ranked by the lightning indexer
    "token": lambda: token("base"),
    "token_idx_heads3": lambda: token("idx_heads3", **{"indexer.heads": 3}),      # non-power-of-two indexer heads
    "token_top5": lambda: token("top5", **{"selection.top_k": 5}),                # top_k not a power of two
    # DSA: the indexer alone feeding token- or block-granularity sparse attention (GQA and MLA-style MQA).
    "dsa_gqa": lambda: load_spec("specs/dsa_small.yaml"),
    "dsa_block": lambda: replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_block",
                                 **{"selection.granularity": "block", "selection.block": 8, "selection.top_k": 3,
                                    "selection.initial": 1, "selection.local": 1}),
    "dsa_mla": lambda: replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_mla",
                               **{"heads.kv": 1, "mla": True, "head_dim.qk": 80, "head_dim.v": 64}),
    # Wide MLA heads: the group's 128 heads are split over two programs of 64 rows each.
    "dsa_head_chunks": lambda: replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_chunks",
                                       **{"heads.q": 128, "heads.kv": 1, "mla": True, "head_dim.qk": 320,
                                          "head_dim.v": 256}),
    "nsa_token_block_indexer": lambda: token("block_idx", **{"selection.granularity": "block", "selection.block": 16,
                                                             "selection.top_k": 3, "selection.initial": 1,
                                                             "selection.local": 1}),
    # head dims that are not powers of two on both sides (80 = 64 + 16, 48 = 32 + 16)
    "dims_80_48": lambda: small("dims_80_48", **{"head_dim.qk": 80, "head_dim.v": 48}),
}


def _odd_above(x: int) -> int:
    """The smallest odd number > x: a multiple of no block size, since they are all powers of two."""
    return x + 1 if x % 2 == 0 else x + 2


def seqlens(spec: Spec) -> tuple[int, int]:
    """(short, long): short sees a few blocks of every kind; long makes top-n drop candidates."""
    sel, cmp_ = spec.selection, spec.compression
    unit = 1 if sel is None else (sel.block if sel.granularity == "block" else 1)
    blocks = [unit, cmp_.block if cmp_ else 0, spec.window.size if spec.window else 0]
    short = _odd_above(max(blocks) + 4)
    long = 37
    if sel is not None:
        long = max(long, _odd_above((sel.top_k + 2) * unit))
        assert long > (sel.top_k + 2) * unit
    assert short % 2 and long % 2 and short < long
    return short, long


@pytest.mark.parametrize("which", ["short", "long"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matrix(variant, which):
    spec = VARIANTS[variant]()
    mod = specgen.load(spec)
    assert mod.SPEC_HASH == spec.hash
    if spec.dtype == "bf16":
        assert mod.WIDEN == runtime.interpreting(), "bf16 widens dot operands to fp32 under the interpreter only"
    short, long = seqlens(spec)
    if which == "short":
        testing.check_forward(mod, spec, 2, short)
    else:
        testing.check_forward(mod, spec, 1, long)


# ---------------------------------------------------------------------------------------------------------------
# Selection checked exactly
# ---------------------------------------------------------------------------------------------------------------

def _kernel_inputs(mod, inputs64: dict) -> tuple[dict, dict]:
    """Inputs in the module's dtype, and the float64 copies of exactly those rounded values."""
    inputs = {k: v.to(device=testing.test_device(), dtype=mod.DTYPE) for k, v in inputs64.items()}
    return inputs, {k: v.detach().cpu().to(torch.float64) for k, v in inputs.items()}


def test_planted_block_wins_for_every_later_query():
    spec = replace(SMALL, name="nsa_small_planted", kv="shared")
    mod = specgen.load(spec)
    T, block, plant_from = 97, 3, 64       # selection block 3 = tokens 48..63; queries 64.. come after it
    l_sel = spec.selection.block
    gen = torch.Generator().manual_seed(1234)
    x = R.make_inputs(spec, 1, T, generator=gen)
    u = torch.randn(spec.head_dim.qk, dtype=torch.float64, generator=gen)
    x["q"][0, plant_from:] = u                                        # every later query, every head, asks for u
    x["k"][0, block * l_sel:(block + 1) * l_sel] = 8 * u / u.norm()   # the block's keys: a multiple of the query
    inputs, exact = _kernel_inputs(mod, x)
    out, indices = mod.nsa_forward(**inputs, return_indices=True)
    indices = indices.cpu()
    for t in range(plant_from, T):
        newest = t // l_sel
        assert newest - block >= spec.selection.local, "the planted block must not be a forced local block"
        for g in range(spec.heads.kv):
            assert block in indices[0, t, g].tolist(), f"t={t}, kv group {g}: {indices[0, t, g].tolist()}"
    # And the rest of the selection is valid, and the output right.
    ref = R.nsa_forward(spec, **exact)
    R.check_selection(spec, indices, ref.scores, T, tol=testing.SELECT_TOL[mod.DTYPE])
    assert (ref.scores[0, plant_from:].argmax(-1) == block).all()
    fed = R.nsa_forward(spec, **exact, indices=indices)
    assert R.rel_err(out.to(torch.float64).cpu(), fed.out) < testing.OUT_TOL[mod.DTYPE]


def test_given_indices_are_used():
    spec = replace(SMALL, name="nsa_small_given")
    mod = specgen.load(spec)
    T = 73                                  # 5 candidate blocks for t >= 64, top_k 4: one is dropped
    x = R.make_inputs(spec, 1, T, generator=torch.Generator().manual_seed(99))
    inputs, exact = _kernel_inputs(mod, x)
    ref = R.nsa_forward(spec, **exact)
    sel = spec.selection
    # A valid selection the scorer would never make: the worst free blocks instead of the best.
    worst = top_units(-ref.scores, query_positions(T, T, "cpu"), sel.block, sel.top_k, sel.initial, sel.local)
    assert not torch.equal(worst, ref.indices), "the two selections must differ somewhere"
    for given in (ref.indices, worst):
        want = R.nsa_forward(spec, **exact, indices=given)
        out, lse, used = mod.nsa_forward(**inputs, indices=given.to(testing.test_device()), return_lse=True,
                                         return_indices=True)
        assert torch.equal(used.cpu(), given), "return_indices must give back the indices passed in"
        err = R.rel_err(out.to(torch.float64).cpu(), want.out)
        assert err < testing.OUT_TOL[mod.DTYPE], f"output rel err {err:.3e} with given indices"
        c = spec.branches.index("selection")
        lse_err = (lse[..., c].to(torch.float64).cpu() - want.lse[..., c]).abs().max().item()
        assert lse_err < testing.LSE_TOL[mod.DTYPE]
    # The worst blocks give a different output from the scorer's own choice, so the check above has teeth.
    assert R.rel_err(R.nsa_forward(spec, **exact, indices=worst).out, ref.out) > 1e-3
