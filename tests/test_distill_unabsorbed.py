"""The dense distillation stage from unabsorbed q and k (docs/distill.md, "The dense stage from the unabsorbed
heads"): a key per query head (spec.unabsorbed), the same target as the absorbed MLA form. The float64 reference
in both forms, the kernels against it under the CPU interpreter (several strips of the backward's dI workspace,
unmasked and masked trips, B > 1, packed), the two forms against each other through the kernels, and every shape
mistake refused before any kernel runs. On a GPU machine the kernel tests run on CUDA (`testing.test_device()`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys

import pytest
import torch

import specgen.reference as R
from specgen import runtime, testing
from specgen.compile.footprint import SMEM_BUDGET
from specgen.compile.render import render_distill_module
from specgen.compile.render_distill import dot_shapes, make_distill_plan, mha_footprints
from specgen.model.spec import load_spec, spec_from_mapping
from specgen.testing.varlen import AllocationWatch

IDX = ("q_idx", "k_idx", "w_idx")
MHA_KERNELS = ("fwd_dense_mha", "di_dense_mha", "dq_dense_mha", "dk_dense_mha")
DEV = testing.test_device()   # where the kernels run: "cpu" under the interpreter, "cuda" on a GPU machine


def mla_spec(name, hq, latent, rope, nope, idx_heads, idx_dim, dtype="fp32", v=16, unabsorbed=True):
    """An MLA (MQA) DSA spec whose absorbed key is [latent, rope] and whose unabsorbed head is [nope, rope]; the
    softmax scale is the unabsorbed head's, as V3.2 writes it."""
    data = {"name": name, "family": "dsa", "heads": {"q": hq, "kv": 1}, "head_dim": {"qk": latent + rope, "v": v},
            "dtype": dtype, "scale": (nope + rope) ** -0.5, "selection": {"top_k": 8},
            "indexer": {"heads": idx_heads, "head_dim": idx_dim}, "max_seqlen": 4096}
    if unabsorbed:
        data["unabsorbed"] = {"qk": nope + rope, "v": 16}
    return spec_from_mapping(data)


# Absorbed key 48 = 32 latent + 16 rope dims, unabsorbed head 32 = 16 + 16: 4 query heads, 2 indexer heads of 16.
TINY = dict(hq=4, latent=32, rope=16, nope=16, idx_heads=2, idx_dim=16)
# V3.2's head dims (absorbed 576 = 512 + 64, unabsorbed 192 = 128 + 64) with 2 query and 2 indexer heads.
V32_DIMS = dict(hq=2, latent=512, rope=64, nope=128, idx_heads=2, idx_dim=32, v=512)

_modules: dict = {}


def module_of(spec, tmp_path_factory, **tiles):
    """The distillation section rendered for `spec` with the unabsorbed stage's tiles replaced by `tiles`
    (MhaTiles fields), imported once per (spec, tiles)."""
    d = make_distill_plan(spec)
    d = dataclasses.replace(d, mha=dataclasses.replace(d.mha, **tiles)) if tiles else d
    key = (spec.name, spec.hash, d)
    if key not in _modules:
        path = tmp_path_factory.mktemp("distill_mha") / f"{spec.name}.py"
        path.write_text(render_distill_module(spec, d))
        name = f"specgen_distill_mha_test.{path.parent.name}_{spec.name}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        _modules[key] = module
    return _modules[key]


# Small tiles: 32 query positions a program, 16 keys a trip, 32 keys a dI program (so a 45-token row has unmasked
# trips below its tile and masked ones at the diagonal in both the forward and the dI pass), 8 positions a program
# of the index-only sides; `workspace=1`: strips of one query tile each (the strip loop, and dk_I summed over it).
SMALL = dict(bq=32, bk=16, kb=32, idx_bt=8, dq_bs=16, dk_bs=16)
ONE_TILE_STRIPS = dict(SMALL, workspace=1)


