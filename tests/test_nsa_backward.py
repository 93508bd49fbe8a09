"""Tier 2 of the backward (docs/testing.md, docs/backward.md): gradients of the generated kernels on small mirror
specs, against the float64 reference's autograd fed the kernel's selection.

Every variant is derived from specs/nsa_small.yaml (or a miniature of specs/nsa_token.yaml) with `replace`, built
with `specgen.load` into a temporary cache, and checked with `specgen.testing.check_backward` at T = 37 (a multiple
of no block size; every block size is a power of two), some at T = 67 where top-n drops candidates, so some blocks
are selected by only part of the queries. The rest checks the pieces: the block -> queries inverse index against a
brute-force one, the chunked reference gradients against plain autograd, given indices, the autograd.Function,
and the layer with a learned pool.

Under the CPU interpreter a kernel loop trip costs ~10 ms, so the shapes are tiny: the file runs in ~2 minutes.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.reference._core import query_positions, top_units
from small_specs import small_token_spec
from specgen.model.spec import Spec, load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")   # GQA 4/2, d 48/32, fp16, l=8 d=4 l'=16, top_k 4 (1+1 forced), w=16


def small(name: str, **changes) -> Spec:
    return replace(SMALL, name=f"nsa_small_bwd_{name}", **changes)


def token(name: str, **changes) -> Spec:
    return small_token_spec(f"nsa_token_bwd_{name}", **changes)


# variant -> (spec, B, T); built lazily so a spec the validator refuses fails its own test only.
VARIANTS = {
    # head layouts
    "mha": lambda: (small("mha", **{"heads.q": 2, "heads.kv": 2}), 2, 37),
    "mqa": lambda: (small("mqa", **{"heads.q": 4, "heads.kv": 1}), 1, 37),
    "group3_fp32": lambda: (small("group3", dtype="fp32", **{"heads.q": 6, "heads.kv": 2}), 1, 37),
    # dtypes (bf16 runs the interpreter's widening path)
    "gqa_fp32_long": lambda: (small("fp32", dtype="fp32"), 1, 67),
    "bf16": lambda: (small("bf16", dtype="bf16"), 1, 37),
    # learned pooling: weights and position embeddings get gradients
    "linear_pool_pe_fp32": lambda: (small("linear_pool_pe", dtype="fp32", **{
        "compression.pool": "linear", "compression.position_embedding": True}), 2, 37),
    "linear_pool_shared_kv": lambda: (small("linear_pool_shared", kv="shared", **{"compression.pool": "linear"}), 1, 37),
    # MLA: V is a slice of K, dV lands in dK
    "mla_fp32": lambda: (small("mla", dtype="fp32", kv="shared", mla=True, **{"heads.q": 4, "heads.kv": 1}), 1, 37),
    # two selection units per key tile of the dK/dV kernel (unit bit masks); l > l' = d
    "sel8_long": lambda: (small("sel8", **{"compression.block": 16, "compression.stride": 8,
                                            "selection.block": 8}), 1, 67),
    # token granularity (indexer scorer): 32 units per key tile
    "token": lambda: (token("base"), 1, 37),
    # head dims that are not powers of two (80 = 64 + 16, 48 = 32 + 16)
    "dims_80_48": lambda: (small("dims_80_48", **{"head_dim.qk": 80, "head_dim.v": 48}), 1, 37),
    # no selection branch
    "cmp_win": lambda: (small("cmp_win", branches=["compression", "window"], selection=None), 1, 37),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_matrix(variant):
    spec, B, T = VARIANTS[variant]()
    mod = specgen.load(spec)
    report = testing.check_backward(mod, spec, B, T)
    assert set(report.grad_err) == set(testing.differentiable_inputs(spec))


# ---------------------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------------------

def _brute_force_index(indices: torch.Tensor, T: int, unit: int, tile: int, hkv: int) -> dict:
    """{(b, g, tile j): [(t, bits), ...] with t ascending}, straight from the definition."""
    out = {}
    B = indices.shape[0]
    for b in range(B):
        for g in range(hkv):
            for t in range(T):
                per_tile = {}
                for u in indices[b, t, g].tolist():
                    if u < 0:
                        continue
                    j, bit = (u * unit) // tile, ((u * unit) % tile) // unit
                    per_tile[j] = per_tile.get(j, 0) | (1 << bit)
                for j, bits in per_tile.items():
                    out.setdefault((b, g, j), []).append((t, bits))
    return out


@pytest.mark.parametrize("which", ["block", "sel8", "token"])
def test_inverse_index_matches_brute_force(which):
    spec = {"block": lambda: small("fp32", dtype="fp32"),
            "sel8": lambda: small("sel8", **{"compression.block": 16, "compression.stride": 8, "selection.block": 8}),
            "token": lambda: token("base")}[which]()
    mod = specgen.load(spec)
    sel = spec.selection
    unit = sel.block if sel.granularity == "block" else 1
    tile = runtime.launch_config(mod.CONFIGS, "selection_dkdv")["block_n"]
    B, T = 2, 75
    gen = torch.Generator().manual_seed(5)
    # A random valid selection per (b, t, g): top_units of random scores (ascending, -1 padding last).
    scores = torch.rand(B, T, spec.heads.kv, -(-T // unit), generator=gen, dtype=torch.float64)
    initial, local = (sel.initial, sel.local) if sel.granularity == "block" else (0, 0)
    indices = top_units(scores, query_positions(T, T, "cpu"), unit, sel.top_k, initial, local)
    offsets, qpos, bits = mod._selection_inverse_index(indices, T, tile)
    want = _brute_force_index(indices, T, unit, tile, spec.heads.kv)
    n_tiles = -(-T // tile)
    assert offsets.shape == (B * spec.heads.kv * n_tiles + 1,) and offsets[0] == 0
    for b in range(B):
        for g in range(spec.heads.kv):
            for j in range(n_tiles):
                seg = (b * spec.heads.kv + g) * n_tiles + j
                lo, hi = int(offsets[seg]), int(offsets[seg + 1])
                got = [(int(qpos[e]), int(bits[e]) if tile > unit else 1) for e in range(lo, hi)]
                assert got == want.get((b, g, j), []), f"tile {j} of (b={b}, g={g})"


def test_chunked_reference_gradients_match_plain_autograd():
    """The chunked reference used at GPU sizes equals autograd through `reference.nsa_forward` in one piece."""
    spec = small("linear_pool_pe", dtype="fp32", **{"compression.pool": "linear",
                                                     "compression.position_embedding": True})
    B, T = 2, 45
    gen = torch.Generator().manual_seed(11)
    x = R.make_inputs(spec, B, T, generator=gen)
    indices = R.nsa_forward(spec, **x).indices
    dout = torch.randn(B, T, spec.heads.q, spec.head_dim.v, generator=gen, dtype=torch.float64)
    out, grads = testing.reference_gradients(spec, x, indices, dout, query_chunk=7)
    leaves = {n: v.clone().requires_grad_(True) for n, v in x.items()}
    ref = R.nsa_forward(spec, **leaves, indices=indices)
    (ref.out * dout).sum().backward()
    assert torch.allclose(out, ref.out, rtol=0, atol=1e-12)
    for n, g in grads.items():
        assert torch.allclose(g, leaves[n].grad, rtol=1e-10, atol=1e-12), n


def test_given_indices_are_differentiated_through():
    """A selection passed in (here the worst free blocks) is the one the backward uses."""
    spec = small("fp32", dtype="fp32")
    mod = specgen.load(spec)
    T = 67
    gen = torch.Generator().manual_seed(3)
    x = R.make_inputs(spec, 1, T, generator=gen)
    sel = spec.selection
    scores = R.nsa_forward(spec, **x).scores
    worst = top_units(-scores, query_positions(T, T, "cpu"), sel.block, sel.top_k, sel.initial, sel.local)
    device = testing.test_device()
    inputs = {n: v.to(device, torch.float32).requires_grad_(n in testing.differentiable_inputs(spec))
              for n, v in x.items()}
    dout = torch.randn(1, T, spec.heads.q, spec.head_dim.v, generator=gen)
    out = mod.nsa_attention(**inputs, indices=worst.to(device))
    out.backward(dout.to(device))
    exact = {n: v.detach().cpu().to(torch.float64) for n, v in inputs.items()}
    _, want = testing.reference_gradients(spec, exact, worst, dout.to(torch.float64))
    for n, g in want.items():
        err = R.rel_err(inputs[n].grad.cpu().to(torch.float64), g)
        assert err < testing.GRAD_TOL[torch.float32], f"d{n} rel err {err:.2e} with given indices"


def test_autograd_function_matches_functional():
    spec = small("fp32", dtype="fp32")
    mod = specgen.load(spec)
    T = 21
    device = testing.test_device()
    x = R.make_inputs(spec, 1, T, generator=torch.Generator().manual_seed(8))
    names = testing.differentiable_inputs(spec)
    dout = torch.randn(1, T, spec.heads.q, spec.head_dim.v, generator=torch.Generator().manual_seed(9)).to(device)

    def run(call):
        leaves = {n: v.to(device, torch.float32).requires_grad_(True) for n, v in x.items()}
        out = call(leaves)
        out.backward(dout)
        return out.detach(), [leaves[n].grad for n in names]

    out_a, grads_a = run(lambda xs: mod.nsa_attention(**xs))
    out_b, grads_b = run(lambda xs: mod.NSAFunction.apply(*(xs[n] for n in R.input_names(spec)), None)[0])
    assert torch.equal(out_a, out_b)
    for n, a, b in zip(names, grads_a, grads_b):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("which", ["block", "token"])
def test_selection_backward_in_batch_groups_is_bit_identical(which, monkeypatch):
    """The selection dK/dV runs its inverse index per group of batch elements when B * T * HKV * k is large; one
    element per group gives the same bits as the whole batch at once. (The grouping is read when the backward
    runs: one forward, its graph kept, backward twice.)"""
    spec = small("fp32", dtype="fp32") if which == "block" else token("base")
    mod = specgen.load(spec)
    B, T = 3, 21
    device = testing.test_device()
    x = R.make_inputs(spec, B, T, generator=torch.Generator().manual_seed(5))
    names = testing.differentiable_inputs(spec)
    dout = torch.randn(B, T, spec.heads.q, spec.head_dim.v, generator=torch.Generator().manual_seed(6))
    leaves = {n: v.to(device, mod.DTYPE).requires_grad_(n in names) for n, v in x.items()}
    out = mod.nsa_attention(**leaves)

    def grads(**keep):
        for n in names:
            leaves[n].grad = None
        out.backward(dout.to(device, mod.DTYPE), **keep)
        return [leaves[n].grad for n in names]

    whole = grads(retain_graph=True)
    monkeypatch.setattr(mod, "INVERSE_INDEX_ENTRIES", 1)
    grouped = grads()
    for n, a, b in zip(names, whole, grouped):
        assert a is not b and torch.equal(a, b), n


def test_no_grad_forward_keeps_no_branch_outputs_and_refuses_backward():
    spec = small("fp32", dtype="fp32")
    mod = specgen.load(spec)
    x = {n: v.to(testing.test_device(), torch.float32) for n, v in R.make_inputs(spec, 1, 5).items()}
    args = [x[n].clone().requires_grad_(n == "q") for n in R.input_names(spec)]
    out, _, _, branch_out, _, _ = mod._fwd_op(*args, None, False, None, 0)
    assert branch_out.numel() == 0
    with pytest.raises(RuntimeError, match="no branch outputs"):
        out.sum().backward()
    with torch.no_grad():
        q = x["q"].clone().requires_grad_(True)
        out = mod.nsa_attention(**{**x, "q": q})
    assert not out.requires_grad


def test_layer_with_learned_pool():
    """The layer owns the pool weights and position embeddings; with complete blocks they get gradients."""
    spec = small("linear_pool_pe", dtype="fp32", **{"compression.pool": "linear",
                                                     "compression.position_embedding": True})
    mod = specgen.load(spec)
    device = testing.test_device()
    layer = mod.NSAttention(24, device=device)
    names = {n for n, _ in layer.named_parameters()}
    assert {"w_pool_k", "w_pool_v", "pe_pool_k", "pe_pool_v", "gate_proj.weight"} <= names
    x = torch.randn(1, 21, 24, generator=torch.Generator().manual_seed(4)).to(device)
    layer(x).square().mean().backward()
    assert layer.w_pool_k.grad.abs().sum() > 0 and layer.w_pool_v.grad.abs().sum() > 0
    assert layer.pe_pool_v.grad.abs().sum() > 0
    # A key position embedding shifts every pooled key of a kv head alike: softmax ignores it (gradient ~ 0).
    assert layer.pe_pool_k.grad.norm() < 1e-3 * layer.pe_pool_v.grad.norm()
    testing.check_layer(mod, spec, 1, 21)


# ---------------------------------------------------------------------------------------------------------------
# Realistic sizes (GPU): MHA has no committed spec, so the paper configuration with one kv head per query head
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.gpu
def test_backward_realistic_mha():
    spec = replace(load_spec("specs/nsa_paper.yaml"), name="nsa_paper_mha", **{"heads.q": 16, "heads.kv": 16})
    mod = specgen.load(spec)
    testing.check_backward(mod, spec, 1, 4999, device="cuda", query_chunk=128)


def test_eager_training_step_skips_the_custom_op_dispatch():
    """An eager forward+backward of the training entry point runs the op implementations through a plain
    autograd.Function: the custom op's first call would import torch._dynamo (0.86 s of a warm process's first
    training step on the GPU machine). In a fresh process, since this one may have imported it already."""
    import subprocess
    import sys
    from pathlib import Path

    child = (
        "import sys, torch, specgen\n"
        "from specgen import reference\n"
        "from specgen.testing import spec_of, test_device\n"
        "mod = specgen.load('specs/nsa_small.yaml')\n"
        "x = reference.make_inputs(spec_of(mod), 1, 21, dtype=mod.DTYPE, device=test_device(),\n"
        "                          generator=torch.Generator(test_device()).manual_seed(0))\n"
        "leaf = {n: v.detach().clone().requires_grad_(True) for n, v in x.items()}\n"
        "mod.nsa_attention(**leaf).float().sum().backward()\n"
        "assert all(torch.isfinite(v.grad).all() for v in leaf.values())\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no dynamo", out.stdout


def test_key_major_dkdv_matches_the_reference(monkeypatch):
    """The compression and window dK/dV kernels' key-major form (S^T = K Q^T; a launch-config choice the tuner
    tries): every gradient against the float64 reference, with both kernels switched to it."""
    spec = small("fp32", dtype="fp32")
    mod = specgen.load(spec)
    for name in ("compression_dkdv", "window_dkdv"):
        monkeypatch.setitem(mod.CONFIGS["default"], name, {**mod.CONFIGS["default"][name], "key_major": 1})
    testing.check_backward(mod, spec, 2, 37)
