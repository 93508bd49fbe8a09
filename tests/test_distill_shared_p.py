"""The attention backward's probabilities shared with the indexer distillation loss (docs/distill.md, "Sharing the
attention backward's probabilities"): `dsa_attention(..., distill_p=buf)` fills buf in the backward with the
target p (the mean over each kv group's heads of the attention softmax at every selected slot, 0 at padding
slots) in every form of the scatter backward and in the deterministic one, and `distill_loss(..., p_main=buf)`
equals `distill_loss(..., lse_main=lse)` without reading the main attention's q and k. Small GQA DSA spec
(specs/dsa_small.yaml: 8 query heads, 2 kv groups of 4, top-k 16) under the interpreter, fresh random inputs,
float64 reference; on a GPU machine the same cases run on CUDA (`testing.test_device()`)."""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.compile.plan import MIN_DOT
from specgen.model.spec import load_spec

SPEC = load_spec("specs/dsa_small.yaml")
IDX = ("q_idx", "k_idx", "w_idx")
B, T = 2, 21          # rows t < 15 have padding slots (top-k 16); later rows a full list
P_TOL = 1e-5          # p is fp32 softmax of fp16 inputs: the float64 reference's within fp32 rounding
SAME = 1e-5           # the two paths of the loss sum the same terms (fp32 rounding)
DEV = testing.test_device()   # "cpu" under the interpreter, "cuda" on a GPU machine


@pytest.fixture(scope="module")
def mod():
    return specgen.load(SPEC)


def _leaves(x):
    return {n: v.detach().clone().requires_grad_(n in ("q", "k", "v")) for n, v in x.items()}


def _poisoned(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEV)


def _reference_p(case, idx, q="q", k="k"):
    """The float64 target at the slots of `idx` [B, T, HKV, top_k] (0 at padding), on the CPU."""
    # The reference on the inputs' device (idx there too), then both on the CPU for the comparison.
    target = R.distill.distill_target(SPEC, case.exact[q], case.exact[k], indices=idx).cpu()   # [B, T, HKV, T]
    idx = idx.cpu()
    return torch.where(idx >= 0, target.gather(-1, idx.long().clamp(min=0)), torch.zeros((), dtype=target.dtype))


def _rel(a, b):
    return R.rel_err(a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64))


def test_backward_emits_p_and_distill_from_p(mod):
    """The public path: p from the backward equals the float64 reference's and the distillation's fused forward's
    (STORE_P); the attention's gradients are the same with and without distill_p; distill_loss from p equals
    distill_loss from lse_main in value and gradients, in deterministic mode too."""
    case = testing.random_case(mod, SPEC, B, T, DEV, None, "distill_p")
    x = case.inputs
    dout = torch.randn(B, T, SPEC.heads.q, SPEC.head_dim.v, generator=case.gen).to(DEV, mod.DTYPE)
    p = _poisoned(B, T, SPEC.heads.kv, SPEC.selection.top_k)
    grads = []
    for buf in (p, None):
        leaves = _leaves(x)
        out, lse, idx = mod.dsa_attention(**leaves, return_lse=True, return_indices=True, distill_p=buf)
        out.backward(dout)
        grads.append([leaves[n].grad for n in ("q", "k", "v")])
    for n, a, b in zip(("q", "k", "v"), *grads):
        if a.is_cuda and n != "q":
            # dK/dV: the scatter path's fp32 atomics add in an order that differs from run to run on a GPU.
            assert R.rel_err(a, b) < testing.GRAD_TOL[a.dtype], f"distill_p changed d{n} {case.where}"
        else:
            assert torch.equal(a, b), f"distill_p changed the attention's d{n} {case.where}"
    assert (idx < 0).any() and torch.isfinite(p).all(), case.where
    assert bool((p[idx < 0] == 0).all()), f"padding slots not 0 {case.where}"
    assert _rel(p, _reference_p(case, idx)) < P_TOL, case.where
    lse_main = lse[..., 0].contiguous()
    _, _, _, p_sel = mod._distill_fwd(x["q"], x["k"], *(x[n] for n in IDX), idx, lse_main, None, 0)
    valid = (idx >= 0) & (idx.long() <= torch.arange(T, device=idx.device).view(1, T, 1, 1))
    assert _rel(p[valid], p_sel[valid]) < P_TOL, case.where

    for det in (False, True):
        results = []
        with testing.deterministic_algorithms(det):
            for kw in ({"lse_main": lse_main}, {"p_main": p}):
                trained = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
                loss = mod.distill_loss(x["q"], x["k"], **trained, indices=idx, stage="sparse", **kw)
                loss.backward()
                results.append((loss.detach(), [trained[n].grad for n in IDX]))
        (l0, g0), (l1, g1) = results
        assert _rel(l1, l0) < SAME, (det, l0.item(), l1.item(), case.where)
        for n, a, b in zip(IDX, g1, g0):
            assert _rel(a, b) < SAME, (det, n, _rel(a, b), case.where)


