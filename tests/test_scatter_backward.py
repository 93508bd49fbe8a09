"""The selection backward's scatter path (docs/backward.md, kernels/backward_scatter.j2): query-outer, dQ in
registers, dK/dV added with fp32 atomics; the deterministic inverse-index kernels run instead under
torch.use_deterministic_algorithms. Under the CPU interpreter (fp32: bf16 dots are wrong there), at tiny shapes,
against the float64 reference fed the kernel's selection: a miniature of DeepSeek-V3.2 (MLA, one kv head, 64 heads
in two head chunks, which the plan sends down the scatter path) and, with the plan's choice forced, a GQA spec
with two kv heads (the plan keeps those on the deterministic path: too few FLOPs per atomic byte).

Inputs are fresh random draws (SPECGEN_TEST_SEED reproduces one), made with ties (repeated index keys, so the
indexer's scores tie; repeated keys, so attention scores tie), -1 slots (the first top_k queries have fewer
candidates than top_k, and they all fit), and every float buffer the runtime allocates with torch.empty poisoned
with NaN, so a gradient element no kernel wrote shows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import testing
from specgen.compile import loop_order
from specgen.compile.plan import make_plan
from specgen.compile.variants import load_variant, variant_plan
from specgen.model.spec import load_spec, replace

# V3.2 in miniature: 64 heads (two programs of 32 rows per query), d_qk 48 = 32 + 16, d_v 32 = K's first 32 dims.
MLA = replace(load_spec("specs/dsa_v32.yaml"), name="dsa_scatter_mla", dtype="fp32", max_seqlen=4096,
              **{"heads.q": 64, "head_dim.qk": 48, "head_dim.v": 32, "selection.top_k": 8, "indexer.heads": 2,
                 "indexer.head_dim": 32, "indexer.dtype": "bf16"})
# GQA: two kv heads of 16, separate V.
GQA = replace(load_spec("specs/dsa_small.yaml"), name="dsa_scatter_gqa", dtype="fp32",
              **{"heads.q": 32, "heads.kv": 2, "head_dim.qk": 32, "head_dim.v": 16, "selection.top_k": 8})
# A small group (4 heads a kv head, as dsa_gqa16_4): the program's 16 head rows are 12 padding rows.
GQA4 = replace(load_spec("specs/dsa_small.yaml"), name="dsa_scatter_gqa4", dtype="fp32",
               **{"head_dim.qk": 32, "head_dim.v": 16, "selection.top_k": 8})
# A group of 2: the plan keeps the inverse index (2.5 FLOPs a byte); the variant forces the scatter path.
GQA2 = replace(GQA4, name="dsa_scatter_gqa2", **{"heads.q": 4, "heads.kv": 2, "head_dim.qk": 32, "head_dim.v": 32})


def _forced_scatter_module(spec):
    """The module of `spec` with its backward on the scatter path: the plan's where it chooses it, else rendered
    under the plan variant `bwd_scatter` (which bench/dsa_bwd.py --variant times)."""
    mod = specgen.load(spec) if loop_order.scatter_backward(spec) else load_variant(spec, ["bwd_scatter"])
    assert mod is not None and mod._DESC.selection_backward == "scatter"
    return mod


def _poisoned_empty(real):
    def empty(*args, **kwargs):
        x = real(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    return empty


def _check(mod, spec, T, monkeypatch, deterministic=False):
    seed = testing.fresh_seed()
    where = f"[spec {spec.name}, T={T}, seed={seed} (SPECGEN_TEST_SEED={seed} reproduces)]"
    gen = torch.Generator().manual_seed(seed)
    x = R.make_inputs(spec, 1, T, generator=gen)
    x["k_idx"][:, 9:15] = x["k_idx"][:, 4:5]   # index ties: equal scores, the lower position wins
    x["k"][:, 16:19] = x["k"][:, 2:3]           # attention ties
    names = testing.differentiable_inputs(spec)
    device = testing.test_device()
    inputs = {n: v.to(device, torch.float32).requires_grad_(n in names) for n, v in x.items()}
    dout = torch.randn(1, T, spec.heads.q, spec.head_dim.v, generator=gen)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    with testing.deterministic_algorithms(deterministic):
        out, indices = mod.dsa_attention(**inputs, return_indices=True)
        out.backward(dout.to(device))
    monkeypatch.undo()
    assert (indices[:, : spec.selection.top_k - 1] == -1).any(), "no -1 slot"
    exact = {n: v.detach().cpu().to(torch.float64) for n, v in inputs.items()}
    _, want = testing.reference_gradients(spec, exact, indices.cpu(), dout.to(torch.float64))
    for n, g in want.items():
        got = testing.assert_gradient_sane(n, inputs[n], torch.float32, where)
        err = R.rel_err(got.cpu().to(torch.float64), g)
        assert err < testing.GRAD_TOL[torch.float32], f"d{n} rel err {err:.2e} {where}"


def test_plan_chooses_scatter_by_intensity():
    """Token granularity with >= 4 FLOPs per atomic byte (groups of 4 and up at d_qk = d_v): the H100 timed the
    scatter path faster than the inverse index at 5 (dsa_gqa16_4) and 76 (V3.2); groups of 1 and 2 keep it."""
    chosen = {p.stem: loop_order.scatter_backward(load_spec(p))
              for p in sorted(__import__("pathlib").Path("specs").glob("*.yaml")) if ".sweep" not in p.name}
    assert chosen == {**{k: False for k in chosen}, "dsa_v32": True, "dsa_small": True, "nsa_token": True}
    assert loop_order.scatter_backward(MLA) and loop_order.scatter_backward(GQA) and loop_order.scatter_backward(GQA4)
    assert loop_order.scatter_backward(load_spec("specs/models/dsa_gqa16_4.yaml"))
    assert not loop_order.scatter_backward(GQA2)   # 2.5 FLOPs a byte
    assert variant_plan(GQA2, ["bwd_scatter"]).backward.scatter and variant_plan(GQA4, ["bwd_scatter"]) is None
    t = make_plan(MLA).backward
    assert (t.scatter, t.scatter_gp, t.scatter_chunks) == (True, 32, 2)


@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter", "deterministic"])
def test_mla_backward(deterministic, monkeypatch):
    mod = specgen.load(MLA)
    assert mod._DESC.selection_backward == "scatter"
    _check(mod, MLA, 29, monkeypatch, deterministic)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_gqa_two_kv_heads(monkeypatch, split):
    """Also the split form (docs/backward.md, "Fewer atomics"; tuning.scatter_variants' split_*): its dK/dV kernel
    without MLA (V's own parts and accumulator) and with a kv head's rows offset in every address."""
    mod = _forced_scatter_module(GQA)
    assert testing.scatters(mod)
    if split:
        cfg = {**mod.CONFIGS["default"]["selection_scatter"], "dkdv_once": 1, "dkdv_block_n": 16, "dkdv_warps": 8,
               "dkdv_stages": 1}
        monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", cfg)
    _check(mod, GQA, 21, monkeypatch)


@pytest.mark.parametrize("spec", [GQA4, GQA2], ids=["group4", "group2_forced"])
def test_small_group(spec, monkeypatch):
    """Groups of 4 (the plan's scatter path) and 2 (forced by the variant), rows padded to 16: the padding rows
    are masked out of dQ and of the atomic adds."""
    mod = _forced_scatter_module(spec)
    assert mod.CONFIGS["default"]["selection_scatter"] is not None
    _check(mod, spec, 23, monkeypatch)


def test_paths_agree():
    testing.check_backward_paths_agree(specgen.load(MLA), MLA, 2, 13)
