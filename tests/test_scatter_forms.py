"""The scatter backward's forms (`tuning.scatter_variants`: the kernel's KEY_MAJOR, KEY_SPLIT, PREFETCH and GP;
docs/backward.md, "The scatter kernel's forms") under the interpreter, in fp32 (bf16 dots are wrong there): each
form's gradients against the float64 reference fed the kernel's selection, and against the former form's
("w8": row-major, no split, no prefetch, the plan's 32 head rows) within fp32 rounding (the forms differ in
summation order only), batched (B = 2) and packed (cu_seqlens), with a spy on the launches that the scatter kernel
ran with the form's constexprs and grid. Warps and stages do not change what the interpreter computes; every form
here runs 16 keys a trip, so a query's 24 selected keys take two trips (the prefetch carries units across them).

The spec is V3.2 in miniature with head dims whose parts exercise every branch of the split: 64 heads (two
programs of 32 rows, or four of 16 with `gp` 16), d_qk 112 = 64 + 32 + 16 parts, d_v 96 = K's first 64 + 32.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.compile.plan import make_plan
from specgen.compile.tuning import SCATTER_BACKWARD_DEFAULT, scatter_variants, split_form
from specgen.model.spec import load_spec, replace
from specgen.runtime import launches
from specgen.testing.varlen import PackedCase, check_backward_varlen

SPEC = replace(load_spec("specs/dsa_v32.yaml"), name="dsa_scatter_forms", dtype="fp32", max_seqlen=4096,
               **{"heads.q": 64, "head_dim.qk": 112, "head_dim.v": 96, "selection.top_k": 24, "indexer.heads": 2,
                  "indexer.head_dim": 32, "indexer.dtype": "bf16"})
KEYS = 16
# Forms that compute differently under the interpreter (one per product form, split, prefetch and row count).
FORMS = ("ks_k64", "km_ks_k64_pf", "r16_w4_pf_s2")
# The forms sum in other orders (products split in parts, fp32 atomics in other orders): fp32 rounding.
SAME = 1e-5
META = {"key_major": "KEY_MAJOR", "key_split": "KEY_SPLIT", "prefetch": "PREFETCH", "gp": "GP", "block_n": "BLOCK_N",
        "reload": "RELOAD", "chunk_inner": "CHUNK_INNER"}
# The forms with fewer atomic adds per selected (query, key) (docs/backward.md, "Fewer atomics"): 64 head rows with
# Q and dO reloaded in every trip (one program a query at this spec's 64 heads, where km_ks_k64 runs two), and the
# split form (dQ by the scatter kernel without dK/dV, dK/dV by one program a query over all its heads).
FEWER = ("r64_rl_w16", "split_k64")


def _forms(names=("w8",) + FORMS):
    variants = scatter_variants(make_plan(SPEC))
    out = {name: {**variants[name], "block_n": KEYS} for name in names}
    for cfg in out.values():
        if split_form(cfg):
            cfg["dkdv_block_n"] = KEYS
    return out


class _Spy:
    """Records each launch of the scatter kernel (and of the split forms' dK/dV kernel): meta-parameters and grid."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.once = []
        real = runtime.launch_with

        def launch_with(kernel, grid, args, meta, cfg):
            if kernel.fn.__name__ == "_selection_bwd_scatter_kernel":
                self.calls.append(({**{v: cfg[k] for k, v in META.items() if k in cfg}}, tuple(grid), meta))
            elif kernel.fn.__name__ == "_selection_bwd_scatter_dkdv_kernel":
                self.once.append((dict(cfg), tuple(grid), meta))
            return real(kernel, grid, args, meta, cfg)

        monkeypatch.setattr(runtime, "launch_with", launch_with)
        monkeypatch.setattr(launches, "launch_with", launch_with)

    def check(self, cfg: dict, programs: int, varlen: bool) -> None:
        """One scatter launch in `cfg`'s form on `programs` programs a query; for a split form, without dK/dV and
        followed by one dK/dV launch of one program a query and kv head, in the form's dK/dV tile."""
        assert len(self.calls) == 1, f"{len(self.calls)} scatter launches"
        got, grid, meta = self.calls.pop()
        assert got == {v: cfg[k] for k, v in META.items() if k in cfg}, (got, cfg)
        chunks = SPEC.heads.q // cfg["gp"]
        if cfg.get("chunk_inner"):  # a query's chunks side by side on axis 0
            assert grid[1] * chunks == programs and grid[0] % chunks == 0 and meta["VARLEN"] == varlen, (grid, meta)
        else:
            assert grid[1] == programs and meta["VARLEN"] == varlen, (grid, meta)
        assert meta.get("DKDV", 1) == (0 if split_form(cfg) else 1), meta
        assert len(self.once) == (1 if split_form(cfg) else 0), f"{len(self.once)} dK/dV launches"
        if self.once:
            once, once_grid, once_meta = self.once.pop()
            assert once == {"block_n": cfg["dkdv_block_n"], "num_warps": cfg["dkdv_warps"],
                            "num_stages": cfg["dkdv_stages"]}, once
            assert once_grid == (grid[0], grid[1] // (SPEC.heads.q // cfg["gp"])), (once_grid, grid)
            assert once_meta["VARLEN"] == varlen


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return R.rel_err(a.detach().to(torch.float64), b.detach().to(torch.float64))


def test_forms_are_candidates_and_default():
    plan = make_plan(load_spec("specs/dsa_v32.yaml"))
    variants = scatter_variants(plan)
    assert plan.tuning.defaults["selection_scatter"] == variants[SCATTER_BACKWARD_DEFAULT]
    assert all(v in plan.tuning.candidates["selection_scatter"] for v in variants.values()
               if not split_form(v) and not v.get("chunk_inner"))
    assert not any(c.get("chunk_inner") for c in plan.tuning.candidates["selection_scatter"])  # by name only
    assert not any(split_form(c) for c in plan.tuning.candidates["selection_scatter"])
    assert {"r64_rl_w16", "split_k64", "split_k128"} <= set(variants)
    mod = specgen.load(load_spec("specs/dsa_v32.yaml"))
    assert mod.CONFIGS["default"]["selection_scatter"] == variants[SCATTER_BACKWARD_DEFAULT]


def _batched_forms(monkeypatch, names, base):
    """B = 2, T = 24: one forward, then the backward in each form of `names`: each against the float64 reference,
    and each but `base` against `base`'s gradients within fp32 rounding. Returns {name: (dq, dk)}."""
    mod = specgen.load(SPEC)
    assert testing.scatters(mod)
    device = testing.test_device()
    case = testing.random_case(mod, SPEC, 2, 24, device, None)
    x = case.inputs
    dout = torch.randn(2, 24, SPEC.heads.q, SPEC.head_dim.v, generator=case.gen, dtype=torch.float64).to(device)
    state = mod._forward(x["q"], x["k"], x["q_idx"], x["k_idx"], x["w_idx"], save_branch_outputs=True)
    assert (state.indices == -1).any() and (state.indices >= 0).sum(-1).max() > KEYS  # -1 slots; two trips
    _, want = testing.reference_gradients(SPEC, case.exact, state.indices, dout)
    empty = x["q"].new_empty((0,))
    spy = _Spy(monkeypatch)
    grads = {}
    for name, cfg in _forms(names).items():
        monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", cfg)
        dq, dk = mod._backward(dout.to(device, mod.DTYPE), x["q"], x["k"], state.lse, state.indices,
                               state.branch_out, empty, empty)
        spy.check(cfg, 2 * SPEC.heads.q // cfg["gp"], False)
        grads[name] = (dq, dk)
        for n, got in zip(("q", "k"), (dq, dk)):
            assert torch.isfinite(got).all(), f"{name}: d{n} not finite {case.where}"
            err = _rel(got, want[n])
            assert err < testing.GRAD_TOL[torch.float32], f"{name}: d{n} rel err {err:.2e} {case.where}"
    for name in names:
        if name == base:
            continue
        for n, a, b in zip(("q", "k"), grads[name], grads[base]):
            err = _rel(a, b)
            print(f"{name} vs {base}: d{n} rel err {err:.1e}")
            assert err < SAME, f"{name} vs {base}: d{n} rel err {err:.2e} {case.where}"
    return grads


def test_forms_batched(monkeypatch):
    """Every form against the reference and against the former default (w8)."""
    _batched_forms(monkeypatch, tuple(_forms()), "w8")


def test_fewer_atomics_forms(monkeypatch):
    """The forms that add each (query, key) fewer times, against the float64 reference and against km_ks_k64 (the
    default) within fp32 rounding; the split form's dQ (the scatter kernel's without its dK/dV) equal to
    km_ks_k64's bit for bit."""
    grads = _batched_forms(monkeypatch, ("km_ks_k64",) + FEWER, "km_ks_k64")
    assert torch.equal(grads["split_k64"][0], grads["km_ks_k64"][0]), "the split form's dQ is km_ks_k64's"


def test_chunks_side_by_side(monkeypatch):
    """km_ks_k64_ci (launch config `chunk_inner` 1: a query's head chunks neighbours on axis 0 of the grid) and
    km_ks_k64_cr (2: also each chunk's walk of the keys starting at its own part of them, wrapping around) against
    the float64 reference and km_ks_k64 within fp32 rounding (ci: the same programs in another launch order, dQ
    bit for bit; cr: dQ summed in the rotated order), batched, and cr packed (check_backward_varlen: the tile
    table's programs x chunks; the keys of the early rows span one or two trips)."""
    grads = _batched_forms(monkeypatch, ("km_ks_k64", "km_ks_k64_ci", "km_ks_k64_cr"), "km_ks_k64")
    assert torch.equal(grads["km_ks_k64_ci"][0], grads["km_ks_k64"][0]), "side by side: dQ the same sums"
    mod = specgen.load(SPEC)
    cfg = _forms(("km_ks_k64_cr",))["km_ks_k64_cr"]
    spy = _Spy(monkeypatch)
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", cfg)
    check_backward_varlen(mod, SPEC, [18, 9], seed=testing.fresh_seed())
    spy.check(cfg, SPEC.heads.q // cfg["gp"], True)
    # The rotated walk with the next trip's units prefetched (the wrap carried into the prefetch's addresses).
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", {**cfg, "prefetch": 1})
    testing.check_backward(mod, SPEC, 1, 40)


def test_forms_packed(monkeypatch, form="km_ks_k64_pf"):
    """A packed batch (two sequences): the form against the per-sequence reference, and equal to the former
    form's packed gradients within fp32 rounding."""
    mod = specgen.load(SPEC)
    forms = _forms()
    seed = testing.fresh_seed()
    lengths = [18, 9]
    spy = _Spy(monkeypatch)
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", forms[form])
    check_backward_varlen(mod, SPEC, lengths, seed=seed)
    spy.check(forms[form], SPEC.heads.q // forms[form]["gp"], True)  # grid: (query tiles, kv heads x chunks)

    case = PackedCase(mod, SPEC, lengths, None, seed, "forms")
    dout = torch.randn(case.total, SPEC.heads.q, SPEC.head_dim.v, generator=case.gen).to(case.device, mod.DTYPE)
    grads = {}
    for name in ("w8", form):
        monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", forms[name])
        leaves = {n: v.detach().clone().requires_grad_(n in ("q", "k")) for n, v in case.inputs.items()}
        out = mod.dsa_attention(**leaves, **case.varlen())
        out.backward(dout)
        spy.check(forms[name], SPEC.heads.q // forms[name]["gp"], True)
        grads[name] = (leaves["q"].grad, leaves["k"].grad)
    for n, a, b in zip(("q", "k"), grads[form], grads["w8"]):
        err = _rel(a, b)
        print(f"{form} vs w8 (packed): d{n} rel err {err:.1e}")
        assert err < SAME, f"{form} vs w8 (packed): d{n} rel err {err:.2e} {case.where}"


@pytest.mark.parametrize("form", FEWER)
def test_fewer_atomics_forms_packed(monkeypatch, form):
    """A packed batch: the form against the per-sequence reference (check_backward_varlen)."""
    mod = specgen.load(SPEC)
    cfg = _forms((form,))[form]
    spy = _Spy(monkeypatch)
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", cfg)
    check_backward_varlen(mod, SPEC, [18, 9], seed=testing.fresh_seed())
    spy.check(cfg, SPEC.heads.q // cfg["gp"], True)