# Forms of the scatter backward (launch config selection_scatter) that compute P differently: several head chunks
# (gp 2 of the group's 4 heads: the chunks add their shares by atomics), row-major with and without the split sum,
# key-major with Q and dO reloaded, the split form (P from its dK/dV kernel over the whole group).
FORMS = {
    "rows_gp2": {"key_major": 0, "key_split": 0, "gp": 2},
    "rows_split_pf_gp2": {"key_major": 0, "key_split": 1, "prefetch": 1, "gp": 2},
    "km_reload_gp2": {"key_major": 1, "key_split": 0, "reload": 1, "gp": 2},
    "split_once": {"key_major": 1, "key_split": 1, "gp": 2, "dkdv_once": 1, "dkdv_block_n": 16, "dkdv_warps": 4,
                   "dkdv_stages": 1},
}


def on_device(cfg: dict) -> dict:
    """A FORMS entry as the test device runs it. The scatter kernel's dK/dV products (dS^T Q, P^T dO) reduce over
    its program's gp head rows, and tl.dot compiled for a GPU refuses a reduced dimension below 16 (MIN_DOT;
    Triton's NVIDIA backend, min_dot_size: "Input shapes should have ... K >= 16"; the H100 run failed there at
    gp 2); the interpreter has no minimum, and the plan never picks fewer rows (loop_order.scatter_rows: the
    group padded to 16). So on a GPU the forms whose scatter kernel adds dK/dV run at 16 head rows, the fewest it
    takes: each form's own P (row-major, split with prefetch, key-major reloading Q and dO), in one head chunk;
    the chunks' shares of P (gp 2) are the CPU run's to check. The split form keeps gp 2 there: its scatter
    kernel computes dQ only (products over the keys and head dims), its dK/dV kernel takes 16 rows."""
    if DEV == "cpu" or cfg.get("dkdv_once") or cfg["gp"] >= MIN_DOT:
        return cfg
    return {**cfg, "gp": MIN_DOT}


def test_every_scatter_form_and_the_deterministic_path_emit_p(mod, monkeypatch):
    case = testing.random_case(mod, SPEC, B, T, DEV, None, "forms")
    x = case.inputs
    state = mod._forward(*(x[n] for n in ("q", "k", "v") + IDX), save_branch_outputs=True)
    dout = torch.randn(B, T, SPEC.heads.q, SPEC.head_dim.v, generator=case.gen).to(DEV, mod.DTYPE)
    want = _reference_p(case, state.indices)
    empty = x["q"].new_empty((0,))
    base = dict(mod.CONFIGS["default"]["selection_scatter"], block_n=16)
    runs = []
    for name, cfg in FORMS.items():
        run = on_device(cfg)
        runs.append((name if run is cfg else f"{name} at gp {run['gp']}", dict(base, **run), False))
    runs.append(("deterministic", base, True))
    for name, cfg, det in runs:
        monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter", cfg)
        p = _poisoned(*state.indices.shape)
        with testing.deterministic_algorithms(det):
            mod._backward(dout, x["q"], x["k"], x["v"], state.lse, state.indices, state.branch_out, empty, empty,
                          distill_p=p)
        assert torch.isfinite(p).all() and bool((p[state.indices < 0] == 0).all()), (name, case.where)
        assert _rel(p, want) < P_TOL, (name, _rel(p, want), case.where)


def test_packed_call(mod):
    """A packed batch (native varlen): distill_p [total, HKV, top_k] against each sequence's reference, and the
    packed distill_loss from it equal to the one from lse_main."""
    lengths = [17, 9]
    cu = torch.tensor([0, 17, 26], dtype=torch.int32, device=DEV)
    total = sum(lengths)
    case = testing.random_case(mod, SPEC, 1, total, DEV, None, "packed")
    x = {n: v[0] for n, v in case.inputs.items()}
    leaves = _leaves(x)
    p = _poisoned(total, SPEC.heads.kv, SPEC.selection.top_k)
    out, lse, idx = mod.dsa_attention(**leaves, return_lse=True, return_indices=True, cu_seqlens=cu,
                                      max_seqlen=max(lengths), distill_p=p)
    out.backward(torch.randn(out.shape, generator=case.gen).to(DEV, out.dtype))
    assert torch.isfinite(p).all(), case.where
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        # The reference on the inputs' device (the indices there too), then on the CPU for the comparison.
        sub = R.distill.distill_target(SPEC, case.exact["q"][:, a:b], case.exact["k"][:, a:b],
                                       indices=idx[None, a:b]).cpu()
        i = idx[None, a:b].cpu()
        want = torch.where(i >= 0, sub.gather(-1, i.long().clamp(min=0)), torch.zeros((), dtype=sub.dtype))
        assert _rel(p[a:b], want[0]) < P_TOL, (s, case.where)
    losses = []
    for kw in ({"lse_main": lse[..., 0].contiguous()}, {"p_main": p}):
        trained = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
        loss = mod.distill_loss(x["q"], x["k"], **trained, indices=idx, cu_seqlens=cu, max_seqlen=max(lengths), **kw)
        loss.backward()
        losses.append((loss.detach(), [trained[n].grad for n in IDX]))
    assert _rel(losses[1][0], losses[0][0]) < SAME, case.where
    for a, b in zip(losses[1][1], losses[0][1]):
        assert _rel(a, b) < SAME, case.where


