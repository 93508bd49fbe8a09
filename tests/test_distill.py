"""The indexer distillation loss (docs/distill.md): the float64 reference against naive formulas, and the generated
Triton kernels (forward and backward, dense and sparse stage) against the reference under the CPU interpreter; on a
GPU machine the kernel tests run on CUDA (`testing.test_device()`), the reference-only ones stay on the CPU."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import specgen.reference as R
from specgen import runtime, testing
from specgen.compile.footprint import SMEM_LIMIT
from specgen.compile.plan import dense_pieces
from specgen.compile.render import render_distill_module
from specgen.compile.render_distill import dense_qreg_footprints, dot_shapes, make_distill_plan
from specgen.model.spec import load_spec, spec_from_mapping
from specgen.testing.varlen import AllocationWatch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IDX_INPUTS = ("q_idx", "k_idx", "w_idx")
INPUTS = ("q", "k") + IDX_INPUTS
DEV = testing.test_device()   # where the kernels run: "cpu" under the interpreter, "cuda" on a GPU machine


def dsa_spec(name, hq, hkv, qk, idx_heads, idx_dim, top_k, dtype="fp32", **extra):
    data = {"name": name, "family": "dsa", "heads": {"q": hq, "kv": hkv}, "head_dim": {"qk": qk, "v": 16},
            "dtype": dtype, "selection": {"top_k": top_k}, "indexer": {"heads": idx_heads, "head_dim": idx_dim},
            "max_seqlen": 4096, **extra}
    if hkv > 1:
        data.update(mla=False)
    return spec_from_mapping(data)


# GQA with a split head dim (48 = 32 + 16) and a padded indexer head count (3 -> 4).
GQA = dict(hq=4, hkv=2, qk=48, idx_heads=3, idx_dim=16, top_k=8)
# MQA (MLA-style: V is part of K) with wider indexer heads.
MQA = dict(hq=4, hkv=1, qk=32, idx_heads=2, idx_dim=32, top_k=8)
# A group of 3 query heads (padded to 4), top_k not a power of two.
GROUP3 = dict(hq=6, hkv=2, qk=16, idx_heads=4, idx_dim=16, top_k=5)
# Enough selected tokens that the sparse kernels take several trips with the small tiles below.
WIDE_K = dict(hq=4, hkv=2, qk=32, idx_heads=2, idx_dim=16, top_k=24)
# V3.2's layout in small: MQA with a split head dim (80 = 64 + 16), one query position per dense program in the
# dense forward's form tests (16 heads: 16 rows).
MLA_SPLIT = dict(hq=16, hkv=1, qk=80, idx_heads=16, idx_dim=16, top_k=8)
SHAPES = {"gqa": GQA, "mqa": MQA, "group3": GROUP3, "wide_k": WIDE_K, "mla_split": MLA_SPLIT}


def spec_of(shape: str, dtype: str = "fp32"):
    return dsa_spec(f"distill_{shape}", dtype=dtype, **SHAPES[shape])


def inputs(spec, B, T, seed=0, dtype=torch.float64, device="cpu"):
    """Drawn on the CPU (the same values on every machine), then moved: kernel tests pass device=DEV."""
    x = R.make_inputs(spec, B, T, generator=torch.Generator().manual_seed(seed))
    return {n: x[n].to(device=device, dtype=dtype) for n in INPUTS}


def selection(spec, x, empty_rows=()):
    """Top-k indices of the reference index scores, with the rows in `empty_rows` ((b, t, g)) made all padding."""
    I = R.indexer_scores(spec, *(x[n].double() for n in IDX_INPUTS))
    indices = R.select_tokens(spec, I)
    for b, t, g in empty_rows:
        indices[b, t, g] = -1
    return indices


# ---------------------------------------------------------------------------------------------------------------
# The reference against naive formulas
# ---------------------------------------------------------------------------------------------------------------

def naive_loss(spec, x, indices=None):
    """Loops over (b, t, g): each head's softmax over the support by hand, their mean, I by explicit sums, and
    KL by torch.nn.functional.kl_div; mean over the rows whose support is not empty."""
    q, k, q_idx, k_idx, w_idx = (x[n] for n in INPUTS)
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    G, H_I, d_I = Hq // Hkv, spec.indexer.heads, spec.indexer.head_dim
    c = d_I ** -0.5 * H_I ** -0.5
    total, n_valid = 0.0, 0
    for b in range(B):
        for t in range(T):
            for g in range(Hkv):
                if indices is None:
                    support = list(range(t + 1))
                else:
                    support = sorted(int(s) for s in indices[b, t, g] if 0 <= int(s) <= t)
                if not support:
                    continue
                n_valid += 1
                p = 0.0
                for h in range(g * G, (g + 1) * G):
                    logits = torch.stack([q[b, t, h].detach() @ k[b, s, g].detach() for s in support])
                    logits = logits * spec.softmax_scale
                    e = torch.exp(logits - logits.max())
                    p = p + e / e.sum() / G
                scores = []
                for s in support:
                    score = 0.0
                    for j in range(H_I):
                        col = g * H_I + j
                        score = score + w_idx[b, t, col] * torch.relu(q_idx[b, t, col] @ k_idx[b, s, g])
                    scores.append(c * score)
                log_q = torch.log_softmax(torch.stack(scores), dim=0)
                total = total + F.kl_div(log_q, p, reduction="sum")
    return total / max(n_valid, 1)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
@pytest.mark.parametrize("shape", ["gqa", "mqa", "group3"])
def test_reference_matches_naive_loops(shape, stage):
    spec = spec_of(shape)
    T = 11
    x = inputs(spec, 2, T, seed=3)
    indices = selection(spec, x, empty_rows=[(0, 6, 0), (1, 10, spec.heads.kv - 1)]) if stage == "sparse" else None
    a = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    b = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.distill_loss(spec, **a, indices=indices)
    naive = naive_loss(spec, b, indices)
    assert abs(ref.item() - naive.item()) <= 1e-12 * max(1.0, abs(naive.item()))
    ref.backward()
    naive.backward()
    for n in IDX_INPUTS:
        assert R.rel_err(a[n].grad, b[n].grad) < 1e-10, n


def test_reference_gradient_is_softmax_minus_target():
    """dL/dI = (softmax_S(I) - p) / N_valid, pushed through I = c sum_j w relu(q_I . k_I) by hand."""
    spec = spec_of("gqa")
    B, T = 2, 9
    x = inputs(spec, B, T, seed=5)
    indices = selection(spec, x, empty_rows=[(1, 4, 1)])
    a = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    R.distill_loss(spec, **a, indices=indices).backward()

    Hkv, H_I = spec.heads.kv, spec.indexer.heads
    c = R.indexer_scale(spec)
    p = R.distill_target(spec, x["q"], x["k"], indices=indices)                       # [B, T, Hkv, T]
    support = p > 0
    I = R.indexer_scores(spec, *(x[n] for n in IDX_INPUTS)).masked_fill(~support, -math.inf)
    valid = support.any(-1)
    soft = torch.where(valid[..., None], torch.softmax(torch.where(valid[..., None], I, 0.0), -1), 0.0)
    dI = (soft - p) / valid.sum()                                                      # [B, T, Hkv, S]
    qi = x["q_idx"].reshape(B, T, Hkv, H_I, -1)
    dots = torch.einsum("btgjd,bsgd->btgjs", qi, x["k_idx"])
    w = x["w_idx"].reshape(B, T, Hkv, H_I)
    dw = c * torch.einsum("btgs,btgjs->btgj", dI, dots.clamp(min=0))
    gated = dI[:, :, :, None, :] * (dots > 0) * w[..., None]                          # [B, T, Hkv, H_I, S]
    dq = c * torch.einsum("btgjs,bsgd->btgjd", gated, x["k_idx"])
    dk = c * torch.einsum("btgjs,btgjd->bsgd", gated, qi)
    assert R.rel_err(a["w_idx"].grad, dw.reshape(B, T, -1)) < 1e-10
    assert R.rel_err(a["q_idx"].grad, dq.reshape(B, T, Hkv * H_I, -1)) < 1e-10
    assert R.rel_err(a["k_idx"].grad, dk) < 1e-10


def test_reference_dense_kl_div_whole_rows():
    """The dense stage as one kl_div over [B, T, Hkv, T] rows (p = 0 off the causal support)."""
    spec = spec_of("mqa")
    x = inputs(spec, 2, 7, seed=1)
    p = R.distill_target(spec, x["q"], x["k"])
    I = R.indexer_scores(spec, *(x[n] for n in IDX_INPUTS))                           # -inf for s > t
    log_q = torch.log_softmax(I, -1).clamp(min=-1e30)                                  # kl_div wants finite inputs
    expected = F.kl_div(log_q, p, reduction="sum") / (2 * 7 * spec.heads.kv)
    assert torch.allclose(R.distill_loss(spec, **x), expected, rtol=1e-12, atol=0)
    kl, valid = R.distill_row_kl(spec, **x)
    assert bool(valid.all())
    assert torch.allclose(kl.mean(), expected, rtol=1e-12, atol=0)


def test_reference_chunks_detaches_and_empty():
    spec = spec_of("gqa")
    x = inputs(spec, 1, 13, seed=2)
    indices = selection(spec, x)
    a = {n: v.clone().requires_grad_(True) for n, v in x.items()}                     # q, k too: must stay None
    b = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    whole = R.distill_loss(spec, **a, indices=indices)
    chunked = R.distill_loss(spec, **b, indices=indices, query_chunk=4)
    assert torch.allclose(whole, chunked, rtol=1e-13, atol=0)
    whole.backward()
    chunked.backward()
    assert a["q"].grad is None and a["k"].grad is None
    for n in IDX_INPUTS:
        assert R.rel_err(b[n].grad, a[n].grad) < 1e-12
    # Every row empty: loss 0, gradients 0, no NaN.
    c = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    empty = R.distill_loss(spec, **c, indices=torch.full_like(indices, -1))
    empty.backward()
    assert empty.item() == 0.0
    assert all(bool((c[n].grad == 0).all()) for n in IDX_INPUTS)


def test_reference_sparse_with_every_token_selected_is_dense():
    spec = dsa_spec("distill_all", 4, 2, 32, 2, 16, top_k=16)
    x = inputs(spec, 1, 12, seed=4)
    indices = selection(spec, x)                                                       # k >= T: all of s <= t
    assert torch.allclose(R.distill_loss(spec, **x, indices=indices), R.distill_loss(spec, **x), rtol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

_modules: dict = {}


def import_module(spec, tmp_path_factory, distill_plan=None):
    """A fresh module object of the distillation section rendered for `spec` (and `distill_plan`)."""
    src = render_distill_module(spec, distill_plan)
    path = tmp_path_factory.mktemp("distill") / f"{spec.name}.py"
    path.write_text(src)
    name = f"specgen_distill_test.{path.parent.name}_{spec.name}_{spec.hash}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def kernel_module(spec, tmp_path_factory, distill_plan=None):
    key = (spec.name, spec.hash, distill_plan)
    if key not in _modules:
        _modules[key] = import_module(spec, tmp_path_factory, distill_plan)
    return _modules[key]


def small_tiles(spec):
    """Tiles small enough that T <= 64 takes several key trips, query tiles and pair trips (rows stay >= 16)."""
    d = make_distill_plan(spec)
    return dataclasses.replace(d, bt=max(8, 16 // min(d.gp, d.hp)), bs=16, bk=16, sbs=16, sbk=16,
                               pairs=max(1, 16 // d.hp), fused_bs=16, bwd_bs=16)


TOL = {"fp32": (2e-5, 2e-5), "fp16": (1e-4, 3e-3), "bf16": (1e-4, 1.5e-2)}   # (loss, gradients) relative

# (shape, dtype, stage, B, T, lse_main given, small tiles, rows made empty)
CASES = [
    ("gqa", "fp32", "dense", 2, 37, False, False, ()),
    ("gqa", "fp32", "dense", 1, 1, True, False, ()),
    ("gqa", "fp32", "dense", 1, 65, True, False, ()),                # key 64 in a second tile (last t_hi = 64)
    ("mqa", "fp16", "dense", 2, 23, True, False, ()),
    ("mqa", "fp16", "dense", 1, 64, False, False, ()),
    ("group3", "fp32", "dense", 1, 19, False, False, ()),
    ("gqa", "bf16", "dense", 1, 21, False, False, ()),
    ("wide_k", "fp32", "dense", 1, 49, False, True, ()),             # several trips everywhere, last t_hi = 48
    ("gqa", "fp32", "sparse", 2, 21, False, False, ((0, 5, 1), (1, 20, 0), (1, 0, 1))),
    ("gqa", "fp32", "sparse", 1, 13, True, False, ((0, 12, 0),)),
    ("mqa", "fp16", "sparse", 1, 29, True, False, ((0, 9, 0),)),
    ("group3", "fp16", "sparse", 1, 17, False, False, ((0, 3, 1),)),
    ("gqa", "bf16", "sparse", 1, 11, False, False, ((0, 7, 0),)),
    ("wide_k", "fp32", "sparse", 1, 41, True, True, ((0, 30, 1), (0, 2, 0))),
    # Head chunks (what wide heads get): the group's 3 heads (padded to 4) by 2 per trip of the inner loop.
    ("group3", "fp32", "dense", 2, 33, False, "chunks", ()),
    ("group3", "fp16", "dense", 1, 20, True, "chunks", ()),
    ("group3", "fp32", "sparse", 1, 23, False, "chunks", ((0, 4, 1),)),
]


def chunked_tiles(spec):
    """Small tiles with the main heads split into two chunks per program (the wide-head path)."""
    d = small_tiles(spec)
    return dataclasses.replace(d, head_chunks=2, num_stages=1)


def _case_id(case):
    shape, dtype, stage, B, T, given, small, empty = case
    return (f"{stage}-{shape}-{dtype}-B{B}-T{T}" + ("-lse" if given else "")
            + ("-chunks" if small == "chunks" else "-small" if small else ""))


@pytest.fixture
def path_of(request):
    """Sets the module's distillation path (a launch config) for one test, and restores it."""
    touched = []

    def set_path(module, path):
        touched.append((module, module._DISTILL_LAUNCHES.path))
        module._DISTILL_LAUNCHES.path = path
        return module
    yield set_path
    for module, path in reversed(touched):
        module._DISTILL_LAUNCHES.path = path