def unabsorbed_inputs(spec, B, T, seed, dtype=torch.float32):
    """Drawn on the CPU (the same values on every machine), returned on the kernels' device (DEV)."""
    gen = torch.Generator().manual_seed(seed)
    x = R.make_inputs(spec, B, T, generator=gen)
    q, k = R.make_unabsorbed_qk(spec, B, T, generator=gen)
    return {"q": q.to(DEV, dtype), "k": k.to(DEV, dtype), **{n: x[n].to(DEV, dtype) for n in IDX}}


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture
def launched():
    """Records the distillation kernels a module launches (by Launches key) for one test."""
    touched = []

    def spy(module):
        launches = module._DISTILL_LAUNCHES
        saved, seen = dict(launches.kernels), []

        def wrap(name):
            class Spy:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        seen.append(name)
                        return saved[name][grid](*args, **kwargs)
                    return launch
            return Spy()
        launches.kernels.update({n: wrap(n) for n in saved})
        touched.append((launches, saved))
        return seen
    yield spy
    for launches, saved in reversed(touched):
        launches.kernels.clear()
        launches.kernels.update(saved)


def assert_matches_reference(spec, module, x, lse_given, where, tol=(2e-5, 2e-5), **call):
    """The kernel's loss and gradients against the float64 reference (batched, or packed with cu_seqlens)."""
    x64 = {n: v.double().requires_grad_(n in IDX) for n, v in x.items()}
    cu = call.get("cu_seqlens")
    if cu is None:
        ref = R.distill_loss(spec, **x64)
        lse = R.main_lse(spec, x64["q"], x64["k"]).float() if lse_given else None
    else:
        ref = R.varlen.distill_loss_varlen(spec, **x64, cu_seqlens=cu)
        bounds = [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:]) if b > a]
        lse = torch.cat([R.main_lse(spec, x64["q"][a:b][None], x64["k"][a:b][None])[0].float()
                         for a, b in bounds]) if lse_given else None
    ref.backward()
    xk = {n: v.clone().requires_grad_(n in IDX) for n, v in x.items()}
    # Every fresh buffer (outputs, statistics, the dI workspace) NaN: an element read before it is written shows.
    with AllocationWatch():
        loss = module.distill_loss(**xk, lse_main=lse, stage="dense", **call)
        loss.backward()
    tol_loss, tol_grad = tol
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= tol_loss * abs(ref.item()) + 1e-6, (loss.item(), ref.item(), where)
    assert xk["q"].grad is None and xk["k"].grad is None
    for n in IDX:
        assert bool(torch.isfinite(xk[n].grad).all()), (n, where)
        err = R.rel_err(xk[n].grad, x64[n].grad)
        assert err < tol_grad, f"d{n}: rel err {err:.3g} {where}"
    return loss, {n: xk[n].grad for n in IDX}


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------

def absorb(q_nope, q_rope, latent, k_rope, w_uk):
    """MLA's two forms of one attention: per head h, q_h = [q_nope_h, q_rope_h] and k_h = [W_UK_h latent, k_rope]
    (unabsorbed), or q_h = [q_nope_h W_UK_h, q_rope_h] and one key [latent, k_rope] (absorbed); q_h . k_h is the same.
    Shapes: q_nope [B, T, H, n], q_rope [B, T, H, r], latent [B, T, c], k_rope [B, T, r], w_uk [H, n, c]."""
    H = q_nope.shape[2]
    k_nope = torch.einsum("btc,hnc->bthn", latent, w_uk)
    unabsorbed = (torch.cat([q_nope, q_rope], -1),
                  torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, H, -1)], -1))
    absorbed = (torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_rope], -1),
                torch.cat([latent, k_rope], -1)[:, :, None])
    return unabsorbed, absorbed


def absorbed_pair(spec, dims, B, T, seed, dtype=torch.float64, device="cpu"):
    """Random MLA inputs in both forms (and the indexer's) for a spec of `dims` (mla_spec's): the absorbed q and k
    computed from the unabsorbed ones in float64, then both rounded to `dtype` (on `device`: DEV for the kernels).
    W_UK ~ N(0, 1/latent) keeps the logits O(1)."""
    gen = torch.Generator().manual_seed(seed)
    H, n, r, c = spec.heads.q, dims["nope"], dims["rope"], dims["latent"]
    randn = lambda *s, std=1.0: torch.randn(*s, dtype=torch.float64, generator=gen) * std  # noqa: E731
    (qu, ku), (qa, ka) = absorb(randn(B, T, H, n), randn(B, T, H, r), randn(B, T, c), randn(B, T, r),
                                randn(H, n, c, std=c ** -0.5))
    idx = {k_: v.to(device, dtype) for k_, v in R.make_inputs(spec, B, T, generator=gen).items() if k_ in IDX}
    return ({"q": qu.to(device, dtype), "k": ku.to(device, dtype), **idx},
            {"q": qa.to(device, dtype), "k": ka.to(device, dtype), **idx})


