"""The training step's buffers (docs/backward.md, "Memory"): with one branch the backward writes dQ in the spec's
dtype straight into the gradient (no fp32 [B, T, HQ, DQK] accumulator, no cast copy), and with one ungated branch
the forward keeps no copy of its output for the backward (it saves `out`). Each path that writes dQ runs under the
CPU interpreter in fp16 at tiny shapes, once as it is and once with the former buffers
(runtime.launches.DQ_IN_DTYPE and OUT_IS_BRANCH_OUTPUT off): the output and every gradient are the same bits, and
a dispatch-mode watch lists what each run allocated (the former run's fp32 dQ and branch copy show that it sees
them). Fresh random inputs (SPECGEN_TEST_SEED reproduces one); every fresh floating buffer is poisoned with NaN, so
a dQ row no kernel wrote shows. The gradients' agreement with the float64 reference is the generated tests' and
tests/test_scatter_backward.py's (the same kernels); here one run is checked against it too.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.compile import loop_order
from specgen.compile.plan import make_plan
from specgen.model.spec import load_spec, replace
from specgen.testing.varlen import AllocationWatch

# DeepSeek-V3.2 in miniature (as tests/test_scatter_backward.py's, in fp16): the plan's scatter path.
MLA = replace(load_spec("specs/dsa_v32.yaml"), name="dsamem_mla", dtype="fp16", max_seqlen=4096,
              **{"heads.q": 64, "head_dim.qk": 48, "head_dim.v": 32, "selection.top_k": 8, "indexer.heads": 2,
                 "indexer.head_dim": 32, "indexer.dtype": "bf16"})
# DSA at block granularity in the block-outer order: the dQ reduce kernel, by query chunks.
KV = replace(load_spec("specs/dsa_small.yaml"), name="dsamem_kv", max_seqlen=256,
             **{"selection.granularity": "block", "selection.block": 16, "selection.top_k": 2,
                "selection.loop_order": "kv", "heads.q": 4, "heads.kv": 1, "head_dim.qk": 32, "head_dim.v": 16})
# dsa_small with d_v != d_qk (so dQ's and the output's shapes differ): the inverse-index kernels (deterministic
# mode), packed.
SMALL = replace(load_spec("specs/dsa_small.yaml"), name="dsamem_small", **{"head_dim.v": 32})


class Buffers(AllocationWatch):
    """AllocationWatch (NaN-poisoned fresh buffers) that also lists (shape, dtype) of every tensor an op makes
    (views and in-place ops, which make none, left out)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = super().__torch_dispatch__(func, types, args, kwargs)
        if not func.is_view and not func._schema.is_mutable:
            for x in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(x, torch.Tensor):
                    self.made.append((tuple(x.shape), x.dtype))
        return result


def _run(mod, spec, inputs, dout, varlen):
    """Forward + backward on fresh leaves inside a Buffers watch: ({out, indices, dq, dk, ...}, the watch)."""
    names = testing.differentiable_inputs(spec)
    leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in inputs.items()}
    watch = Buffers()
    with watch:
        out, indices = mod.dsa_attention(**leaves, return_indices=True, **varlen)
        out.backward(dout)
    return {"out": out.detach(), "indices": indices, **{f"d{n}": leaves[n].grad for n in names}}, watch


def _inputs(mod, spec, T, packed):
    seed = testing.fresh_seed()
    inputs, dout = testing._grad_inputs(mod, spec, 1, T, testing.test_device(), seed)
    if packed is None:
        return inputs, dout, {}, seed
    cu = torch.tensor(packed, dtype=torch.int32, device=dout.device)
    lengths = [b - a for a, b in zip(packed, packed[1:])]
    return ({n: x[0] for n, x in inputs.items()}, dout[0],
            {"cu_seqlens": cu, "max_seqlen": max(lengths)}, seed)


