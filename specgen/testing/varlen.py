"""Checks of packed (varlen) calls, cu_seqlens and max_seqlen as in flash-attn, against the float64 reference run
sequence by sequence (specgen.reference.varlen).

The rules are those of specgen.testing: fresh random inputs (seed reported, SPECGEN_TEST_SEED reproduces), outputs
poisoned before the call, relative error against float64 within the project's tolerances, selections checked for
validity per sequence and then fed to the reference. `rows` restricts a check to the last `rows` queries of each
sequence (GPU sizes: the reference of a 40k-token sequence does not fit otherwise); the backward then puts the
output gradient on those rows only, so every gradient is still compared in full.
"""

from __future__ import annotations

import contextlib

import torch

from .. import reference
from ..reference.varlen import SHARED, query_rows, sequence_inputs, sequences
from ..runtime import Packed
from . import (GRAD_TOL, LSE_TOL, OUT_TOL, SELECT_TOL, ZERO_GRADIENTS, assert_distill_matches,
                      assert_gradient_sane, differentiable_inputs, fresh_seed, test_device)


class PackedCase:
    """Fresh random packed inputs: the kernel's (spec dtype, on the device), their exact float64 copies, the
    cu_seqlens (int32, on the device), and what reproduces them."""

    def __init__(self, module, spec, lengths, device, seed, what=""):
        self.device = device or test_device()
        self.seed = fresh_seed() if seed is None else seed
        self.lengths = list(lengths)
        self.total = sum(self.lengths)
        self.max_seqlen = max(max(self.lengths), 1)
        label = f"{what}, " if what else ""
        self.where = (f"[spec {spec.name}, {label}packed lengths {self.lengths}, device={self.device}, "
                      f"seed={self.seed} (SPECGEN_TEST_SEED={self.seed} reproduces)]")
        self.gen = torch.Generator(device="cpu").manual_seed(self.seed)
        batched = reference.make_inputs(spec, 1, self.total, dtype=torch.float64, device="cpu", generator=self.gen)
        # The kernel's inputs; the reference sees exactly these values in float64, converted one sequence at a
        # time (`sequence`): a 64k-token batch of wide heads would not fit in float64 at once.
        self.inputs = {n: (x if n in SHARED else x[0]).to(device=self.device, dtype=module.DTYPE)
                       for n, x in batched.items()}
        offsets = [0]
        for n in self.lengths:
            offsets.append(offsets[-1] + n)
        self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=self.device)

    def varlen(self) -> dict:
        return {"cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen}

    def sequence(self, start, end, rows=None) -> dict:
        """One sequence's inputs in float64 as a batch of one (queries: its last `rows` rows)."""
        return {n: x.to(torch.float64) for n, x in sequence_inputs(self.inputs, start, end, rows).items()}


_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
          torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}


class AllocationWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Every tensor the torch ops inside the block create: the largest one in bytes (`largest`: bytes and what
    made it), and each fresh (uninitialised) floating buffer filled with NaN, so a row that no kernel writes shows
    up as non-finite. The packed-batch tests bound `largest` by a multiple of the total token count."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in _EMPTY and result.is_floating_point():
            result.fill_(float("nan"))
        for x in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(x, torch.Tensor) and x.numel() * x.element_size() > self.largest[0]:
                self.largest = (x.numel() * x.element_size(), (str(func), tuple(x.shape), x.dtype))
        return result


def _fn(module, spec, kind):
    return module.__dict__[f"{spec.family}_{kind}"]


@contextlib.contextmanager
def never_pads(module):
    """Inside: a packed call of a module with packed kernels (Descriptor.native_varlen) raises if it builds the
    padded [N, max_seqlen] batch (`Packed.pad`), as docs/varlen.md promises for the forward, the differentiable
    call and the layer."""
    if not module._DESC.native_varlen:
        yield
        return

    def trap(*args, **kwargs):
        raise AssertionError(f"{module.SPEC_NAME}: a native packed call padded its inputs (Packed.pad)")

    original = Packed.pad
    Packed.pad = trap
    try:
        yield
    finally:
        Packed.pad = original