def test_reference_target_is_the_same_in_both_forms():
    """float64: the per-head-key target, its lse and the loss with its gradients equal the absorbed form's."""
    spec = mla_spec("mha_ref", **TINY)
    un, ab = absorbed_pair(spec, TINY, 2, 11, seed=fresh_seed())
    assert un["k"].shape == (2, 11, 4, 32) and ab["k"].shape == (2, 11, 1, 48)
    assert R.rel_err(R.distill_target(spec, un["q"], un["k"]), R.distill_target(spec, ab["q"], ab["k"])) < 1e-12
    assert R.rel_err(R.main_lse(spec, un["q"], un["k"]), R.main_lse(spec, ab["q"], ab["k"])) < 1e-12
    a = {n: v.clone().requires_grad_(n in IDX) for n, v in un.items()}
    b = {n: v.clone().requires_grad_(n in IDX) for n, v in ab.items()}
    la, lb = R.distill_loss(spec, **a), R.distill_loss(spec, **b, query_chunk=4)
    assert abs(la.item() - lb.item()) <= 1e-12 * abs(lb.item())
    la.backward()
    lb.backward()
    for n in IDX:
        assert R.rel_err(a[n].grad, b[n].grad) < 1e-10, n
    # A target by hand from the per-head keys: each head's softmax over s <= t, averaged over the heads.
    q, k, T = un["q"], un["k"], 11
    logits = torch.einsum("bthd,bshd->bhts", q, k) * spec.softmax_scale
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(logits, -1).mean(1)[:, :, None]                                   # [B, T, 1, T]
    assert R.rel_err(R.distill_target(spec, q, k), p) < 1e-12
    with pytest.raises(ValueError, match="a key per query head"):
        R.distill_target(spec, q, k[:, :, :3])


# ---------------------------------------------------------------------------------------------------------------
# The kernels against the reference
# ---------------------------------------------------------------------------------------------------------------

# (B, T, lse_main given, dtype, tiles): several strips of one query tile (T = 45: two tiles of 32, the second
# partial), with and without lse_main (the forward's own per-head lse pass), B > 1; fp16 operands in one strip.
CASES = [(2, 45, False, "fp32", "strips"), (1, 45, True, "fp32", "strips"), (1, 33, True, "fp16", "small")]