CASES = {
    "scatter": (MLA, 13, None, False),
    "dq_kernel": (MLA, 13, None, True),       # the scatter module under deterministic mode: dq kernel + dK/dV
    "kv_chunks": (KV, 37, None, False),       # the block-outer dQ reduce, by query chunks of 5
    # native packed dq kernel (VARLEN), an empty sequence; deterministic mode: dsa_small's group of 4 takes the
    # scatter path otherwise (loop_order.scatter_backward), which has no dq kernel
    "packed": (SMALL, 19, [0, 7, 7, 19], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_branch_backward_keeps_no_fp32_dq_and_no_output_copy(case, monkeypatch):
    spec, T, packed, deterministic = CASES[case]
    mod = specgen.load(spec)
    if case == "scatter":
        assert loop_order.scatter_backward(spec) and mod._DESC.selection_backward == "scatter"
    if case == "kv_chunks":
        assert make_plan(spec).selection_bwd_order == "kv"
        per_query = spec.heads.q * spec.selection.top_k * spec.head_dim.qk * 2
        monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 5 * per_query)
        assert len(runtime.selection.query_chunks(1, T, per_query, 5 * per_query)) > 5
    inputs, dout, varlen, seed = _inputs(mod, spec, T, packed)
    where = f"[{case}, spec {spec.name}, T={T}, seed={seed} (SPECGEN_TEST_SEED={seed} reproduces)]"
    lead = (T,) if packed else (1, T)
    dq_shape, out_shape = lead + (spec.heads.q, spec.head_dim.qk), lead + (spec.heads.q, spec.head_dim.v)
    # Inside the kernels a packed call is a batch of one [1, total, ...].
    dq_full, out_full = (1, T) + dq_shape[len(lead):], (1, T) + out_shape[len(lead):]
    with testing.deterministic_algorithms(deterministic):
        new, watch = _run(mod, spec, inputs, dout, varlen)
        monkeypatch.setattr(runtime.launches, "DQ_IN_DTYPE", False)
        monkeypatch.setattr(runtime.launches, "OUT_IS_BRANCH_OUTPUT", False)
        old, old_watch = _run(mod, spec, inputs, dout, varlen)
    # The watch sees the former buffers: the fp32 dQ accumulator, its cast, the saved copy of the output.
    assert (dq_full, torch.float32) in old_watch.made and (dq_full, torch.float16) in old_watch.made, where
    assert ((1,) + out_full, torch.float16) in old_watch.made, where
    # Now: no fp32 buffer of dQ's shape, one fp16 one (the gradient itself), no copy of the output.
    assert (dq_full, torch.float32) not in watch.made, where
    assert watch.made.count((dq_full, torch.float16)) == 1, where
    assert ((1,) + out_full, torch.float16) not in watch.made, where
    # The output once (a packed call's output gradient is not copied either: runtime.autograd squeezes, no select).
    assert watch.made.count((out_full, torch.float16)) == 1, where
    for name, a in new.items():
        if name == "dk" and case == "scatter" and a.is_cuda:
            # The scatter path's dK sums by fp32 atomics, in an order that differs from run to run on a GPU.
            assert R.rel_err(a.to(torch.float64), old[name].to(torch.float64)) < testing.GRAD_TOL[a.dtype], where
            continue
        assert a.dtype == old[name].dtype and torch.equal(a, old[name]), f"{name} differs from the former path {where}"
    assert torch.isfinite(new["dq"]).all(), f"a dQ row no kernel wrote {where}"
    if case == "scatter":
        # And against the float64 reference (fed the kernel's selection).
        exact = {n: v.detach().to(torch.float64) for n, v in inputs.items()}
        _, want = testing.reference_gradients(spec, exact, new["indices"], dout.to(torch.float64))
        for n, g in want.items():
            err = R.rel_err(new[f"d{n}"].to(torch.float64), g)
            assert err < testing.GRAD_TOL[torch.float16], f"d{n} rel err {err:.2e} {where}"


def test_in_place_change_of_the_output_before_backward_is_refused():
    """The backward of one ungated branch reads the saved `out`: autograd refuses a backward after an in-place
    change of it (as for any saved tensor), instead of computing a wrong gradient."""
    mod = specgen.load(MLA)
    inputs, dout, _, _ = _inputs(mod, MLA, 5, None)
    leaves = {n: x.detach().clone().requires_grad_(n in ("q", "k")) for n, x in inputs.items()}
    out = mod.dsa_attention(**leaves)
    with torch.no_grad():
        out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(dout)
