"""What the generated tests share: devices, tolerances, and the checks against the float64 reference.

Generated test files stay short and readable by calling `check_forward` and `check_backward` (plus the compile,
layer and determinism checks); the rules they apply (relative error against float64, selections checked for
validity then fed to the reference, poisoned outputs, fresh random inputs with the seed reported on failure) are
written once, here.
"""

from __future__ import annotations

import contextlib

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference
from ..compile.jit import import_path
from ..model.signature import differentiable_names
from ..model.spec import Spec, spec_from_mapping

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


@dataclass
class RandomCase:
    """Fresh random inputs of one check: the kernel's (spec dtype, on the device) and the float64 copies the
    reference sees (exactly the rounded values the kernel sees), with the seed that reproduces them."""
    inputs: dict
    exact: dict
    gen: torch.Generator
    seed: int
    where: str


def random_case(module, spec: Spec, B: int, T: int, device: str | None, seed: int | None, what: str = "") -> RandomCase:
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    label = f"{what}, " if what else ""
    where = (f"[spec {spec.name}, {label}B={B}, T={T}, device={device}, seed={seed} "
             f"(SPECGEN_TEST_SEED={seed} reproduces)]")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs64 = reference.make_inputs(spec, B, T, dtype=torch.float64, device="cpu", generator=gen)
    inputs = {k: v.to(device=device, dtype=module.DTYPE) for k, v in inputs64.items()}
    return RandomCase(inputs, {k: v.to(torch.float64) for k, v in inputs.items()}, gen, seed, where)


