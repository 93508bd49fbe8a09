"""The prefill indexer's kernels variant by variant (tier 2, CPU interpreter): the radix select (`_radix_topk_kernel`,
compacting or not, narrow and wide chunks, lists that fit or overflow) against the reference rule on crafted
workspace rows, and the score tile's two forms (key-major, query-major) through `index_topk` on token, block, fp8
and packed batches."""

import pytest
import torch

import specgen
from specgen import reference, testing
from specgen.compile.plan import make_plan
from specgen.compile.tuning import index_configs
from specgen.model.spec import load_spec, replace
from specgen.reference._core import top_units
from small_specs import small_token_spec

# Token top-k 16 (dsa_small): rows past a chunk of the kernel's loops, k equal scores and more, short rows.
SMALL = load_spec("specs/dsa_small.yaml")

# (compact, chunk, list): the former select, compacting with the plan's list and wide chunks, compacting with a list
# so short that tie-heavy rows overflow it (they stay on the row) and with narrow chunks (many trips a pass).
TOPK_VARIANTS = {"five_pass": (0, 1024, 256), "compact": (1, 256, 256), "short_list": (1, 128, 24)}


def radix_top_k(mod, ws, q0, *, compact, chunk, list_len, with_scores=True):
    """`_radix_topk_kernel` over workspace rows ws [HKV, rows, units] of the queries q0, q0 + 1, ... (row r has
    candidates [0, q0 + r]); returns (indices, scores) [rows, HKV, k]. One extra output row, -7 everywhere: a write
    past a row's k slots shows."""
    G, rows, units = ws.shape
    k = mod.TOP_K.value
    T = q0 + rows + 1
    idx = torch.full((1, T, G, k), -7, dtype=torch.int32)
    sc = torch.full((1, T, G, k), -7.0)
    lists = torch.full((G, rows, list_len), -5, dtype=torch.int32)
    dev = testing.test_device()
    ws, idx, sc, lists = (x.to(dev) for x in (ws.contiguous(), idx, sc, lists))
    mod._radix_topk_kernel[(rows, G)](ws, idx, sc, ws, ws, lists, T, q0, rows, units, WITH_SCORES=with_scores,
                                      COMPACT=bool(compact), CHUNK=chunk, LIST_LEN=list_len, num_warps=4)
    idx, sc = idx.cpu(), sc.cpu()
    assert (idx[0, q0 + rows] == -7).all() and (idx[0, :q0] == -7).all(), "written outside the rows"
    return idx[0, q0:q0 + rows], sc[0, q0:q0 + rows]


def crafted_rows(G: int, units: int, gen) -> torch.Tensor:
    """[G, 8, units] rows: random; integer ties; all equal (every unit ties); -inf in 40%; all -inf; NaN a few;
    all NaN; random with the k-th best among 30 equal values."""
    rows = torch.randn(G, 8, units, generator=gen)
    rows[:, 1] = torch.randint(-2, 3, (G, units), generator=gen).float()
    rows[:, 2] = 0.5
    rows[:, 3] = torch.where(torch.rand(G, units, generator=gen) < 0.4, float("-inf"), rows[:, 3])
    rows[:, 4] = float("-inf")
    rows[:, 5, torch.randperm(units, generator=gen)[:5]] = float("nan")
    rows[:, 6] = float("nan")
    rows[:, 7, torch.randperm(units, generator=gen)[:30]] = 3.0
    rows[:, 7, torch.randperm(units, generator=gen)[:10]] = 4.0
    return rows


@pytest.mark.parametrize("variant", list(TOPK_VARIANTS))
def test_radix_top_k_matches_the_rule_exactly(variant):
    """Every select variant picks the reference's units (ties to the lower index, NaN above +inf as in its sort,
    -1 padding) and reports their workspace scores, on rows longer than a chunk, and on rows of k - 1, k, k + 1
    candidates; units past a row's candidates hold NaN and +inf, which the kernel must never read."""
    mod = specgen.load(SMALL)
    compact, chunk, list_len = TOPK_VARIANTS[variant]
    k = mod.TOP_K.value
    gen = torch.Generator().manual_seed(5)
    G = SMALL.heads.kv
    for q0, units in ((700, 712), (k - 2, 24)):
        ws = crafted_rows(G, units, gen)
        t = q0 + torch.arange(8)
        visible = torch.arange(units) <= t[:, None]
        for poison in (float("nan"), float("inf"))[:2 if units > 100 else 1]:
            got, got_scores = radix_top_k(mod, torch.where(visible, ws, poison), q0, compact=compact, chunk=chunk,
                                          list_len=list_len)
            want = top_units(torch.where(visible, ws, float("-inf")).permute(1, 0, 2)[None], t, 1, k)[0]
            for r in range(8):
                assert torch.equal(got[r], want[r]), (variant, q0, r, got[r].tolist(), want[r].tolist())
            taken = want.long()
            expect = ws.permute(1, 0, 2).gather(-1, taken.clamp(min=0))
            expect = torch.where(taken < 0, float("-inf"), expect)
            assert torch.equal(got_scores.isnan(), expect.isnan())
            assert torch.equal(torch.nan_to_num(got_scores), torch.nan_to_num(expect))


# Small specs of each indexer path: token (fp16, 2 kv groups), fp8 e4m3 keys, blocks of 16 with forced blocks.
SCORE_SPECS = {
    "token": lambda: SMALL,
    "fp8": lambda: replace(SMALL, name="dsa_small_fp8_km", **{"indexer.dtype": "fp8_e4m3", "selection.top_k": 8}),
    "block": lambda: small_token_spec("nsa_token_km_block", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 3, "selection.initial": 1,
        "selection.local": 1}),
}