def test_argument_errors(mod, monkeypatch):
    x = testing.random_case(mod, SPEC, 1, 5, DEV, 3).inputs
    good = (1, 5, SPEC.heads.kv, SPEC.selection.top_k)
    leaves = _leaves(x)
    bad = {"shape": torch.empty(1, 5, SPEC.heads.kv, 8, device=DEV),
           "dtype": torch.empty(good, dtype=torch.float16, device=DEV),
           "contiguity": torch.empty(good[::-1], device=DEV).permute(3, 2, 1, 0)}
    for what, p in bad.items():
        with pytest.raises(runtime.ArgumentError, match="`distill_p` must be"):
            mod.dsa_attention(**leaves, distill_p=p)
    with torch.no_grad(), pytest.raises(runtime.ArgumentError, match="computes no gradient"):
        mod.dsa_attention(**leaves, distill_p=torch.empty(good, device=DEV))
    with pytest.raises(runtime.ArgumentError, match="computes no gradient"):
        mod.dsa_attention(**x, distill_p=torch.empty(good, device=DEV))          # no input requires grad
    # A spec whose backward cannot emit p: block selection (no scatter path), NSA (no distillation loss).
    block = specgen.load(load_spec("specs/dsa_block.yaml"))
    xb = testing.random_case(block, testing.spec_of(block), 1, 5, DEV, 3).inputs
    args = tuple(_leaves(xb)[a.name] for a in block._DESC.args)
    with pytest.raises(runtime.ArgumentError, match="scatter path"):
        block._ATTENTION.attention(args, distill_p=torch.empty(1, 5, block._DESC.heads_kv, block._DESC.top_k,
                                                               device=DEV))
    with pytest.raises(TypeError, match="distill_p"):
        block.dsa_attention(**xb, distill_p=None)
    # distill_loss(p_main=...): the sparse stage's, on given indices, fp32 in their layout.
    idx = mod.dsa_forward(**x, return_indices=True)[1]
    q, k, qi, ki, wi = (x[n] for n in ("q", "k") + IDX)
    with pytest.raises(runtime.ArgumentError, match="`p_main` is the sparse stage's"):
        mod.distill_loss(q, k, qi, ki, wi, p_main=torch.zeros(good, device=DEV))
    with pytest.raises(runtime.ArgumentError, match="p_main"):
        mod.distill_loss(q, k, qi, ki, wi, indices=idx, p_main=torch.zeros(1, 5, SPEC.heads.kv, 8, device=DEV))
    with pytest.raises(runtime.ArgumentError, match="p_main"):
        mod.distill_loss(q, k, qi, ki, wi, indices=idx, p_main=torch.zeros(good, dtype=torch.float16, device=DEV))


def test_distill_p_under_torch_compile(mod):
    """Under torch.compile the custom ops carry distill_p (the backward op's mutated argument): one graph, and the
    backward fills p as the eager call does."""
    case = testing.random_case(mod, SPEC, 1, 9, DEV, None, "distill_p_compile")
    x = case.inputs
    dout = torch.randn(1, 9, SPEC.heads.q, SPEC.head_dim.v, generator=case.gen).to(DEV, mod.DTYPE)
    idx = mod.dsa_forward(**x, return_indices=True)[1]

    def step(leaves, p):
        out = mod.dsa_attention(**leaves, indices=idx, distill_p=p)
        return (out.float() * dout.float()).sum()

    ps = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        p = _poisoned(1, 9, SPEC.heads.kv, SPEC.selection.top_k)
        run(_leaves(x), p).backward()
        ps.append(p)
    assert torch.isfinite(ps[1]).all() and _rel(ps[1], ps[0]) < SAME
