"""What the generated tests share: devices, tolerances, and one forward check against the float64 reference.

Generated test files stay short and readable by calling `check_forward`; the rules it applies (relative error
against float64, selections checked for validity then fed to the reference, poisoned outputs, fresh random inputs
with the seed reported on failure) are written once, here.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference
from .jit import import_path
from .spec import Spec, spec_from_mapping

# Relative error of the output (Frobenius) against float64, per dtype: a bf16 flash attention sits near 4e-3.
OUT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Absolute error of a log-sum-exp (natural units).
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# Score tolerance of the selection-validity check: kernels rank with scores computed from rounded pooled keys.
SELECT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def test_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


test_device.__test__ = False  # not a pytest test


def load_generated(test_file: str, name: str):
    """The generated module beside a generated test file, under a name unique to its folder."""
    path = Path(test_file).resolve().with_name(f"{name}.py")
    return import_path(path, f"specgen_generated.{path.parent.name}.{name}")


def spec_of(module) -> Spec:
    return spec_from_mapping(module.SPEC)


def fresh_seed() -> int:
    """A new seed per run (inputs are drawn fresh), unless SPECGEN_TEST_SEED pins one to reproduce a failure."""
    pinned = os.environ.get("SPECGEN_TEST_SEED")
    return int(pinned) if pinned else random.randrange(2**31)


@dataclass
class ForwardReport:
    seed: int
    out_err: float
    lse_err: dict
    selection_ok: bool


def check_forward(module, spec: Spec, B: int, T: int, *, device: str | None = None, seed: int | None = None,
                  query_chunk: int | None = None) -> ForwardReport:
    """Run the generated forward on random inputs and assert it matches the float64 reference.

    The kernel's own selection is checked for validity against the reference scores (a valid top-n within a
    tolerance, forced blocks, no duplicates, padding), then fed to the reference, whose output must match.
    """
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    where = f"[spec {spec.name}, B={B}, T={T}, device={device}, seed={seed} (SPECGEN_TEST_SEED={seed} reproduces)]"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs64 = reference.make_inputs(spec, B, T, dtype=torch.float64, device="cpu", generator=gen)
    dtype = module.DTYPE
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs64.items()}
    # The reference sees exactly the rounded values the kernel sees.
    exact = {k: v.to(torch.float64) for k, v in inputs.items()}
    out = torch.full((B, T, spec.heads.q, spec.head_dim.v), float("nan"), dtype=dtype, device=device)
    result = module.__dict__[f"{spec.family}_forward"](**inputs, out=out, return_lse=True,
                                                      return_indices=spec.selection is not None)
    if spec.selection is not None:
        got, lse, indices = result
    else:
        (got, lse), indices = result, None
    assert got.data_ptr() == out.data_ptr(), f"out= was not used {where}"
    assert torch.isfinite(got).all(), f"non-finite output (a poisoned element was not written?) {where}"

    selection_ok = True
    if indices is not None:
        scored = reference.nsa_forward(spec, **exact, query_chunk=query_chunk)
        reference.check_selection(spec, indices.cpu(), scored.scores.cpu(), T, tol=SELECT_TOL[dtype])
        del scored
    ref = reference.nsa_forward(spec, **exact, indices=indices, query_chunk=query_chunk)
    out_err = reference.rel_err(got.to(torch.float64), ref.out)
    assert out_err < OUT_TOL[dtype], f"output rel err {out_err:.3e} >= {OUT_TOL[dtype]:.0e} {where}"
    lse_err = {}
    for c, branch in enumerate(spec.branches):
        a, b = lse[..., c].to(torch.float64), ref.lse[..., c]
        empty = torch.isinf(b)
        assert torch.equal(torch.isinf(a) & (a < 0), empty), f"{branch}: -inf log-sum-exp where no key is visible {where}"
        err = (a[~empty] - b[~empty]).abs().max().item() if (~empty).any() else 0.0
        lse_err[branch] = err
        assert err < LSE_TOL[dtype], f"{branch}: log-sum-exp abs err {err:.3e} >= {LSE_TOL[dtype]:.0e} {where}"
    return ForwardReport(seed, out_err, lse_err, selection_ok)


def inputs_for(module, spec: Spec, B: int, T: int, device: str | None = None) -> dict:
    device = device or test_device()
    inputs = reference.make_inputs(spec, B, T, dtype=torch.float64, device="cpu")
    return {k: v.to(device=device, dtype=module.DTYPE) for k, v in inputs.items()}


def check_argument_errors(module, spec: Spec, inputs: dict) -> None:
    """Each kind of call-time mistake raises ArgumentError naming the argument, before any kernel runs."""
    import pytest

    from .runtime import ArgumentError

    fn = module.__dict__[f"{spec.family}_forward"]
    q = inputs["q"]
    other = next(n for n in inputs if n != "q")
    wrong_dtype = torch.float16 if module.DTYPE != torch.float16 else torch.float32
    cases = [
        ("q", q[..., :-1], ["`q`", "shape"]),
        ("q", q.to(wrong_dtype), ["`q`", str(module.DTYPE)]),
        (other, torch.cat([inputs[other], inputs[other]], dim=1), [f"`{other}`", "T=", "`q`"]),
    ]
    for name, bad, words in cases:
        with pytest.raises(ArgumentError) as info:
            fn(**{**inputs, name: bad})
        for w in words:
            assert w in str(info.value), f"{w!r} not in: {info.value}"
    for name in ("w_pool_k", "q_idx"):
        if name in inputs:
            with pytest.raises(ArgumentError, match=f"`{name}` is required"):
                fn(**{k: v for k, v in inputs.items() if k != name})
    # A stride-0 view: a sequence past max_seqlen without allocating it.
    too_long = q[:, :1].expand(q.shape[0], spec.max_seqlen + 1, *q.shape[2:])
    with pytest.raises(ArgumentError, match="max_seqlen"):
        fn(**{**inputs, "q": too_long})
    with pytest.raises(ArgumentError, match="`out`"):
        fn(**inputs, out=torch.empty(1, device=q.device, dtype=q.dtype))