def random_selection(B: int, T: int, heads_kv: int, top_k: int, unit: int, generator: torch.Generator, *,
                     initial: int = 1, local: int = 2, drop: float = 0.0, rows: tuple[int, int] | None = None,
                     device=None) -> torch.Tensor:
    """[B, TC, heads_kv, top_k] int32 selections of the queries rows[0] .. rows[1] - 1 (default all T) of sequences
    of T tokens, shaped like a causal NSA selection: each (query t, kv group) lists up to top_k of the units of
    `unit` tokens it sees (0 .. t // unit), the forced ones always (the first `initial`, the `local` up to its own),
    the rest at random; each slot then left empty with probability `drop` (lists with fewer units); ascending,
    -1 padding last. Drawn on the generator's device (a CUDA one for GPU sizes), returned on `device`."""
    t0, t1 = rows if rows is not None else (0, T)
    n_units = -(-T // unit)
    gdev = generator.device
    out = torch.full((B, t1 - t0, heads_kv, top_k), -1, dtype=torch.int32, device=gdev)
    u = torch.arange(n_units, device=gdev)
    step = max(1, (1 << 24) // max(1, B * heads_kv * n_units))   # bounded scores per chunk of queries
    for c0 in range(t0, t1, step):
        c1 = min(t1, c0 + step)
        own = (torch.arange(c0, c1, device=gdev) // unit).view(1, -1, 1, 1)
        visible = u <= own
        forced = visible & ((u < initial) | (own - u < local))
        score = torch.rand((B, c1 - c0, heads_kv, n_units), generator=generator, device=gdev)
        score = torch.where(forced, 2.0, torch.where(visible, score, -1.0))
        top = score.topk(min(top_k, n_units), dim=-1)
        keep = top.values >= 0
        if drop > 0:
            keep &= torch.rand(keep.shape, generator=generator, device=gdev) >= drop
        chosen = torch.where(keep, top.indices, n_units).sort(dim=-1).values
        out[:, c0 - t0:c1 - t0, :, :chosen.shape[-1]] = torch.where(chosen < n_units, chosen, -1).to(torch.int32)
    return out.to(device if device is not None else gdev)


def check_forward(module, spec: Spec, B: int, T: int, *, device: str | None = None, seed: int | None = None,
                  query_chunk: int | None = None) -> ForwardReport:
    """Run the generated forward on random inputs and assert it matches the float64 reference.

    The kernel's own selection is checked for validity against the reference scores (a valid top-n within a
    tolerance, forced blocks, no duplicates, padding), then fed to the reference, whose output must match.
    """
    device = device or test_device()
    case = random_case(module, spec, B, T, device, seed)
    inputs, exact, where, seed, dtype = case.inputs, case.exact, case.where, case.seed, module.DTYPE
    out = torch.full((B, T, spec.heads.q, spec.head_dim.v), float("nan"), dtype=dtype, device=device)
    result = module.__dict__[f"{spec.family}_forward"](**inputs, out=out, return_lse=True,
                                                      return_indices=spec.selection is not None)
    if spec.selection is not None:
        got, lse, indices = result
    else:
        (got, lse), indices = result, None
    assert got.data_ptr() == out.data_ptr(), f"out= was not used {where}"
    assert torch.isfinite(got).all(), f"non-finite output (a poisoned element was not written?) {where}"

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
    return ForwardReport(seed, out_err, lse_err)


def index_score_tol(spec: Spec, device) -> float:
    """Relative (Frobenius) error allowed of selected index scores against the float64 reference, on `device`.

    Both sides see the same inputs (with fp8, the e4m3 rows of runtime.fp8_rows, bit for bit the same on every
    device), so what remains is the kernel's arithmetic: fp32 products and head sums (~1e-6), and on the GPU the fp8
    tensor-core dots, which Triton leaves unpromoted on sm90 (its default max_num_imprecise_acc): each 128-long dot
    accumulates in the tensor core's truncating e8m13 accumulator (DeepSeek-V3 report 3.3.2, "around 14 bits").
    Emulated on the CPU (each 32-product step aligned to its largest exponent, the accumulator's included, and cut
    to 13 fraction bits) for dsa_v32's indexer (64 heads x 128, random-sign head weights cancelling over the heads,
    every score of T = 12 selected): 1.2-2e-4 over 200 draws. With the H200's failing inputs of 2026-12-07 the
    emulation plus the then scale bug of runtime.fp8_rows gives 3.235e-3 against the 3.232e-3 measured. 1e-3 leaves
    5x room and still fails a lost scale, key or head (errors of 1/8 and more). Under the interpreter the fp8 dots
    are exact fp32 products of the e4m3 values (WIDEN)."""
    if spec.indexer.dtype == "fp8_e4m3" and torch.device(device).type == "cuda":
        return 1e-3
    return 1e-4


def reference_unit_scores(spec: Spec, exact: dict) -> torch.Tensor:
    """The float64 reference's score of every unit [B, T, Hkv, units] (the index score I[t, s], or the block's
    log-sum-exp of I; +inf for a forced block, -inf where nothing is visible) from the inputs `exact` (float64 copies
    of the kernel's q_idx, k_idx, w_idx)."""
    I = reference.indexer_scores(spec, *(exact[n].cpu() for n in ("q_idx", "k_idx", "w_idx")))  # [B, T, Hkv, T]
    if spec.selection.granularity != "block":
        return I
    unit = spec.selection.block
    I = reference.indexer_block_scores(spec, I)
    j = torch.arange(I.shape[-1])
    back = torch.arange(I.shape[1]).view(-1, 1) // unit - j                              # [T, blocks]
    forced = (back >= 0) & ((j < spec.selection.initial) | (back < spec.selection.local))  # visible and forced
    return torch.where(forced[None, :, None, :], float("inf"), I)


def reference_index_scores(spec: Spec, exact: dict, indices: torch.Tensor) -> torch.Tensor:
    """reference_unit_scores at the selected units `indices` [B, T, Hkv, k] (-inf at padding -1)."""
    idx = indices.cpu().long()
    want = reference_unit_scores(spec, exact).gather(-1, idx.clamp(min=0))
    return torch.where(idx < 0, float("-inf"), want)


def check_index_topk(module, spec: Spec, B: int, T: int, *, device: str | None = None,
                     seed: int | None = None) -> None:
    """`index_topk` with scores: the same indices as the forward's own selection, and each selected unit's score
    equal to the float64 reference's (the index score I[t, s], or the block's log-sum-exp, +inf when forced;
    -inf at padding) within index_score_tol. With an fp8 indexer both sides round q_I, k_I by runtime.fp8_rows."""
    case = random_case(module, spec, B, T, device, seed, what="index_topk")
    x, where = case.inputs, case.where
    names = ("q_idx", "k_idx", "w_idx")
    indices, scores = module.index_topk(*(x[n] for n in names), return_scores=True)
    _, _, own = module.__dict__[f"{spec.family}_forward"](**x, return_lse=True, return_indices=True)
    assert torch.equal(indices, own), f"index_topk and the forward select differently {where}"
    want = reference_index_scores(spec, case.exact, indices)
    got = scores.cpu().double()
    pad, forced = indices.cpu() < 0, want == float("inf")
    assert bool((got[pad] == float("-inf")).all()), f"padding slots must score -inf {where}"
    assert bool((got[forced] == float("inf")).all()), f"forced blocks must score +inf {where}"
    ranked = ~pad & ~forced
    if ranked.any():
        err = reference.rel_err(got[ranked], want[ranked])
        tol = index_score_tol(spec, indices.device)
        assert err < tol, f"selected scores rel err {err:.3e} >= {tol:.0e} {where}"


def inputs_for(module, spec: Spec, B: int, T: int, device: str | None = None) -> dict:
    device = device or test_device()
    inputs = reference.make_inputs(spec, B, T, dtype=torch.float64, device="cpu")
    return {k: v.to(device=device, dtype=module.DTYPE) for k, v in inputs.items()}


def check_argument_errors(module, spec: Spec, inputs: dict) -> None:
    """Each kind of call-time mistake raises ArgumentError naming the argument, before any kernel runs."""
    import pytest

    from ..runtime import ArgumentError

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


# ---------------------------------------------------------------------------------------------------------------
# Backward: gradients against the float64 reference's autograd
# ---------------------------------------------------------------------------------------------------------------

# Relative error (Frobenius) of each gradient against float64: twice the output's room (dS and dP are rounded to
# the spec's dtype before their products, and dK/dV sum many such terms).
GRAD_TOL = {dtype: 2 * tol for dtype, tol in OUT_TOL.items()}
# Gradients that are exactly zero: a key position embedding shifts every pooled key of a kv head by the same
# vector, and each softmax is shift-invariant. Their error is measured against the scale of a sibling gradient.
ZERO_GRADIENTS = {"pe_pool_k": "pe_pool_v"}


def differentiable_inputs(spec: Spec) -> list[str]:
    """The inputs that get gradients (the call contract decides: specgen.model.signature)."""
    return differentiable_names(spec)


def reference_gradients(spec: Spec, inputs: dict, indices: torch.Tensor | None, dout: torch.Tensor, *,
                        query_chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """(out, {name: gradient}) of the reference for the loss sum(out * dout), by torch autograd, in the inputs' dtype.

    `indices` (the kernel's selection) replace the scorer's: top-k is not differentiated. Queries are processed in
    chunks of `query_chunk` and each chunk's graph is freed by its own backward, so a realistic size fits beside
    the kernel; the pooled keys/values are leaves of the chunks, and their gradient is sent through the pooling
    once at the end.
    """
    from ..reference.nsa import _branch_kv, _compression_chunk, _sparse_chunk, _window_chunk, selection_unit
    from ..reference._core import query_chunks

    names = differentiable_inputs(spec)
    leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in inputs.items()}
    q = leaves["q"]
    T = q.shape[1]
    positions = torch.arange(T, device=q.device)
    pooled = None
    if spec.has["compression"]:
        k_cmp, v_cmp = _branch_kv(spec, leaves, "compression")
        pooled = (reference.pool_kv(spec, k_cmp, leaves.get("w_pool_k"), leaves.get("pe_pool_k")),
                  reference.pool_kv(spec, v_cmp, leaves.get("w_pool_v"), leaves.get("pe_pool_v")))
        kc, vc = (x.detach().requires_grad_(True) for x in pooled)
    outs = []
    for rows in query_chunks(T, query_chunk):
        q_c, pos = q[:, rows], positions[rows]
        total = 0
        for c, branch in enumerate(spec.branches):
            if branch == "compression":
                o = _compression_chunk(spec, q_c, kc, vc, pos)[0]
            elif branch == "window":
                o = _window_chunk(spec, q_c, *_branch_kv(spec, leaves, "window"), pos)[0]
            else:
                o = _sparse_chunk(spec, q_c, *_branch_kv(spec, leaves, "selection"), indices[:, rows],
                                  selection_unit(spec), pos)[0]
            total = total + (leaves["gates"][:, rows, :, c, None] * o if spec.gated else o)
        (total * dout[:, rows]).sum().backward()
        outs.append(total.detach())
    if pooled is not None:
        sent = [(x, leaf.grad) for x, leaf in zip(pooled, (kc, vc)) if x.requires_grad and leaf.grad is not None]
        if sent:  # (no complete block, T < l: nothing was pooled)
            torch.autograd.backward([x for x, _ in sent], [g for _, g in sent])
    grads = {n: (leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n])) for n in names}
    return torch.cat(outs, dim=1), grads


@dataclass
class BackwardReport:
    seed: int
    grad_err: dict


def _attention_fn(module, spec: Spec):
    return module.__dict__[f"{spec.family}_attention"]


def check_backward(module, spec: Spec, B: int, T: int, *, device: str | None = None, seed: int | None = None,
                   query_chunk: int | None = None) -> BackwardReport:
    """Run the generated forward and backward on random inputs; every gradient must match the float64 reference's
    autograd (fed the kernel's selection) in relative error, and be finite."""
    device = device or test_device()
    case = random_case(module, spec, B, T, device, seed)
    inputs, exact, where, seed, gen, dtype = case.inputs, case.exact, case.where, case.seed, case.gen, module.DTYPE
    names = differentiable_inputs(spec)
    for n in names:
        inputs[n].requires_grad_(True)
    dout = torch.randn(B, T, spec.heads.q, spec.head_dim.v, generator=gen, dtype=torch.float64).to(device, dtype)

    result = _attention_fn(module, spec)(**inputs, return_indices=spec.selection is not None)
    out, indices = result if spec.selection is not None else (result, None)
    out.backward(dout)
    ref_out, ref_grads = reference_gradients(spec, exact, indices, dout.to(torch.float64), query_chunk=query_chunk)
    out_err = reference.rel_err(out.detach().to(torch.float64), ref_out)
    assert out_err < OUT_TOL[dtype], f"output rel err {out_err:.3e} >= {OUT_TOL[dtype]:.0e} {where}"
    errors = {}
    for n in names:
        got = assert_gradient_sane(n, inputs[n], dtype, where)
        if n in ZERO_GRADIENTS:
            scale = torch.linalg.vector_norm(ref_grads[ZERO_GRADIENTS[n]]).item()
            diff = torch.linalg.vector_norm(got.to(torch.float64) - ref_grads[n]).item()
            errors[n] = diff / scale if scale > 0 else diff
        else:
            errors[n] = reference.rel_err(got.to(torch.float64), ref_grads[n])
    bad = {n: e for n, e in errors.items() if not e < GRAD_TOL[dtype]}
    assert not bad, (f"gradient rel err >= {GRAD_TOL[dtype]:.0e}: "
                     + ", ".join(f"d{n} {e:.3e}" for n, e in bad.items())
                     + f" (all: {', '.join(f'd{n} {e:.1e}' for n, e in errors.items())}) {where}")
    return BackwardReport(seed, errors)


def assert_gradient_sane(name: str, leaf: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The gradient a leaf received: present, of the leaf's dtype and shape, finite. Returns it."""
    got = leaf.grad
    assert got is not None, f"no gradient reached `{name}` {where}"
    assert got.dtype == dtype and got.shape == leaf.shape, f"d{name}: {got.dtype} {list(got.shape)} {where}"
    assert torch.isfinite(got).all(), f"non-finite gradient of `{name}` {where}"
    return got


def backward_cases(spec: Spec, cpu_seqlens: list[int], cpu_batch: int) -> list[tuple[int, int]]:
    """(B, T) of the CPU gradient tests: the interpreter is slow and a backward costs about two forwards.

    Small specs: the forward's lengths up to 70 at the forward's batch, and T = 67 at B = 1 when the selection has
    more candidates than top_k there (so some blocks are selected by only part of the queries). Big specs: one
    tiny length just past the compression block (so one block is pooled), B = 1.
    """
    from ..compile.render import SMALL_SPEC_WIDTH

    sel, cmp_ = spec.selection, spec.compression
    unit = 0 if sel is None else (sel.block if sel.granularity == "block" else 1)
    if spec.heads.q * spec.head_dim.qk > SMALL_SPEC_WIDTH:
        return [(1, min(cpu_seqlens[0], max(16, cmp_.block if cmp_ else 0) + 3))]
    cases = [(cpu_batch, t) for t in sorted(cpu_seqlens) if t <= 70]
    if sel is not None and sel.top_k * unit < 67 <= spec.max_seqlen and 67 not in cpu_seqlens:
        cases.append((1, 67))
    return cases or [(1, min(cpu_seqlens))]


def _grad_inputs(module, spec: Spec, B: int, T: int, device: str, seed: int):
    case = random_case(module, spec, B, T, device, seed)
    dout = torch.randn(B, T, spec.heads.q, spec.head_dim.v, generator=case.gen, dtype=torch.float64)
    return case.inputs, dout.to(device=device, dtype=module.DTYPE)


def _forward_backward(fn, spec: Spec, inputs: dict, dout: torch.Tensor) -> dict:
    """out, indices and every gradient of one forward + backward through `fn`, on fresh leaves."""
    names = differentiable_inputs(spec)
    leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in inputs.items()}
    result = fn(**leaves, return_indices=True)
    out, indices = result
    out.backward(dout)
    return {"out": out.detach(), "indices": indices, **{f"d{n}": leaves[n].grad for n in names}}


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    """`torch.use_deterministic_algorithms(on)` inside the block (warn_only: torch's own ops only warn), restored
    after. A module whose selection backward scatters with atomics takes its deterministic kernels inside
    (docs/backward.md)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def scatters(module) -> bool:
    """The module's selection backward takes the atomic scatter path unless deterministic mode is on."""
    return module._DESC.selection_backward == "scatter"


def check_backward_deterministic(module, spec: Spec, B: int, T: int, *, device: str | None = None,
                                 seed: int | None = None) -> None:
    """Forward + backward twice on the same inputs: output, selection and every gradient equal bit for bit (no
    atomics, fixed reduction orders; docs/backward.md). Runs in PyTorch's deterministic mode, which a module with
    the scatter path needs for it."""
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    inputs, dout = _grad_inputs(module, spec, B, T, device, seed)
    fn = _attention_fn(module, spec)
    with deterministic_algorithms():
        first = _forward_backward(fn, spec, inputs, dout)
        second = _forward_backward(fn, spec, inputs, dout)
    for name, a in first.items():
        b = second[name]
        if a is None:
            assert b is None, name
            continue
        assert torch.equal(a, b), (f"{name} differs between two identical runs ({(a != b).sum().item()} elements) "
                                   f"[spec {spec.name}, B={B}, T={T}, seed={seed}]")


def check_backward_paths_agree(module, spec: Spec, B: int, T: int, *, device: str | None = None,
                               seed: int | None = None) -> dict:
    """The scatter path (atomics) and the deterministic path of a module's selection backward on the same inputs:
    the same output and selection, every gradient within the gradient tolerance of the other's (relative error;
    the two sum in different orders). Returns {name: relative error}."""
    assert scatters(module), f"{spec.name} has no scatter path"
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    inputs, dout = _grad_inputs(module, spec, B, T, device, seed)
    fn = _attention_fn(module, spec)
    with deterministic_algorithms(False):
        scatter = _forward_backward(fn, spec, inputs, dout)
    with deterministic_algorithms():
        exact = _forward_backward(fn, spec, inputs, dout)
    where = f"[spec {spec.name}, B={B}, T={T}, device={device}, seed={seed} (SPECGEN_TEST_SEED={seed} reproduces)]"
    assert torch.equal(scatter["out"], exact["out"]) and torch.equal(scatter["indices"], exact["indices"]), where
    errors = {n: reference.rel_err(scatter[n].to(torch.float64), exact[n].to(torch.float64))
              for n in scatter if n.startswith("d")}
    bad = {n: e for n, e in errors.items() if not e < GRAD_TOL[module.DTYPE]}
    assert not bad, f"scatter vs deterministic gradients differ: {bad} {where}"
    return errors


def check_compile(module, spec: Spec, B: int, T: int, *, device: str | None = None, seed: int | None = None,
                  fullgraph: bool = True) -> None:
    """The differentiable call under torch.compile gives the eager output and gradients (same custom ops)."""
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    inputs, dout = _grad_inputs(module, spec, B, T, device, seed)
    fn = _attention_fn(module, spec)
    eager = _forward_backward(fn, spec, inputs, dout)
    with warnings.catch_warnings():
        # torch's own first compile imports modules that warn about torch.jit's deprecation: not ours to fix.
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        compiled = _forward_backward(torch.compile(fn, fullgraph=fullgraph), spec, inputs, dout)
    for name, a in eager.items():
        b = compiled[name]
        if a is None:
            assert b is None, name
            continue
        assert b is not None and a.dtype == b.dtype and a.shape == b.shape, name
        err = reference.rel_err(b, a) if a.is_floating_point() else float(not torch.equal(a, b))
        assert err < 1e-6, f"{name}: compiled differs from eager (rel err {err:.2e}) [spec {spec.name}, seed={seed}]"


def check_layer(module, spec: Spec, B: int, T: int, *, hidden: int = 32, device: str | None = None,
                seed: int | None = None) -> None:
    """The generated attention layer: hidden -> hidden in the parameters' dtype; gradients reach every parameter
    but the indexer's, finite; under autocast (bf16, or fp16 for fp16 specs) it runs and stays within the spec
    dtype's tolerance of the fp32 run."""
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    where = f"[spec {spec.name}, B={B}, T={T}, device={device}, seed={seed}]"
    torch.manual_seed(seed)
    layer = module.__dict__[f"{spec.family.upper()}ttention"](hidden, device=device)
    x = torch.randn(B, T, hidden, device=device)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == torch.float32, f"layer output {out.dtype} {list(out.shape)} {where}"
    out.square().mean().backward()
    for name, p in layer.named_parameters():
        if name.startswith("idx_"):
            assert p.grad is None, f"the indexer's {name} got a gradient through the attention {where}"
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"no finite gradient for {name} {where}"
        # (pool weights see no gradient while T < l: no complete block is pooled)
        if name.split(".")[0] in ("q_proj", "kv_proj", "gate_proj", "o_proj"):
            assert p.grad.abs().sum() > 0, f"zero gradient for {name} {where}"
    layer.zero_grad()
    amp = torch.float16 if module.DTYPE == torch.float16 else torch.bfloat16
    with torch.autocast(device_type=torch.device(device).type, dtype=amp):
        mixed = layer(x)
    assert mixed.dtype == amp, f"under autocast the layer returned {mixed.dtype} {where}"
    err = reference.rel_err(mixed.float(), out.detach())
    assert err < 2 * OUT_TOL[amp], f"autocast output rel err {err:.2e} against fp32 {where}"
    mixed.float().square().mean().backward()
    for name, p in layer.named_parameters():
        if not name.startswith("idx_"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"autocast: bad gradient for {name} {where}"


def check_distill(module, spec: Spec, B: int, T: int, stage: str, *, device: str | None = None,
                  seed: int | None = None, query_chunk: int | None = None) -> None:
    """The generated distillation loss and its gradients (q_idx, k_idx, w_idx) against the float64 reference.

    The sparse stage uses the module's own top-k indices (a valid selection, checked by check_forward); stage
    "dense_unabsorbed" is the dense stage from q and k in the spec's unabsorbed form (a key per query head)."""
    case = random_case(module, spec, B, T, device, seed, what=stage)
    inputs, where, gen, dtype = case.inputs, case.where, case.gen, module.DTYPE
    indices = None
    main_q, main_k = inputs["q"], inputs["k"]
    if stage == "sparse":
        _, indices = module.__dict__[f"{spec.family}_forward"](**inputs, return_indices=True)
    elif stage == "dense_unabsorbed":
        stage = "dense"
        main_q, main_k = (x.to(device=main_q.device, dtype=dtype)
                          for x in reference.make_unabsorbed_qk(spec, B, T, generator=gen))
    trained = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx", "w_idx")}
    loss = module.distill_loss(main_q, main_k, **trained, indices=indices, stage=stage)
    assert_distill_matches(loss, trained, lambda exact: reference.distill_loss(
        spec, main_q.double(), main_k.double(), **exact, indices=indices, query_chunk=query_chunk),
        gen, dtype, where)


def assert_distill_matches(loss, trained: dict, reference_loss, gen, dtype, where: str) -> None:
    """The kernel's distillation loss and the gradients it sends to the `trained` leaves (under a random upstream
    gradient) against `reference_loss(float64 copies of those leaves)` and its autograd."""
    upstream = 0.5 + torch.rand((), generator=gen).item()
    (loss * upstream).backward()
    exact = {n: t.detach().to(torch.float64).requires_grad_(True) for n, t in trained.items()}
    ref_loss = reference_loss(exact)
    (ref_loss * upstream).backward()
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-6)
    assert loss_err < OUT_TOL[dtype], f"distillation loss rel err {loss_err:.3e} {where}"
    for name in trained:
        err = reference.rel_err(trained[name].grad.to(torch.float64), exact[name].grad)
        assert err < 2 * OUT_TOL[dtype], f"d{name} rel err {err:.3e} >= {2 * OUT_TOL[dtype]:.0e} {where}"