def _check_selection(spec, case, indices, rows, query_chunk, dtype):
    """Per sequence: the kernel's selection is a valid top-n of the reference scores (positions relative to the
    sequence's start)."""
    offset = 0
    for start, end in sequences(case.cu_seqlens):
        if end == start:
            continue
        seq = case.sequence(start, end, rows)
        r = seq["q"].shape[1]
        scored = reference.nsa_forward(spec, **seq, query_chunk=query_chunk)
        try:
            reference.check_selection(spec, indices[offset:offset + r][None].cpu(), scored.scores.cpu(), end - start,
                                      tol=SELECT_TOL[dtype])
        except AssertionError as e:
            raise AssertionError(f"sequence [{start}, {end}): {e} {case.where}") from None
        offset += r


def _check_lse(spec, lse, ref_lse, where, dtype):
    for c, branch in enumerate(spec.branches):
        a, b = lse[..., c].to(torch.float64), ref_lse[..., c]
        empty = torch.isinf(b)
        assert torch.equal(torch.isinf(a) & (a < 0), empty), f"{branch}: -inf log-sum-exp where no key is visible {where}"
        err = (a[~empty] - b[~empty]).abs().max().item() if (~empty).any() else 0.0
        assert err < LSE_TOL[dtype], f"{branch}: log-sum-exp abs err {err:.3e} >= {LSE_TOL[dtype]:.0e} {where}"


def check_forward_varlen(module, spec, lengths, *, device=None, seed=None, rows=None, query_chunk=None,
                         around=contextlib.nullcontext) -> float:
    """`<family>_forward` on a packed batch: output (into a poisoned `out=`), per-branch log-sum-exp and the
    selection against the reference of each sequence. Returns the output's relative error. `around()`: a context
    entered around the packed forward call alone (a test's allocation watch)."""
    case = PackedCase(module, spec, lengths, device, seed)
    dtype, where, has_sel = module.DTYPE, case.where, spec.selection is not None
    out = torch.full((case.total, spec.heads.q, spec.head_dim.v), float("nan"), dtype=dtype, device=case.device)
    with around(), never_pads(module):
        result = _fn(module, spec, "forward")(**case.inputs, out=out, return_lse=True, return_indices=has_sel,
                                              **case.varlen())
    got, lse, indices = result if has_sel else (*result, None)
    assert got.data_ptr() == out.data_ptr(), f"out= was not used {where}"
    assert torch.isfinite(got).all(), f"non-finite output (a poisoned element was not written?) {where}"
    assert tuple(lse.shape) == (case.total, spec.heads.q, len(spec.branches)), f"lse {list(lse.shape)} {where}"
    covered = query_rows(case.cu_seqlens, rows).to(got.device)
    if indices is not None:
        assert tuple(indices.shape) == (case.total, spec.heads.kv, spec.selection.top_k), f"indices {where}"
        if hasattr(module, "index_topk"):
            alone = module.index_topk(*(case.inputs[n] for n in ("q_idx", "k_idx", "w_idx")), **case.varlen())
            assert torch.equal(alone, indices), f"packed index_topk and the packed forward select differently {where}"
        indices = indices[covered]
        _check_selection(spec, case, indices, rows, query_chunk, dtype)
    ref = reference.nsa_forward_varlen(spec, case.cu_seqlens, indices=indices, rows=rows, query_chunk=query_chunk,
                                       dtype=torch.float64, **case.inputs)
    err = reference.rel_err(got[covered].to(torch.float64), ref.out)
    assert err < OUT_TOL[dtype], f"output rel err {err:.3e} >= {OUT_TOL[dtype]:.0e} {where}"
    _check_lse(spec, lse[covered], ref.lse, where, dtype)
    return err