# The legacy path (head chunks, the inverse index) on the cases where it differs from the fused one: the sparse
# stage, and the dense stage with head chunks.
PATH_CASES = ([(c, "fused") for c in CASES]
              + [(c, "legacy") for c in CASES if c[2] == "sparse" or c[6] == "chunks"])


@pytest.mark.parametrize("case,path", PATH_CASES, ids=[f"{_case_id(c)}-{p}" for c, p in PATH_CASES])
def test_kernel_matches_reference(case, path, tmp_path_factory, path_of):
    shape, dtype, stage, B, T, given, small, empty = case
    spec = spec_of(shape, dtype)
    tiles = chunked_tiles(spec) if small == "chunks" else small_tiles(spec) if small else None
    module = path_of(kernel_module(spec, tmp_path_factory, tiles), path)
    x = inputs(spec, B, T, seed=T, dtype=DTYPES[dtype], device=DEV)                    # rounded to the dtype
    indices = selection(spec, x, empty) if stage == "sparse" else None
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.distill_loss(spec, **x64, indices=indices)
    ref.backward()

    xk = {n: v.clone().requires_grad_(True) for n, v in x.items()}
    lse = R.main_lse(spec, x64["q"], x64["k"], indices=indices).float() if given else None
    loss = module.distill_loss(**xk, indices=indices, lse_main=lse, stage=stage)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    tol_loss, tol_grad = TOL[dtype]
    # Absolute slack: the row terms sum_S p (log p - I) and psum * lse(I) are O(1) each and cancel (exactly at T=1).
    assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6, (loss.item(), ref.item())
    assert xk["q"].grad is None and xk["k"].grad is None                              # the target is detached
    for n in IDX_INPUTS:
        assert xk[n].grad.dtype == x[n].dtype
        err = R.rel_err(xk[n].grad, x64[n].grad)
        assert err < tol_grad, f"d{n}: rel err {err:.3g}"


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_kernel_statistics_and_determinism(stage, tmp_path_factory):
    """The forward's per-row statistics (lse of I, the target's mass, the main lse it computed, the stored p of
    the fused path), and a backward run twice gives the same bits (the interpreter runs programs in order, so the
    fused sparse backward's atomics cannot race here; on a GPU they add dk_I in a varying order: within fp32
    rounding there; the GPU tests check its deterministic mode)."""
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    B, T = 1, 19
    x = inputs(spec, B, T, seed=7, dtype=torch.float32, device=DEV)
    indices = selection(spec, x, [(0, 8, 1)]) if stage == "sparse" else None
    loss, stats, lse_out, p_sel = module._distill_fwd(*(x[n] for n in INPUTS), indices, None, None, 0)
    x64 = {n: v.double() for n, v in x.items()}
    lse_ref = R.main_lse(spec, x64["q"], x64["k"], indices=indices)
    assert R.rel_err(lse_out, lse_ref) < 1e-6
    p = R.distill_target(spec, x64["q"], x64["k"], indices=indices)
    I = R.indexer_scores(spec, *(x64[n] for n in IDX_INPUTS)).masked_fill(p == 0, -math.inf)
    lse_i = torch.logsumexp(I, -1)
    assert R.rel_err(stats[..., 0], lse_i) < 1e-6
    valid = torch.isfinite(lse_i)
    if stage == "sparse":   # p of every valid selected slot, in the indices' layout
        assert p_sel.shape == indices.shape
        t = torch.arange(T, device=DEV).view(1, T, 1, 1)
        ok = (indices >= 0) & (indices.long() <= t)
        want = torch.gather(p, -1, indices.long().clamp(min=0))
        assert R.rel_err(p_sel[ok], want[ok]) < 1e-6
    else:
        assert p_sel.numel() == 0
    assert torch.allclose(stats[..., 1][valid], torch.ones(()), atol=1e-5)
    assert bool((stats[..., 1][~valid] == 0).all())
    grads = []
    for _ in range(2):
        xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
        module.distill_loss(**xk, indices=indices, stage=stage).backward()
        grads.append([xk[n].grad for n in IDX_INPUTS])
    for n, a, b in zip(IDX_INPUTS, *grads):
        if DEV != "cpu" and stage == "sparse" and n == "k_idx":
            # A GPU's fp32 atomics add dk_I in an order that differs from run to run: the same sums, rounded.
            assert R.rel_err(a, b) < 1e-5, n
        else:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("given", [False, True])