def with_configs(mod, plan, key_major: bool, compact: bool, **score):
    cfg = index_configs(plan, key_major=key_major, compact=compact)
    cfg["select"].update(score)
    cfg["index_topk"]["chunk"] = 64      # the interpreter's time grows with the chunk, not the row
    return {"default": {**mod.CONFIGS["default"], **cfg}}


def assert_same_units_up_to_ties(got, want, unit_scores, delta):
    """Per row (query, kv group), `got` and `want` [B, T, Hkv, k] hold the same units, except units whose reference
    score (unit_scores [B, T, Hkv, units]) lies within `delta` of the row's k-th best: near-ties that two roundings
    of the scores may rank either way."""
    k = got.shape[-1]
    boundary = unit_scores.topk(min(k, unit_scores.shape[-1]), dim=-1).values[..., -1]
    for b, t, g in (got != want).any(-1).nonzero().tolist():
        a, w = set(got[b, t, g].tolist()), set(want[b, t, g].tolist())
        assert len(a) == len(w) and (-1 in a) == (-1 in w), (t, g, sorted(a), sorted(w))
        for u in a ^ w:
            gap = abs(unit_scores[b, t, g, u].item() - boundary[b, t, g].item())
            assert gap <= delta, f"row t={t} g={g}: unit {u} differs, {gap:.3e} from the k-th score (> {delta:.3e})"


@pytest.mark.parametrize("which", list(SCORE_SPECS))
def test_score_forms_select_the_same_units(which, monkeypatch):
    """index_topk with the key-major score tile (small query and key tiles: several programs, diagonal tiles) and
    the compacting select picks the units the query-major tile and the five-pass select pick (the generated tests
    hold that pair to the float64 reference), up to near-ties, with the same scores up to the arithmetic's order.

    The forms' dots differ in shape ([keys, heads] against [queries x heads, keys]), so they sum over heads in
    different orders, and on the GPU fp8 dots of different shapes accumulate differently in the tensor core's
    truncating accumulator (testing.index_score_tol): there each form's scores are held to the float64 reference
    within that tolerance (the two forms then within twice it of each other), elsewhere also to each other at fp32
    head-sum precision. Units may differ only where the reference's scores are within the forms' rounding of the
    row's k-th best (4 x tol x the selected scores' RMS: a swap needs both units' errors to close the gap)."""
    spec = SCORE_SPECS[which]()
    mod = specgen.load(spec)
    plan = make_plan(spec)
    unit = spec.selection.block if spec.selection.granularity == "block" else 1
    T = 48 if unit == 1 else 96
    case = testing.random_case(mod, spec, 1, T, None, 3, what="index_topk")
    x = case.inputs
    results = []
    for key_major, compact, extra in ((False, False, {}), (True, True, {"bt": 8, "block_n": max(32, unit)})):
        monkeypatch.setattr(mod, "CONFIGS", with_configs(mod, plan, key_major, compact, **extra))
        results.append(mod.index_topk(x["q_idx"], x["k_idx"], x["w_idx"], return_scores=True))
    (want, want_scores), (got, got_scores) = results
    device = want.device
    tol = testing.index_score_tol(spec, device)
    ref_units = testing.reference_unit_scores(spec, case.exact)
    refs = []
    for idx, scores in ((want, want_scores), (got, got_scores)):
        ref = testing.reference_index_scores(spec, case.exact, idx)
        ranked = ref.isfinite()
        assert torch.equal(scores.cpu().double()[~ranked], ref[~ranked]), "padding -inf, forced blocks +inf"
        err = reference.rel_err(scores.cpu().double()[ranked], ref[ranked])
        assert err < tol, f"scores rel err {err:.3e} >= {tol:.0e} against the float64 reference"
        refs.append(ref[ranked])
    rms = refs[0].pow(2).mean().sqrt().item()
    assert_same_units_up_to_ties(got.cpu(), want.cpu(), ref_units, 4 * tol * rms)
    if not (spec.indexer.dtype == "fp8_e4m3" and device.type == "cuda"):
        same = (got == want).all(-1, keepdim=True).expand_as(got)
        torch.testing.assert_close(got_scores[same], want_scores[same], rtol=1e-5, atol=1e-6)


def test_packed_batches_select_per_sequence(monkeypatch):
    """index_topk(cu_seqlens=) under the key-major tile (its own tile table of `bt` positions) and the compacting
    select: each sequence's indices equal its own batched call's."""
    spec = SMALL
    mod = specgen.load(spec)
    monkeypatch.setattr(mod, "CONFIGS", with_configs(mod, make_plan(spec), True, True, bt=8, block_n=32))
    lengths = [37, 5, 30]
    gen = torch.Generator().manual_seed(1)
    H, D = spec.indexer.heads * spec.heads.kv, spec.indexer.head_dim
    total = sum(lengths)
    dev = testing.test_device()
    q = torch.randn(total, H, D, generator=gen).to(dev, mod.DTYPE)
    k = torch.randn(total, spec.heads.kv, D, generator=gen).to(dev, mod.DTYPE)
    w = torch.randn(total, H, generator=gen).to(dev, mod.DTYPE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    got = mod.index_topk(q, k, w, cu_seqlens=cu, max_seqlen=max(lengths))
    for i, n in enumerate(lengths):
        a, b = int(cu[i]), int(cu[i + 1])
        want = mod.index_topk(q[None, a:b], k[None, a:b], w[None, a:b])[0]
        assert torch.equal(got[a:b], want), (i, n)