def check_backward_varlen(module, spec, lengths, *, device=None, seed=None, rows=None, query_chunk=None,
                          around=contextlib.nullcontext) -> dict:
    """`<family>_attention` on a packed batch, forward and backward: the output, and every gradient against the
    reference's autograd run per sequence (fed the kernel's selection). Returns the gradients' relative errors.
    `around()`: a context entered around the packed call's forward and backward alone (a test's allocation
    watch)."""
    case = PackedCase(module, spec, lengths, device, seed, "backward")
    dtype, where = module.DTYPE, case.where
    names = differentiable_inputs(spec)
    leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in case.inputs.items()}
    # The output gradient lives on the checked rows only (all rows unless `rows` samples them).
    covered = query_rows(case.cu_seqlens, rows)
    sampled = torch.randn(covered.numel(), spec.heads.q, spec.head_dim.v, generator=case.gen, dtype=torch.float64)
    covered = covered.to(case.device)
    dout = torch.zeros((case.total, spec.heads.q, spec.head_dim.v), dtype=dtype, device=case.device)
    dout.index_copy_(0, covered, sampled.to(case.device, dtype))
    del sampled
    with around(), never_pads(module):
        result = _fn(module, spec, "attention")(**leaves, return_indices=spec.selection is not None, **case.varlen())
        out, indices = result if spec.selection is not None else (result, None)
        assert tuple(out.shape) == (case.total, spec.heads.q, spec.head_dim.v), f"out {list(out.shape)} {where}"
        out.backward(dout)

    # The reference per sequence (float64 leaves of that sequence; the shared pooling weights are one leaf for all
    # sequences). Errors are Frobenius norms accumulated over the sequences; rows outside `rows` have a zero
    # reference gradient on the query side.
    shared = {n: case.inputs[n].detach().to(torch.float64).requires_grad_(n in names)
              for n in case.inputs if n in SHARED}
    num = {n: 0.0 for n in names}
    den = {n: 0.0 for n in names}
    out_num = out_den = 0.0
    offset = 0
    packed_indices = None if indices is None else indices[covered]
    for start, end in sequences(case.cu_seqlens):
        if end == start:
            continue
        seq = {n: x.requires_grad_(n in names) for n, x in case.sequence(start, end, rows).items() if n not in SHARED}
        r = seq["q"].shape[1]
        idx = None if packed_indices is None else packed_indices[offset:offset + r][None]
        offset += r
        ref = reference.nsa_forward(spec, **seq, **shared, indices=idx, query_chunk=query_chunk)
        (ref.out[0] * dout[end - r:end].to(torch.float64)).sum().backward()
        out_num += (out.detach()[end - r:end].to(torch.float64) - ref.out[0].detach()).square().sum().item()
        out_den += ref.out.detach().square().sum().item()
        for n in names:
            if n in SHARED:
                continue
            got = leaves[n].grad
            want = seq[n].grad[0] if seq[n].grad is not None else torch.zeros_like(seq[n][0])
            first = end - want.shape[0]                      # query side: the sampled rows only
            num[n] += (got[first:end].to(torch.float64) - want).square().sum().item()
            num[n] += got[start:first].to(torch.float64).square().sum().item()
            den[n] += want.square().sum().item()
        del ref, seq
    for n, leaf in shared.items():
        if n in names:
            want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            num[n] = (leaves[n].grad.to(torch.float64) - want).square().sum().item()
            den[n] = want.square().sum().item()
    err = (out_num / out_den) ** 0.5 if out_den > 0 else out_num ** 0.5
    assert err < OUT_TOL[dtype], f"output rel err {err:.3e} >= {OUT_TOL[dtype]:.0e} {where}"
    errors = {}
    for n in names:
        assert_gradient_sane(n, leaves[n], dtype, where)
        if n in ZERO_GRADIENTS:  # measured against the scale of a sibling gradient (specgen.testing)
            scale = den[ZERO_GRADIENTS[n]] ** 0.5
            errors[n] = num[n] ** 0.5 / scale if scale > 0 else num[n] ** 0.5
        else:
            errors[n] = (num[n] / den[n]) ** 0.5 if den[n] > 0 else num[n] ** 0.5
    bad = {n: e for n, e in errors.items() if not e < GRAD_TOL[dtype]}
    assert not bad, (f"gradient rel err >= {GRAD_TOL[dtype]:.0e}: " + ", ".join(f"d{n} {e:.3e}" for n, e in bad.items())
                     + f" (all: {', '.join(f'd{n} {e:.1e}' for n, e in errors.items())}) {where}")
    return errors