def test_fused_sparse_deterministic_mode(given, tmp_path_factory):
    """After the fused forward, torch.use_deterministic_algorithms runs the legacy backward (the query side and
    the inverse index, no atomics): the same gradients within rounding, and the float64 reference's. (The mode is
    read when the backward runs: one forward, its graph kept, backward in either mode.)"""
    spec = spec_of("wide_k")
    module = kernel_module(spec, tmp_path_factory, small_tiles(spec))
    assert module._DISTILL_LAUNCHES.path == "fused"
    x = inputs(spec, 2, 33, seed=5, dtype=torch.float32, device=DEV)
    indices = selection(spec, x, [(0, 20, 1)])
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    R.distill_loss(spec, **x64, indices=indices).backward()
    lse = R.main_lse(spec, x64["q"], x64["k"], indices=indices).float() if given else None
    grads = []
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    loss = module.distill_loss(**xk, indices=indices, lse_main=lse)
    for det in (False, True):
        for n in IDX_INPUTS:
            xk[n].grad = None
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det)
        try:
            loss.backward(retain_graph=not det)
        finally:
            torch.use_deterministic_algorithms(prev)
        grads.append([xk[n].grad for n in IDX_INPUTS])
        for n in IDX_INPUTS:
            assert R.rel_err(xk[n].grad, x64[n].grad) < 2e-5, (det, n)
    for a, b in zip(*grads):
        assert R.rel_err(a, b) < 1e-5