@pytest.mark.parametrize("B,T,given,dtype,tiles", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-{c[3]}-{c[4]}" + ("-lse" if c[2] else "") for c in CASES])
def test_kernels_match_reference(B, T, given, dtype, tiles, tmp_path_factory, launched):
    spec = mla_spec(f"mha_{dtype}", **TINY, dtype=dtype)
    module = module_of(spec, tmp_path_factory, **(ONE_TILE_STRIPS if tiles == "strips" else SMALL))
    seed = fresh_seed()
    x = unabsorbed_inputs(spec, B, T, seed, {"fp32": torch.float32, "fp16": torch.float16}[dtype])
    seen = launched(module)
    tol = (2e-5, 2e-5) if dtype == "fp32" else (1e-4, 3e-3)
    assert_matches_reference(spec, module, x, given, f"seed={seed}", tol)
    strips = -(-T // 32) if tiles == "strips" else 1
    assert seen == ["fwd_dense_mha"] + ["di_dense_mha", "dq_dense_mha", "dk_dense_mha"] * strips


def test_kernels_packed(tmp_path_factory, launched):
    """A packed batch (cu_seqlens) through strips of one entry of the query tile table each: sequences longer than
    a tile, shorter than a key trip, empty; the reference run per sequence."""
    spec = mla_spec("mha_fp32", **TINY)
    module = module_of(spec, tmp_path_factory, **ONE_TILE_STRIPS)
    lengths = [37, 0, 1, 19, 5]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    seed = fresh_seed()
    x = {n: v[0] for n, v in unabsorbed_inputs(spec, 1, int(cu[-1]), seed).items()}
    seen = launched(module)
    assert_matches_reference(spec, module, x, False, f"seed={seed}", cu_seqlens=cu, max_seqlen=max(lengths))
    # The tile table of 32-row tiles has total // 32 + N entries (some empty), one strip each.
    assert seen.count("di_dense_mha") == 75 // 32 + len(lengths)


def test_kernels_at_v32_head_dims(tmp_path_factory):
    """V3.2's head dims (q and k of 192 = 128 + 64 against the absorbed 576), with few heads: several dI blocks
    of 16 keys, lse_main given."""
    spec = mla_spec("mha_v32dims", **V32_DIMS)
    module = module_of(spec, tmp_path_factory, bq=16, bk=16, kb=16, idx_bt=8, dq_bs=16, dk_bs=16)
    seed = fresh_seed()
    assert_matches_reference(spec, module, unabsorbed_inputs(spec, 1, 21, seed), True, f"seed={seed}")


def test_forward_tile_set_at_launch(tmp_path_factory, monkeypatch):
    """The forward's key tile, stages and warps as the launch's `mha` entries (what bench/distill_bench.py's
    fused_unabsorbed_* variants set): 32 keys a trip where the module's kernel defaults to 16, on 8 warps, against
    the float64 reference (T = 45: one full trip and a masked one per tile of 32 rows)."""
    spec = mla_spec("mha_fp32", **TINY)
    module = module_of(spec, tmp_path_factory, **SMALL)
    launches = module._DISTILL_LAUNCHES
    assert launches._mha_fwd_tile(launches.mha) == {"BK": SMALL["bk"], "STAGES": launches.mha["stages"]}
    monkeypatch.setattr(launches, "mha", {**launches.mha, "bk": 32, "stages": 1, "warps": 8})
    seed = fresh_seed()
    assert_matches_reference(spec, module, unabsorbed_inputs(spec, 1, 45, seed), True, f"seed={seed}")


def test_both_forms_give_one_loss(tmp_path_factory, launched):
    """Absorbed q, k built from unabsorbed ones (q_abs = [q_nope W_UK, q_rope], k_abs = [latent, k_rope]): the
    absorbed kernels and the unabsorbed ones give the same loss and gradients within fp32 rounding."""
    spec = mla_spec("mha_fp32", **TINY)
    module = module_of(spec, tmp_path_factory, **ONE_TILE_STRIPS)
    un, ab = absorbed_pair(spec, TINY, 2, 41, seed=fresh_seed(), dtype=torch.float32, device=DEV)
    seen = launched(module)
    out = []
    for x in (un, ab):
        xk = {n: v.clone().requires_grad_(n in IDX) for n, v in x.items()}
        loss = module.distill_loss(**xk, stage="dense")
        loss.backward()
        out.append((loss, [xk[n].grad for n in IDX]))
    assert "fwd_dense_mha" == seen[0] and "fwd_dense_mha" not in seen[-3:]   # the second call: the absorbed kernels
    (la, ga), (lb, gb) = out
    assert abs(la.item() - lb.item()) <= 2e-6 * abs(lb.item()), (la.item(), lb.item())
    for n, a, b in zip(IDX, ga, gb):
        assert R.rel_err(a, b) < 2e-5, n


def test_custom_op_checks(tmp_path_factory):
    """The forward custom op in the unabsorbed form: schema, autograd registration and fake shapes."""
    spec = mla_spec("mha_fp32", **TINY)
    module = module_of(spec, tmp_path_factory, **SMALL)
    x = unabsorbed_inputs(spec, 1, 9, fresh_seed())
    args = [x[n].clone().requires_grad_(n in IDX) for n in ("q", "k") + IDX]
    torch.library.opcheck(module._distill_fwd, (*args, None, None, None, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------------------
# Shape mistakes: refused before any kernel runs
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_kernel(monkeypatch):
    """Makes a module's distillation launches fail if reached (the errors below must come first)."""
    def arm(module):
        def fail(*args, **kwargs):
            raise AssertionError("a kernel was launched")
        launches = module._DISTILL_LAUNCHES
        monkeypatch.setattr(launches, "forward", fail)
        monkeypatch.setattr(launches, "backward", fail)
        monkeypatch.setattr(launches, "kernels", {})
        return module
    return arm


def test_shape_errors_name_the_argument_and_both_forms(tmp_path_factory, no_kernel):
    spec = mla_spec("mha_fp32", **TINY)
    module = no_kernel(module_of(spec, tmp_path_factory, **SMALL))
    x = unabsorbed_inputs(spec, 1, 6, 0)
    q, k = x["q"], x["k"]
    idx = [x[n] for n in IDX]
    both = [r"q \[B, T, 4, 48\] with k \[B, T, 1, 48\]", r"q \[B, T, 4, 32\] with k \[B, T, 4, 32\]"]
    cases = [
        ((q, k[:, :, :3]), "`k` has shape \\[1, 6, 3, 32\\]"),                  # a head short
        ((q, k[..., :16]), "`k` has shape \\[1, 6, 4, 16\\]"),                  # a dim short
        ((q[..., :16], k), "`q` has shape \\[1, 6, 4, 16\\]"),
        # an absorbed q beside an unabsorbed k (made on the kernels' device: the shape error fires, not the device
        # check a CPU tensor meets on a GPU machine)
        ((torch.zeros(1, 6, 4, 48, device=DEV), k),
         "`q` has shape \\[1, 6, 4, 48\\], but `k` \\[1, 6, 4, 32\\] is in the "),
        ((torch.zeros(1, 6, 2, 40, device=DEV), torch.zeros(1, 6, 1, 40, device=DEV)),
         "`q` has shape \\[1, 6, 2, 40\\]"),
    ]
    for (qq, kk), message in cases:
        with pytest.raises(runtime.ArgumentError, match=message) as info:
            module.distill_loss(qq, kk, *idx, stage="dense")
        for form in both:
            assert re.search(form, str(info.value)), (form, str(info.value))
    # Packed: the forms are written with the packed rows.
    with pytest.raises(runtime.ArgumentError, match=r"q \[total, 4, 32\] with k \[total, 4, 32\]"):
        module.distill_loss(q[0], k[0, :, :2], *(t[0] for t in idx), stage="dense",
                            cu_seqlens=torch.tensor([0, 6], dtype=torch.int32, device=DEV), max_seqlen=6)
    # The sparse stage takes the absorbed form only (explicitly, with indices, or as the spec's default stage).
    for kw in ({"stage": "sparse"}, {}, {"indices": torch.zeros(1, 6, 1, 8, dtype=torch.int32, device=DEV)}):
        with pytest.raises(runtime.ArgumentError, match="only the dense stage takes.*stage='dense'"):
            module.distill_loss(q, k, *idx, **kw)
    # Right form, wrong rest: the usual per-tensor checks.
    with pytest.raises(runtime.ArgumentError, match="`k` has T=5"):
        module.distill_loss(q, k[:, :5], *idx, stage="dense")
    with pytest.raises(runtime.ArgumentError, match="torch.float32"):
        module.distill_loss(q.half(), k.half(), *idx, stage="dense")


def test_a_spec_without_the_field_refuses_per_head_keys(tmp_path_factory, no_kernel):
    spec = mla_spec("mha_none", **TINY, unabsorbed=False)
    assert make_distill_plan(spec).mha is None
    module = no_kernel(module_of(spec, tmp_path_factory))
    assert "def _distill_fwd_dense_mha_kernel" not in render_distill_module(spec)
    x = unabsorbed_inputs(mla_spec("mha_fp32", **TINY), 1, 6, 0)
    with pytest.raises(runtime.ArgumentError, match="no `unabsorbed` head dims.*add `unabsorbed: {qk: ..., v: ...}`"):
        module.distill_loss(x["q"], x["k"], *(x[n] for n in IDX), stage="dense")


# ---------------------------------------------------------------------------------------------------------------
# V3.2's plan
# ---------------------------------------------------------------------------------------------------------------

def test_v32_tiles_fit_and_render():
    """V3.2's unabsorbed tiles (MhaTiles): 128 positions x 64 keys, 2 stages, within the footprint budget
    (compiled for sm_90: 147968 B, docs/distill.md), every product at least 16 wide; the module renders them."""
    v32 = load_spec("specs/dsa_v32.yaml")
    m = make_distill_plan(v32).mha
    assert (m.qk, [(p.offset, p.size) for p in m.parts]) == (192, [(0, 128), (128, 64)])
    assert (m.bq, m.bk, m.kb, m.warps, m.stages, m.idx_bt) == (128, 64, 256, 8, 2, 1)
    fp = mha_footprints(v32)
    assert fp["_distill_fwd_dense_mha_kernel"] == 148480 and max(fp.values()) <= SMEM_BUDGET
    assert all(min(s) >= 16 for name, s in dot_shapes(v32, make_distill_plan(v32)).items() if "mha" in name)
    src = render_distill_module(v32)
    for name in MHA_KERNELS:
        assert f"def _distill_{name}_kernel(" in src
    assert "unabsorbed_qk=192" in src and '"qk": 192' in src