def check_distill_varlen(module, spec, lengths, stage, *, device=None, seed=None) -> None:
    """`distill_loss` on a packed batch (dense warm-up or sparse stage; "dense_unabsorbed": the dense stage from q
    and k in the spec's unabsorbed form): the loss and the gradients of q_idx, k_idx, w_idx against the reference
    summed over sequences and divided by the valid rows of the whole batch."""
    case = PackedCase(module, spec, lengths, device, seed, stage)
    inputs, dtype, where = case.inputs, module.DTYPE, case.where
    indices = lse_main = None
    if stage == "dense_unabsorbed":
        stage = "dense"
        inputs = dict(inputs, **{n: x[0].to(device=inputs["q"].device, dtype=dtype) for n, x in zip(
            ("q", "k"), reference.make_unabsorbed_qk(spec, 1, case.total, generator=case.gen))})
    if stage == "sparse":
        # The sparse forward's log-sum-exp is the main attention's over the support: `lse_main`, packed too.
        _, lse, indices = _fn(module, spec, "forward")(**inputs, return_lse=True, return_indices=True, **case.varlen())
        lse_main = lse[..., spec.branches.index("selection")].contiguous()
    trained = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx", "w_idx")}
    # Native (docs/varlen.md): neither the loss nor its backward builds the padded batch.
    with never_pads(module):
        loss = module.distill_loss(inputs["q"], inputs["k"], **trained, indices=indices, stage=stage,
                                   **case.varlen())
        if lse_main is not None:
            # The same loss with the packed lse_main given, and the selection left to the indexer's own top-k.
            with torch.no_grad():
                given = module.distill_loss(inputs["q"], inputs["k"], *trained.values(), lse_main=lse_main,
                                            stage="sparse", **case.varlen())
            diff = abs(given.item() - loss.item()) / max(abs(loss.item()), 1e-6)
            assert diff < OUT_TOL[dtype], f"loss with the packed lse_main differs by {diff:.2e} {where}"
        assert_distill_matches(loss, trained, lambda exact: reference.distill_loss_varlen(
            spec, inputs["q"].double(), inputs["k"].double(), **exact, cu_seqlens=case.cu_seqlens, indices=indices),
            case.gen, dtype, where)