def test_launch_path_is_checked(tmp_path_factory):
    module = kernel_module(spec_of("gqa"), tmp_path_factory)
    with pytest.raises(runtime.ArgumentError, match="`path` must be one of"):
        module._DISTILL_LAUNCHES.path = "fast"


def test_kernel_every_row_empty_and_grad_scale(tmp_path_factory):
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    x = inputs(spec, 1, 6, seed=9, dtype=torch.float32, device=DEV)
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    indices = torch.full((1, 6, spec.heads.kv, spec.selection.top_k), -1, dtype=torch.int32, device=DEV)
    loss = module.distill_loss(**xk, indices=indices)
    loss.backward()
    assert loss.item() == 0.0
    assert all(bool((xk[n].grad == 0).all()) for n in IDX_INPUTS)
    # The incoming gradient scales the result (3 * L).
    a = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    b = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    module.distill_loss(**a).backward()
    (3 * module.distill_loss(**b)).backward()
    for n in IDX_INPUTS:
        if DEV != "cpu" and n == "k_idx":
            # (the spec's sparse stage: a GPU's fp32 atomics add dk_I in an order that differs from run to run)
            assert R.rel_err(b[n].grad, 3 * a[n].grad) < 1e-5, n
        else:
            assert torch.allclose(b[n].grad, 3 * a[n].grad, rtol=1e-6, atol=0)


def test_inverse_index_lists_every_pair(tmp_path_factory):
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    B, T, Hkv, K = 2, 9, spec.heads.kv, spec.selection.top_k
    indices = selection(spec, inputs(spec, B, T, seed=11), [(1, 3, 0)])
    indices[0, 2, 1, 1] = 5                                                            # s > t: not a pair
    ptr, pos = module._distill_inverse_index(indices)
    flat = indices.flatten()
    for b in range(B):
        for g in range(Hkv):
            for s in range(T):
                key = (b * Hkv + g) * T + s
                got = pos[ptr[key]:ptr[key + 1]].tolist()
                want = [((b * T + t) * Hkv + g) * K + j for t in range(T) for j in range(K)
                        if int(indices[b, t, g, j]) == s and s <= t]
                assert got == want                                                     # sorted by t: deterministic
                assert all(int(flat[e]) == s for e in got)


def test_modules_of_one_spec_keep_their_own_custom_ops(tmp_path_factory, monkeypatch):
    """Another module of the same spec with other tiles gets ops of its own, and a second module object with the same
    tiles reuses the registered ones, so no op name is registered twice. (Registered twice, torch destroys the first
    registration's library: the first module's ops then ran the last module's launches, through a freed operator
    entry, which failed a later call with `ValueError: vector::reserve` / `std::bad_alloc` in CI.)"""
    spec = spec_of("gqa")
    default = kernel_module(spec, tmp_path_factory)
    small = kernel_module(spec, tmp_path_factory, small_tiles(spec))
    again = import_module(spec, tmp_path_factory)
    assert default._DISTILL_NS != small._DISTILL_NS and again._DISTILL_NS == default._DISTILL_NS
    assert again._distill_fwd is default._distill_fwd and again._distill_bwd is default._distill_bwd
    assert small._distill_fwd is not default._distill_fwd
    calls = []
    for name, module in (("default", default), ("small", small)):
        launches = module._DISTILL_LAUNCHES
        monkeypatch.setattr(launches, "forward", lambda *a, _f=launches.forward, _n=name: calls.append(_n) or _f(*a))
    x = inputs(spec, 1, 19, seed=4, dtype=torch.float32, device=DEV)
    expected = R.distill_loss(spec, **{n: v.double() for n, v in x.items()})                     # dense
    for module, name in ((default, "default"), (small, "small"), (again, "default")):
        calls.clear()
        loss = module.distill_loss(**x, stage="dense")
        assert calls == [name]
        assert abs(loss.item() - expected.item()) <= 2e-5 * abs(expected.item())


