"""Packed (varlen) batches beyond the example specs (docs/varlen.md): the pad/unpad map and the argument checks of
specgen.runtime, the per-sequence reference, and tier-2 variants no example spec has (a learned linear pool with
position embeddings, whose weights are shared by the sequences; MLA; a spec without a selection branch), plus the
packed call under torch.compile. The example specs' own varlen tests are in generated/test_<name>.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.testing import varlen as testing_varlen
from specgen.model.spec import load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")
LENGTHS = [21, 0, 5]


def small(name: str, **changes):
    return replace(SMALL, name=f"nsa_small_varlen_{name}", **changes)


@pytest.fixture(scope="session", autouse=True)
def _specgen_cache(tmp_path_factory):
    """Build into a temporary cache, never into ~/.cache/specgen."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECGEN_CACHE", str(tmp_path_factory.mktemp("specgen_cache")))
        yield


def test_pad_unpad_map():
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)       # lengths 3, 0, 1, 4
    packed = runtime.check_varlen("f", cu, 5, 8, cu.device, 64, "s")
    x = torch.arange(8.0).view(8, 1).requires_grad_(True)
    padded = packed.pad(x, fill=-1)
    assert padded.shape == (4, 5, 1)
    assert padded[..., 0].tolist() == [[0, 1, 2, -1, -1], [-1] * 5, [3, -1, -1, -1, -1], [4, 5, 6, 7, -1]]
    assert packed.row_ok.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] + [False] * 4, [True] * 4 + [False]]
    assert packed.positions().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert torch.equal(packed.unpad(padded), x)
    (packed.unpad(padded * 2.0)).sum().backward()             # the padding's gradient goes nowhere
    assert x.grad.tolist() == [[2.0]] * 8


def test_check_varlen_errors():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    ok = runtime.check_varlen("f", cu, torch.tensor(5), 8, cu.device, 64, "s")   # a 0-dim max_seqlen is read once
    assert ok.max_seqlen == 5
    cases = [
        (dict(cu_seqlens=None, max_seqlen=5), "`cu_seqlens`"),
        (dict(cu_seqlens=[0, 3, 8], max_seqlen=5), "1-D int32 tensor"),
        (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32), max_seqlen=5), "N >= 1"),
        (dict(cu_seqlens=cu.long(), max_seqlen=5), "int32"),
        (dict(cu_seqlens=cu, max_seqlen=None), "`max_seqlen` is required"),
        (dict(cu_seqlens=cu, max_seqlen=0), "positive int"),
        (dict(cu_seqlens=cu, max_seqlen=5.0), "positive int"),
        (dict(cu_seqlens=cu, max_seqlen=65), "spec's max_seqlen=64"),
        (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32), max_seqlen=5), "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32), max_seqlen=5), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=5), "ends at 7"),
        (dict(cu_seqlens=cu, max_seqlen=4), "sequence 1 has 5 tokens"),
    ]
    for kwargs, words in cases:
        with pytest.raises(runtime.ArgumentError, match=words):
            runtime.check_varlen("f", kwargs["cu_seqlens"], kwargs["max_seqlen"], 8, cu.device, 64, "s")


def test_reference_varlen_is_per_sequence():
    """The packed reference (all rows, and the last rows only) equals the batched reference of each sequence."""
    spec = SMALL
    gen = torch.Generator().manual_seed(3)
    lengths = [21, 0, 9]
    inputs = {n: x[0] for n, x in R.make_inputs(spec, 1, sum(lengths), generator=gen).items()}
    cu = torch.tensor([0, 21, 21, 30], dtype=torch.int32)
    full = R.nsa_forward_varlen(spec, cu, **inputs)
    last = R.nsa_forward_varlen(spec, cu, rows=4, **inputs)
    for (a, b), res_rows in zip(((0, 21), (21, 30)), (slice(0, 21), slice(21, 30))):
        alone = R.nsa_forward(spec, **{n: x[a:b][None] for n, x in inputs.items()})
        assert torch.equal(full.out[res_rows], alone.out[0])
        assert torch.equal(full.indices[res_rows], alone.indices[0])
    assert torch.allclose(last.out, torch.cat([full.out[17:21], full.out[26:30]]), rtol=0, atol=1e-12)
    assert R.query_rows(cu, 4).tolist() == [17, 18, 19, 20, 26, 27, 28, 29]


def test_all_sequences_empty():
    """A packed batch of empty sequences: empty results and gradients, a zero distillation-free call, no error."""
    mod = specgen.load(SMALL)
    case = testing_varlen.PackedCase(mod, SMALL, [0, 0], None, 1)
    case.max_seqlen = 1
    out, lse, idx = mod.nsa_forward(**case.inputs, return_lse=True, return_indices=True, **case.varlen())
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4, 3) and idx.shape == (0, 2, 4)
    leaves = {n: x.clone().requires_grad_(True) for n, x in case.inputs.items()}
    mod.nsa_attention(**leaves, **case.varlen()).sum().backward()
    assert all(leaf.grad is not None and leaf.grad.shape == leaf.shape for leaf in leaves.values())


# Tier 2: varlen variants no example spec covers, forward and every gradient against the per-sequence reference.
VARIANTS = {
    "linear_pool_pe_fp32": lambda: small("linear_pool_pe", dtype="fp32", **{
        "compression.pool": "linear", "compression.position_embedding": True}),
    "mla_fp32": lambda: small("mla", dtype="fp32", kv="shared", mla=True, **{"heads.q": 4, "heads.kv": 1}),
    "cmp_win": lambda: small("cmp_win", branches=["compression", "window"], selection=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_varlen_matrix(variant):
    spec = VARIANTS[variant]()
    mod = specgen.load(spec)
    testing_varlen.check_forward_varlen(mod, spec, LENGTHS)
    errors = testing_varlen.check_backward_varlen(mod, spec, LENGTHS)
    assert set(errors) == set(testing.differentiable_inputs(spec))


def test_varlen_under_compile():
    """The packed differentiable call compiles to one graph (no value check under torch.compile) and gives the
    eager output and gradients."""
    spec = SMALL
    mod = specgen.load(spec)
    case = testing_varlen.PackedCase(mod, spec, [9, 0, 4], None, 1)
    names = testing.differentiable_inputs(spec)

    def run(fn):
        leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in case.inputs.items()}
        out = fn(**leaves, **case.varlen())
        out.square().sum().backward()
        return [out.detach()] + [leaves[n].grad for n in names]

    eager = run(mod.nsa_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        compiled = run(torch.compile(mod.nsa_attention, fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