def check_varlen_argument_errors(module, spec, lengths, *, device=None) -> None:
    """Each mistake in a packed call raises ArgumentError naming the argument and the fix, before any kernel runs
    (a poisoned `out=` stays untouched)."""
    import pytest

    from ..runtime import ArgumentError

    case = PackedCase(module, spec, lengths, device, 0)
    inputs, cu, total = case.inputs, case.cu_seqlens, case.total
    fwd = _fn(module, spec, "forward")
    longest = max(case.lengths)
    out = torch.full((total, spec.heads.q, spec.head_dim.v), float("nan"), dtype=module.DTYPE, device=case.device)

    def cu_of(values):
        return torch.tensor(values, dtype=torch.int32, device=case.device)

    other = next(n for n in inputs if n != "q" and n not in SHARED)
    cases = [
        ({"cu_seqlens": cu.long(), "max_seqlen": longest}, ["`cu_seqlens`", "int32"]),
        ({"cu_seqlens": cu[None], "max_seqlen": longest}, ["`cu_seqlens`", "1-D"]),
        ({"cu_seqlens": cu_of([1] + cu.tolist()[1:]), "max_seqlen": longest}, ["`cu_seqlens`", "start at 0"]),
        ({"cu_seqlens": cu_of([0, total, 0, total]), "max_seqlen": total}, ["`cu_seqlens`", "non-decreasing"]),
        ({"cu_seqlens": cu_of(cu.tolist()[:-1] + [total - 1]), "max_seqlen": longest}, ["`cu_seqlens`", "ends at"]),
        ({"cu_seqlens": cu, "max_seqlen": longest - 1}, ["`max_seqlen`", str(longest)]),
        ({"cu_seqlens": cu, "max_seqlen": None}, ["`max_seqlen` is required"]),
        ({"cu_seqlens": None, "max_seqlen": longest}, ["`cu_seqlens`"]),
        ({"cu_seqlens": cu, "max_seqlen": spec.max_seqlen + 1}, ["max_seqlen", "spec"]),
        ({"cu_seqlens": cu, "max_seqlen": longest, "q": inputs["q"][None]}, ["`q`", "dims"]),
        ({"cu_seqlens": cu, "max_seqlen": longest, other: inputs[other][:-1]}, [f"`{other}`", "total="]),
    ]
    for change, words in cases:
        with pytest.raises(ArgumentError) as info:
            fwd(**{**inputs, **change}, out=out)
        for w in words:
            assert w in str(info.value), f"{w!r} not in: {info.value}"
        assert torch.isnan(out).all(), f"a kernel ran before the error ({info.value})"
    with pytest.raises(ArgumentError, match="`out`"):
        fwd(**inputs, out=out[:-1], **case.varlen())
    if spec.selection is not None:
        bad = torch.zeros((total + 1, spec.heads.kv, spec.selection.top_k), dtype=torch.int32, device=case.device)
        with pytest.raises(ArgumentError, match="`indices`"):
            fwd(**inputs, indices=bad, **case.varlen())
    # The differentiable call and the distillation loss check the same way.
    with pytest.raises(ArgumentError, match="`max_seqlen`"):
        _fn(module, spec, "attention")(**inputs, cu_seqlens=cu, max_seqlen=longest - 1)
    if hasattr(module, "distill_loss"):
        args = [inputs[n] for n in ("q", "k", "q_idx", "k_idx", "w_idx")]
        with pytest.raises(ArgumentError, match="`max_seqlen`"):
            module.distill_loss(*args, cu_seqlens=cu, max_seqlen=longest - 1)
        with pytest.raises(ArgumentError, match="`cu_seqlens`"):
            module.distill_loss(*args, cu_seqlens=cu.long(), max_seqlen=longest)


def check_layer_varlen(module, spec, lengths, *, hidden: int = 32, device=None, seed=None) -> None:
    """The attention layer on a packed batch [total, hidden] equals the layer run on each sequence alone (RoPE
    positions restart per sequence), and its parameters' gradients equal the sum over the sequences."""
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    where = f"[spec {spec.name}, packed lengths {list(lengths)}, device={device}, seed={seed}]"
    torch.manual_seed(seed)
    layer = module.__dict__[f"{spec.family.upper()}ttention"](hidden, device=device)
    x = torch.randn(sum(lengths), hidden, device=device)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device=device)
    with never_pads(module):
        out = layer(x, cu_seqlens=cu, max_seqlen=max(lengths))
        assert out.shape == x.shape, f"layer output {list(out.shape)} {where}"
        out.square().sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    parts = []
    for start, end in sequences(cu):
        if end > start:
            o = layer(x[None, start:end])[0]
            o.square().sum().backward()
            parts.append(o.detach())
    err = reference.rel_err(out.detach().double(), torch.cat(parts).double())
    assert err < OUT_TOL[module.DTYPE], f"packed layer output rel err {err:.2e} against per-sequence runs {where}"
    for n, p in layer.named_parameters():
        if p.grad is None:
            assert n not in packed_grads, f"{n}: gradient in the packed run only {where}"
            continue
        e = reference.rel_err(packed_grads[n].double(), p.grad.double())
        assert e < GRAD_TOL[module.DTYPE], f"{n}: packed gradient rel err {e:.2e} against per-sequence runs {where}"