def test_custom_op_registration_and_compile(tmp_path_factory):
    spec = spec_of("mqa", "fp16")
    module = kernel_module(spec, tmp_path_factory)
    x = inputs(spec, 1, 9, seed=12, dtype=torch.float16, device=DEV)
    args = [x[n].clone().requires_grad_(n in IDX_INPUTS) for n in INPUTS]
    indices = selection(spec, x)
    cu = torch.tensor([0, 6, 6, 9], dtype=torch.int32, device=DEV)  # a native packed batch of one [1, total, ...]
    for ind, varlen in ((None, (None, 0)), (indices, (None, 0)), (None, (cu, 6)), (indices, (cu, 6))):
        torch.library.opcheck(module._distill_fwd, (*args, ind, None, *varlen),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(module.distill_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(*args, indices=indices)
    loss.backward()
    eager = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    expected = module.distill_loss(*eager, indices=indices)
    expected.backward()
    assert torch.equal(loss, expected)
    for n, a, e in zip(INPUTS[2:], args[2:], eager[2:]):
        if DEV != "cpu" and n == "k_idx":
            # A GPU's fp32 atomics add dk_I in an order that differs from run to run: the same sums, an fp16
            # element may round to its neighbour.
            assert R.rel_err(a.grad, e.grad) < 1e-3, n
        else:
            assert torch.equal(a.grad, e.grad), n


# ---------------------------------------------------------------------------------------------------------------
# Packed (varlen) batches, run natively (docs/varlen.md)
# ---------------------------------------------------------------------------------------------------------------

# A long sequence over several query tiles (8 rows) and key tiles (16 keys) of the small tiles, and short ones:
# empty, one token, shorter than top_k (8), lengths that are multiples of no tile (a tile of the packed rows
# would straddle sequence boundaries); padded: 8 x 37 rows for 76 tokens.
PACKED_LENGTHS = [37, 0, 1, 5, 19, 0, 3, 11]


def packed_selection(spec, x, cu, empty_rows=()):
    """Each sequence's own top-k (indices relative to its start), packed; rows in `empty_rows` ((row, g)) none."""
    parts = []
    for i in range(cu.numel() - 1):
        a, b = int(cu[i]), int(cu[i + 1])
        if b > a:
            parts.append(selection(spec, {n: v[a:b][None] for n, v in x.items()})[0])
    indices = torch.cat(parts)
    for r, g in empty_rows:
        indices[r, g] = -1
    return indices


# (stage, dtype, lse_main given, rows made empty (sparse): the long sequence's row 20 and the 5-token one's last)
PACKED_CASES = [("dense", "fp32", False), ("sparse", "fp32", True), ("dense", "fp16", True), ("sparse", "fp16", False)]


@pytest.mark.parametrize("stage,dtype,given", PACKED_CASES, ids=["-".join(map(str, c)) for c in PACKED_CASES])
def test_kernel_packed_matches_reference_per_sequence(stage, dtype, given, tmp_path_factory, monkeypatch):
    """distill_loss(cu_seqlens=) runs natively: loss and dq_I, dk_I, dw_I equal the float64 reference run per
    sequence (N_valid over the whole batch, empty-support rows not counted), with `Packed.pad` trapped, every
    fresh buffer NaN and no buffer above a multiple of the packed tokens (which the padded q alone exceeds)."""
    from specgen import runtime

    spec = spec_of("gqa", dtype)
    module = kernel_module(spec, tmp_path_factory, small_tiles(spec))
    lengths = PACKED_LENGTHS
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    total, longest = offsets[-1], max(lengths)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    x = {n: v[0] for n, v in inputs(spec, 1, total, seed=seed, dtype=DTYPES[dtype], device=DEV).items()}
    indices = packed_selection(spec, x, cu, [(20, 1), (offsets[4] - 1, 0)]) if stage == "sparse" else None
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.varlen.distill_loss_varlen(spec, **x64, cu_seqlens=cu, indices=indices)
    ref.backward()
    lse = None
    if given:
        lse = torch.cat([R.main_lse(spec, x64["q"][a:b][None], x64["k"][a:b][None],
                                    indices=None if indices is None else indices[a:b][None])[0].float()
                         for a, b in zip(offsets, offsets[1:]) if b > a])

    def no_padding(*args, **kwargs):
        raise AssertionError("the native packed distillation loss padded its inputs")

    monkeypatch.setattr(runtime.Packed, "pad", no_padding)
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    watch = AllocationWatch()
    with watch:
        loss = module.distill_loss(**xk, indices=indices, lse_main=lse, stage=stage, cu_seqlens=cu,
                                   max_seqlen=longest)
        loss.backward()
    tol_loss, tol_grad = TOL[dtype]
    where = f"seed={seed}"
    assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6, (loss.item(), ref.item(), where)
    for n in IDX_INPUTS:
        assert xk[n].grad.shape == x[n].shape and bool(torch.isfinite(xk[n].grad).all()), (n, where)
        err = R.rel_err(xk[n].grad, x64[n].grad)
        assert err < tol_grad, f"d{n}: rel err {err:.3g} {where}"
    # Per token: the statistics and lse (fp32), dI of the selection (fp32) and its inverse index (int64 key and
    # position), the indexer gradients; the tile tables are (total / tile + N) x 2 int32.
    hkv, k = spec.heads.kv, spec.selection.top_k
    per_token = (8 * 2 * hkv * k + 4 * (hkv * (k + 3) + spec.heads.q) + 8 * hkv
                 + 4 * (x["q_idx"][0].numel() + x["k_idx"][0].numel() + x["w_idx"][0].numel()))
    bound = per_token * total + 8 * 2 * (total + len(lengths))
    padded_q = len(lengths) * longest * x["q"][0].numel() * x["q"].element_size()
    assert bound < padded_q, "the padded q alone must exceed the bound"
    assert watch.largest[0] <= bound, f"largest buffer {watch.largest} exceeds {bound} bytes"


def test_packed_inverse_index_per_sequence(tmp_path_factory):
    """The sparse stage's packed inverse index: key row r = bos + s of group g owns exactly the pairs (t, s) of its
    own sequence with s <= t, sorted by t."""
    from specgen.runtime import Packed

    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    lengths = [6, 0, 1, 4, 9]
    cu = torch.tensor([0, 6, 6, 7, 11, 20], dtype=torch.int32)
    total, Hkv, K = 20, spec.heads.kv, spec.selection.top_k
    x = {n: v[0] for n, v in inputs(spec, 1, total, seed=5).items()}
    indices = packed_selection(spec, x, cu)
    indices[3, 1, 0] = 3                                                               # s > t: not a pair
    layout = Packed(cu, max(lengths), total).layout()
    ptr, pos = module._distill_inverse_index(indices[None], layout)
    seq = torch.searchsorted(cu.long(), torch.arange(total), right=True) - 1
    for g in range(Hkv):
        for r in range(total):
            bos = int(cu[seq[r]])
            got = pos[ptr[g * total + r]:ptr[g * total + r + 1]].tolist()
            want = [(t * Hkv + g) * K + j for t in range(bos, int(cu[seq[r] + 1])) for j in range(K)
                    if int(indices[t, g, j]) == r - bos and r <= t]
            assert got == want


def test_argument_errors(tmp_path_factory):
    from specgen.runtime import ArgumentError

    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    x = inputs(spec, 1, 5, dtype=torch.float32, device=DEV)   # on the kernels' device: the named error fires
    with pytest.raises(ArgumentError, match="q_idx"):
        module.distill_loss(x["q"], x["k"], x["q_idx"][:, :4], x["k_idx"], x["w_idx"])
    with pytest.raises(ArgumentError, match="float16|torch.float32"):
        module.distill_loss(*(x[n].half() for n in INPUTS))
    with pytest.raises(ArgumentError, match="indices"):
        module.distill_loss(*(x[n] for n in INPUTS), indices=torch.zeros(1, 5, 2, 3, dtype=torch.int32, device=DEV))
    with pytest.raises(ArgumentError, match="lse_main"):
        module.distill_loss(*(x[n] for n in INPUTS), lse_main=torch.zeros(1, 5, 3, device=DEV))


# ---------------------------------------------------------------------------------------------------------------
# Rendering at real sizes
# ---------------------------------------------------------------------------------------------------------------

V32 = load_spec("specs/dsa_v32.yaml")               # 128 heads MQA (MLA 576 = 512 + 64), 64 indexer heads x 128, k 2048


@pytest.mark.parametrize("stage", ["dense", "sparse"])
@pytest.mark.parametrize("name,T", [("dsa_small", 20), ("dsa_v32", 5)])
def test_committed_dsa_specs(name, T, stage, tmp_path_factory):
    """Every committed DSA spec's distillation kernels, once, at a tiny T (V3.2: every token fits in its top-k).
    Renamed: a module of the committed name would register the generated module's custom ops a second time (the
    generated tests, in the same process, would then call ops whose first registration may be gone)."""
    from specgen.model.spec import replace

    spec = replace(load_spec(f"specs/{name}.yaml"), name=f"distill_{name}")
    module = kernel_module(spec, tmp_path_factory)
    x = inputs(spec, 1, T, seed=1, dtype=DTYPES[spec.dtype], device=DEV)
    indices = selection(spec, x, [(0, T - 1, spec.heads.kv - 1)]) if stage == "sparse" else None
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.distill_loss(spec, **x64, indices=indices)
    ref.backward()
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    loss = module.distill_loss(**xk, indices=indices, stage=stage)
    loss.backward()
    tol_loss, tol_grad = TOL[spec.dtype]
    assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6
    for n in IDX_INPUTS:
        assert R.rel_err(xk[n].grad, x64[n].grad) < tol_grad, n


def test_stage_field_and_argument(tmp_path_factory):
    """stage=None follows the spec's indexer.stage (sparse: over the indexer's own top-k when no indices are
    given); an explicit stage wins; the dense stage refuses indices."""
    from specgen.runtime import ArgumentError
    from specgen.model.spec import replace

    sparse_spec = spec_of("gqa")
    assert sparse_spec.indexer.stage == "sparse"
    dense_spec = replace(sparse_spec, **{"indexer.stage": "dense"})
    x = inputs(sparse_spec, 1, 21, seed=5, dtype=torch.float32, device=DEV)
    sparse = kernel_module(sparse_spec, tmp_path_factory)
    dense = kernel_module(dense_spec, tmp_path_factory)
    own = sparse.index_topk(x["q_idx"], x["k_idx"], x["w_idx"])
    assert torch.equal(sparse.distill_loss(**x), sparse.distill_loss(**x, indices=own))
    assert torch.equal(dense.distill_loss(**x), sparse.distill_loss(**x, stage="dense"))
    assert torch.equal(dense.distill_loss(**x, stage="sparse"), dense.distill_loss(**x, indices=own))
    x64 = {n: v.double() for n, v in x.items()}
    assert abs(dense.distill_loss(**x).item() - R.distill_loss(sparse_spec, **x64).item()) < 1e-5
    assert abs(sparse.distill_loss(**x).item() - R.distill_loss(sparse_spec, **x64, indices=own).item()) < 1e-5
    with pytest.raises(ArgumentError, match="takes no `indices`"):
        sparse.distill_loss(**x, indices=own, stage="dense")
    with pytest.raises(ArgumentError, match="`stage`"):
        sparse.distill_loss(**x, stage="warmup")


@pytest.mark.parametrize("spec", [V32, spec_of("gqa"), spec_of("mqa"), spec_of("group3"), spec_of("wide_k")],
                         ids=lambda s: s.name)
def test_every_dot_is_at_least_16(spec):
    for name, dims in dot_shapes(spec, make_distill_plan(spec)).items():
        assert min(dims) >= 16, (name, dims)
        assert all(d & (d - 1) == 0 for d in dims), (name, dims)


def test_renders_v32():
    src = render_distill_module(V32)
    ast.parse(src)
    assert "k1 = tl.load(k_rows[:, None] + 512 + tl.arange(0, 64)" in src            # 576 = 512 + 64
    assert ("def distill_loss(q, k, q_idx, k_idx, w_idx, *, indices=None, lse_main=None, stage=None, cu_seqlens=None,\n"
            "                 max_seqlen=None, p_main=None)") in src


# ---------------------------------------------------------------------------------------------------------------
# The sparse fused forward's forms (docs/distill.md, "The sparse forward's forms"): launch config fwd_form
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fwd_form_of():
    """Sets a module's fwd_form for one test and spies on the sparse fused forward's launches (their FORM)."""
    touched = []

    def set_form(module, form):
        launches = module._DISTILL_LAUNCHES
        kernel = launches.kernels["fwd_sparse_fused"]
        seen = []

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append(kwargs.get("FORM"))
                    return kernel[grid](*args, **kwargs)
                return launch
        touched.append((launches, launches.fwd_form, kernel))
        launches.fwd_form = form
        launches.kernels["fwd_sparse_fused"] = Spy()
        return seen
    yield set_form
    for launches, form, kernel in reversed(touched):
        launches.fwd_form = form
        launches.kernels["fwd_sparse_fused"] = kernel


def form_tiles(spec):
    """Small tiles (several trips of 16 keys in every form at top_k 24)."""
    return dataclasses.replace(small_tiles(spec), fused_km_bs=16)


# (shape, dtype, B, T, lse_main given, rows made empty): a split head dim, padded heads (group 3 -> 4, indexer
# 3 -> 4), several trips (wide_k), fp16 operands.
FORM_CASES = [("gqa", "fp32", 2, 15, True, ((0, 5, 1), (1, 0, 1))), ("wide_k", "fp32", 1, 33, False, ((0, 30, 1),)),
              ("group3", "fp16", 1, 17, True, ((0, 3, 1),)), ("mqa", "fp16", 1, 29, False, ())]


FORMS = runtime.distill.FWD_FORMS[1:]


@pytest.mark.parametrize("case", FORM_CASES, ids=[f"{c[0]}-{c[1]}-T{c[3]}" + ("-lse" if c[4] else "") for c in FORM_CASES])
def test_sparse_forward_forms(case, tmp_path_factory, fwd_form_of):
    """Each form's loss and gradients against the float64 reference, and its loss, statistics and stored p equal
    to the base form's within fp32 rounding; the spy sees the form's FORM launched."""
    shape, dtype, B, T, given, empty = case
    spec = spec_of(shape, dtype)
    module = kernel_module(spec, tmp_path_factory, form_tiles(spec))
    x = inputs(spec, B, T, seed=T + 100, dtype=DTYPES[dtype], device=DEV)
    indices = selection(spec, x, empty)
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.distill_loss(spec, **x64, indices=indices)
    ref.backward()
    lse = R.main_lse(spec, x64["q"], x64["k"], indices=indices).float() if given else None
    ok = (indices >= 0) & (indices.long() <= torch.arange(T, device=DEV).view(1, T, 1, 1))   # p_sel's written slots
    outs = {}
    for form in ("base",) + FORMS:
        seen = fwd_form_of(module, form)
        outs[form] = module._distill_fwd(*(x[n] for n in INPUTS), indices, lse, None, 0)
        assert seen == [runtime.distill.FWD_FORMS.index(form)]
    for form in FORMS:
        base, got = outs["base"], outs[form]
        for a, b in zip(base[:3] + (base[3][ok],), got[:3] + (got[3][ok],)):
            if a.numel():
                assert bool((torch.isfinite(a) == torch.isfinite(b)).all()), form
                fin = torch.isfinite(a)
                assert R.rel_err(b[fin], a[fin]) < 1e-5 and bool((a[~fin] == b[~fin]).all()), form
        seen = fwd_form_of(module, form)
        xk = {n: v.clone().requires_grad_(True) for n, v in x.items()}
        loss = module.distill_loss(**xk, indices=indices, lse_main=lse)
        loss.backward()
        assert seen == [runtime.distill.FWD_FORMS.index(form)]
        tol_loss, tol_grad = TOL[dtype]
        assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6, (form, loss.item(), ref.item())
        for n in IDX_INPUTS:
            err = R.rel_err(xk[n].grad, x64[n].grad)
            assert err < tol_grad, f"{form} d{n}: rel err {err:.3g}"


@pytest.mark.parametrize("form", FORMS)
def test_sparse_forward_forms_packed(form, tmp_path_factory, fwd_form_of):
    """A packed batch (cu_seqlens) through each form: the loss and gradients of the reference run per sequence."""
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory, form_tiles(spec))
    lengths = [13, 0, 1, 9]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    x = {n: v[0] for n, v in inputs(spec, 1, offsets[-1], seed=3, dtype=torch.float32, device=DEV).items()}
    indices = packed_selection(spec, x, cu, [(5, 1)])
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.varlen.distill_loss_varlen(spec, **x64, cu_seqlens=cu, indices=indices)
    ref.backward()
    seen = fwd_form_of(module, form)
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    loss = module.distill_loss(**xk, indices=indices, cu_seqlens=cu, max_seqlen=max(lengths))
    loss.backward()
    assert seen == [runtime.distill.FWD_FORMS.index(form)]
    assert abs(loss.item() - ref.item()) <= 2e-5 * abs(ref.item()) + 1e-6, (loss.item(), ref.item())
    for n in IDX_INPUTS:
        assert R.rel_err(xk[n].grad, x64[n].grad) < 2e-5, n


def test_fwd_form_is_checked(tmp_path_factory):
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    assert module._DISTILL_LAUNCHES.fwd_form == make_distill_plan(spec).fwd_form == "km_pf"  # the timed default
    with pytest.raises(runtime.ArgumentError, match="`fwd_form` must be one of"):
        module._DISTILL_LAUNCHES.fwd_form = "fast"


# ---------------------------------------------------------------------------------------------------------------
# The dense forward's forms (docs/distill.md, "The dense forward's forms"): launch config dense_fwd_form
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def dense_form_of():
    """Sets a module's dense_fwd_form (and dense_dq_form) for one test and spies on the dense fused forward's and
    query-side backward's launches: the kernel launched and its form constexprs (BK, STAGES, QSMEM; None for the
    base kernels)."""
    touched = []

    def set_form(module, form, dq_form="base"):
        launches = module._DISTILL_LAUNCHES
        seen = []
        saved = {n: launches.kernels[n] for n in ("fwd_dense_fused", "fwd_dense_qreg", "dq_dense_fused",
                                                  "dq_dense_qreg")}

        def spy(name):
            class Spy:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        seen.append((name, kwargs.get("BK"), kwargs.get("STAGES"), kwargs.get("QSMEM")))
                        return saved[name][grid](*args, **kwargs)
                    return launch
            return Spy()
        touched.append((launches, launches.dense_fwd_form, launches.dense_dq_form, saved))
        launches.dense_fwd_form, launches.dense_dq_form = form, dq_form
        launches.kernels.update({n: spy(n) for n in saved})
        return seen
    yield set_form
    for launches, form, dq_form, saved in reversed(touched):
        launches.dense_fwd_form, launches.dense_dq_form = form, dq_form
        launches.kernels.update(saved)


def dense_form_tiles(spec, bt=None):
    """Small tiles for the dense forms: qreg 16 keys a trip at 2 stages, Q in pieces of 16 (at most 32 for
    mla_split) dims with the second piece in shared memory where there are two or more (V3.2 keeps one of its
    five there); qreg_k32 32 keys at 3 stages, all of Q in registers. At T ~ 40 both take unmasked trips and
    masked ones. `bt`: query positions a dense program (1: V3.2's)."""
    d = small_tiles(spec)
    piece = 32 if spec.head_dim.qk > 64 else 16
    qsmem = 0b10 if len(dense_pieces(spec, piece)) > 1 else 0
    return dataclasses.replace(d, bt=bt or d.bt, dense_piece=piece,
                               dense_forms=(("qreg", 16, 2, qsmem), ("qreg_k32", 32, 3, 0)))


DENSE_FORMS = runtime.distill.DENSE_FWD_FORMS[1:]
# (shape, dtype, B, T, lse_main given, query positions a program): a split head dim and padded indexer heads (gqa,
# 8 positions), padded main heads (group3), V3.2's layout at one position a program (mla_split), fp16 and bf16.
DENSE_FORM_CASES = [("gqa", "fp32", 2, 29, True, None), ("group3", "fp16", 1, 25, False, None),
                    ("mla_split", "fp32", 1, 35, False, 1), ("mla_split", "bf16", 1, 19, True, 1)]


@pytest.mark.parametrize("case", DENSE_FORM_CASES,
                         ids=[f"{c[0]}-{c[1]}-B{c[2]}-T{c[3]}" + ("-lse" if c[4] else "") for c in DENSE_FORM_CASES])
def test_dense_forward_forms(case, tmp_path_factory, dense_form_of):
    """Each register-operand form's loss, statistics and computed lse equal the base kernel's within fp32
    rounding and its loss matches the float64 reference; so do the gradients of the qreg forward and the qreg
    query-side backward (dense_dq_form; the key side is the base kernel's). The spy sees each form's kernels and
    constexprs launched."""
    shape, dtype, B, T, given, bt = case
    spec = spec_of(shape, dtype)
    tiles = dense_form_tiles(spec, bt)
    module = kernel_module(spec, tmp_path_factory, tiles)
    x = inputs(spec, B, T, seed=T + 200, dtype=DTYPES[dtype], device=DEV)
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.distill_loss(spec, **x64)
    ref.backward()
    lse = R.main_lse(spec, x64["q"], x64["k"]).float() if given else None
    launched = {"base": [("fwd_dense_fused", None, None, None)]}
    launched.update({name: [("fwd_dense_qreg", bk, stages, qsmem)] for name, bk, stages, qsmem in tiles.dense_forms})
    outs = {}
    for form in ("base",) + DENSE_FORMS:
        seen = dense_form_of(module, form)
        outs[form] = module._distill_fwd(*(x[n] for n in INPUTS), None, lse, None, 0)
        assert seen == launched[form]
    tol_loss, tol_grad = TOL[dtype]
    for form in DENSE_FORMS:
        for a, b in zip(outs["base"][:3], outs[form][:3]):
            if a.numel():
                assert bool(torch.isfinite(b).all()), form
                assert R.rel_err(b, a) < 1e-5, form
        loss = outs[form][0]
        assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6, (form, loss.item(), ref.item())
    for form in DENSE_FORMS[:1]:
        seen = dense_form_of(module, form, form)
        xk = {n: v.clone().requires_grad_(True) for n, v in x.items()}
        loss = module.distill_loss(**xk, lse_main=lse, stage="dense")
        loss.backward()
        assert seen == launched[form] + [("dq_dense_qreg",) + launched[form][0][1:]]
        for n in IDX_INPUTS:
            err = R.rel_err(xk[n].grad, x64[n].grad)
            assert err < tol_grad, f"{form} d{n}: rel err {err:.3g}"


@pytest.mark.parametrize("form", DENSE_FORMS)
def test_dense_forward_forms_packed(form, tmp_path_factory, dense_form_of):
    """A packed batch (cu_seqlens) through each form, forward and (qreg) query-side backward (programs in reverse
    over the tile table, longest rows first): the loss and gradients of the reference run per sequence."""
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory, dense_form_tiles(spec))
    lengths = [21, 0, 1, 9, 34]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    x = {n: v[0] for n, v in inputs(spec, 1, offsets[-1], seed=5, dtype=torch.float32, device=DEV).items()}
    x64 = {n: v.double().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    ref = R.varlen.distill_loss_varlen(spec, **x64, cu_seqlens=cu)
    ref.backward()
    dq_form = form if form in runtime.distill.DENSE_DQ_FORMS else "base"
    seen = dense_form_of(module, form, dq_form)
    xk = {n: v.clone().requires_grad_(n in IDX_INPUTS) for n, v in x.items()}
    loss = module.distill_loss(**xk, stage="dense", cu_seqlens=cu, max_seqlen=max(lengths))
    loss.backward()
    assert [s[0] for s in seen] == ["fwd_dense_qreg", "dq_dense_qreg" if dq_form != "base" else "dq_dense_fused"]
    assert abs(loss.item() - ref.item()) <= 2e-5 * abs(ref.item()) + 1e-6, (loss.item(), ref.item())
    for n in IDX_INPUTS:
        assert R.rel_err(xk[n].grad, x64[n].grad) < 2e-5, n


def test_dense_fwd_form_is_checked(tmp_path_factory):
    spec = spec_of("gqa")
    module = kernel_module(spec, tmp_path_factory)
    launches = module._DISTILL_LAUNCHES
    assert launches.dense_fwd_form == make_distill_plan(spec).dense_fwd_form == "base"   # narrow heads: untimed
    assert launches.dense_dq_form == make_distill_plan(spec).dense_dq_form == "base"
    assert tuple(launches.dense_forms) == DENSE_FORMS
    with pytest.raises(runtime.ArgumentError, match="`dense_fwd_form` must be one of"):
        launches.dense_fwd_form = "fast"
    with pytest.raises(runtime.ArgumentError, match=r"`dense_dq_form` must be one of \('base', 'qreg'\)"):
        launches.dense_dq_form = "qreg_k32"
    # A module whose plan renders no register-operand form (none fits) takes the base form only.
    bare = kernel_module(spec, tmp_path_factory, dataclasses.replace(make_distill_plan(spec), dense_forms=()))
    assert "fwd_dense_qreg" not in bare._DISTILL_LAUNCHES.kernels and "dq_dense_qreg" not in bare._DISTILL_LAUNCHES.kernels
    with pytest.raises(runtime.ArgumentError, match=r"one of \('base',\)"):
        bare._DISTILL_LAUNCHES.dense_fwd_form = "qreg"


def test_dense_forms_of_v32():
    """V3.2's forms as compiled for sm_90 (docs/distill.md): Q's piece 384-511 in shared memory (bit 3), the rest
    in 112 registers a thread; 64 keys at 2 stages and 32 at 3, both within the H100's 227 KiB."""
    d = make_distill_plan(V32)
    assert dense_pieces(V32, d.dense_piece) == [(0, 128), (128, 128), (256, 128), (384, 128), (512, 64)]
    assert d.dense_forms == (("qreg", 64, 2, 0b1000), ("qreg_k32", 32, 3, 0b1000))
    assert d.dense_fwd_form == d.dense_dq_form == "qreg"   # timed on the H100 (commit b6eeeaf): the plan's
    fp = dense_qreg_footprints(V32)
    assert fp == {"qreg": 230400, "qreg_k32": 185344}        # compiled: 231424 and 185344
    assert all(v <= SMEM_LIMIT for v in fp.values())
