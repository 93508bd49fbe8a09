"""Decoding on small mirror specs (tier 2): variants the example specs do not cover, and the top-k rule.

The example specs' decode tests live in their generated test files (generated/test_<name>.py); these add linear
pooling with a position embedding, branch subsets, a non-power-of-two group, bf16 (widened dots), block selection
ranked by an indexer and MLA, each paged with a shuffled block table and q_len = 2, against the float64 reference.
"""

import dataclasses

import pytest
import torch
import triton

import specgen
from specgen.reference._core import top_units
from specgen.model.spec import load_spec, replace
from specgen.testing import test_device
from specgen.testing.decode import check_decode
from specgen.compile.plan import MIN_DOT
from specgen.compile.test_shapes import decode_prompts
from small_specs import small_token_spec

SMALL = load_spec("specs/nsa_small.yaml")


def small(name: str, **changes):
    return replace(SMALL, name=f"nsa_small_dec_{name}", **changes)


VARIANTS = {
    # MHA (one head per group: rows padded to 16) with q_len = 3 (not a power of two)
    "mha_q3": lambda: small("mha", **{"heads.q": 2, "heads.kv": 2}),
    "linear_pool_pe": lambda: small("linear_pool_pe", **{"compression.pool": "linear",
                                                         "compression.position_embedding": True}),
    "cmp_win": lambda: small("cmp_win", branches=["compression", "window"], selection=None),
    "win_only_shared": lambda: small("win_only", branches=["window"], kv="shared", compression=None, selection=None),
    "group3_l16_d8_sel8": lambda: small("group3", **{"heads.q": 6, "heads.kv": 2, "compression.block": 16,
                                                     "compression.stride": 8, "selection.block": 8}),
    "bf16_l_eq_d_eq_sel": lambda: small("bf16", dtype="bf16", **{"compression.block": 16, "compression.stride": 16,
                                                                 "selection.block": 16}),
    "token_block_indexer": lambda: small_token_spec("nsa_token_dec_block", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 3, "selection.initial": 1,
        "selection.local": 1}),
    # pages of 16 tokens: compression blocks of 32 span two pages, selection blocks are pages
    "page16_l32_d8": lambda: small("page16", **{"decode.page_size": 16, "compression.block": 32,
                                                "compression.stride": 8, "selection.block": 16}),
    # fp8 index keys in the cache (e4m3 + per-token scales), top-k 8 so the scores decide
    "dsa_fp8_indexer": lambda: replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_dec_fp8",
                                       **{"indexer.dtype": "fp8_e4m3", "indexer.head_dim": 32, "selection.top_k": 8}),
    "dsa_mla": lambda: replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_dec_mla",
                               **{"heads.kv": 1, "mla": True, "head_dim.qk": 80, "head_dim.v": 64}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_variant(variant):
    spec = VARIANTS[variant]()
    mod = specgen.load(spec)
    q_len = 3 if variant.endswith("_q3") else 2
    # Prompts end just before block boundaries (not page ones: the generated tests have those), so the steps
    # complete blocks while decoding.
    check_decode(mod, spec, decode_prompts(spec, small=False, page_boundary=False), q_len=q_len, steps=2, paged=True)


def fold_hist0(mod, ws, seqlens):
    """The top-k form "fold"'s first pass on the host, as `mod`'s index-score kernel makes it: per top-k row
    (b * QL + qi) * G + g of a workspace ws [B, G, QL, N], the 256-bin histogram of the top byte of the ordered
    32-bit keys (the prefill's `_ordered_key32`) of its competing units; zero for rows with at most k candidates."""
    unit, k, initial, local = (mod.UNIT.value, mod.TOP_K.value, mod.SEL_INITIAL.value, mod.SEL_LOCAL.value)
    B, G, QL, N = ws.shape
    hist = torch.zeros(B * QL * G, 256, dtype=torch.int32)
    for b in range(B):
        for qi in range(QL):
            t = int(seqlens[b]) - QL + qi
            n = t // unit + 1 if t >= 0 else 0
            lo = min(n, initial)
            hi = max(n - local, lo)
            if n <= k:
                continue
            for g in range(G):
                bits = ws[b, g, qi, lo:hi].float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
                key = torch.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
                hist[(b * QL + qi) * G + g] = torch.bincount(key >> 24, minlength=256).to(torch.int32)
    return hist


def decode_top_k(mod, scores, t, poison=float("nan"), segment=None, fold=False):
    """The decode top-k (`_decode_topk`: radix passes and output over segments of `segment` units, default the
    step's) on unit scores [B, QL, G, N] for the query positions t [B, QL] (the last QL positions of each
    sequence). The workspace's units that no query may select hold `poison`: the kernels must never read them (the
    step leaves them unwritten). `fold`: the first pass's histogram from the host (fold_hist0), for the top-k form
    "fold" (the step makes it in the index-score kernel)."""
    B, QL, G, N = scores.shape
    unit = mod.UNIT.value
    seqlens = (t[:, -1] + 1).to(torch.int32)
    assert torch.equal(t, seqlens.long()[:, None] - QL + torch.arange(QL)), "t must be the last QL positions"
    visible = torch.arange(N) * unit <= t[:, :, None, None]
    ws = torch.where(visible, scores, poison).permute(0, 2, 1, 3).contiguous()  # the workspace [B, G, QL, N]
    # One row more than needed, -7 everywhere: a write past a row's k slots or past the last row shows.
    idx = torch.full((B * QL * G + 1, mod.TOP_K.value), -7, dtype=torch.int32)
    dev = test_device()
    idx_dev = idx.to(dev)
    hist0 = fold_hist0(mod, ws.cpu(), seqlens.cpu()).to(dev) if fold else None
    mod._decode_topk(ws.to(dev), seqlens.to(dev), idx_dev, segment=segment, hist0=hist0)
    idx = idx_dev.cpu()
    assert (idx[-1] == -7).all(), "written past the last row"
    return idx[:-1].view(B, QL, G, -1)


def expected_top_k(spec, scores, t):
    sel = spec.selection
    unit = sel.block if sel.granularity == "block" else 1
    return torch.cat([top_units(scores[b:b + 1], t[b], unit, sel.top_k, sel.initial, sel.local)
                      for b in range(scores.shape[0])])


def test_indexer_top_k_rule_matches_the_reference_exactly_with_ties():
    """Integer scores make many exact ties: the decode top-k kernel (indexer specs) must pick the reference's
    units (lower index wins), with forced blocks, -1 padding and -0.0 tying with 0.0."""
    spec = VARIANTS["token_block_indexer"]()
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(0)
    B, QL, G, N = 3, 2, 2, 40
    scores = torch.randint(-2, 3, (B, QL, G, N), generator=gen).float()
    scores[0, 0, 0, :5] = -0.0
    t = torch.tensor([[5, 6], [200, 201], [631, 632]])     # few candidates, some, all (l' = 16)
    got = decode_top_k(mod, scores, t)
    want = expected_top_k(spec, scores, t)
    for b in range(B):
        assert torch.equal(got[b], want[b]), (b, got[b].tolist(), want[b].tolist())


# Top-k rules on small specs: token (k = 16, units past one 1024-wide chunk of the kernel), blocks of 16 (k = 3, 1
# initial + 1 local forced) and blocks whose forced units fill all k slots (1 initial + 2 local, k = 3).
TOP_K_SPECS = {
    "token": lambda: load_spec("specs/dsa_small.yaml"),
    "block": lambda: VARIANTS["token_block_indexer"](),
    "block_all_forced": lambda: small_token_spec("nsa_token_dec_forced", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 3, "selection.initial": 1,
        "selection.local": 2}),
}


@pytest.mark.parametrize("which, small_segments, topk_form", [
    *[(which, small, "radix") for which in TOP_K_SPECS for small in (False, True)],
    ("token", False, "fold_list"), ("block_all_forced", True, "fold")])
def test_decode_top_k_kernel_matches_the_selection_rule(which, small_segments, topk_form, monkeypatch):
    """The decode top-k kernels against the reference rule (`top_units`), row by row: random and tie-heavy scores,
    rows with fewer candidates than k (and exactly k, k + 1), -inf scores (some and all), NaN (a few and all:
    NaN ranks above +inf, as in the reference's sort), forced units with the best scores, a negative query position
    (no candidate), and workspace units no query may select poisoned with NaN and +inf; with the step's segments
    (the token rows span 3 of 1024 units) and with small ones (7 of 384 tokens, 4 of 48 blocks); also in the top-k
    forms `fold_list` and `fold` (the first pass's histogram from the host, fold_hist0)."""
    spec = TOP_K_SPECS[which]()
    mod = specgen.load(spec)
    monkeypatch.setattr(mod, "_DECODE", dataclasses.replace(mod._DECODE, topk_form=topk_form))
    sel = spec.selection
    unit, k = (sel.block, sel.top_k) if sel.granularity == "block" else (1, sel.top_k)
    gen = torch.Generator().manual_seed(3)
    G, QL = spec.heads.kv, 2
    N = 2600 if unit == 1 else 170
    # Last positions per sequence (QL = 2 queries each): 2 and 3 candidates, k and k + 1, many, all, none and one.
    last = [unit * 2, unit * k, unit * N // 3 + 5, unit * N - 1, 0]
    t = torch.tensor(last)[:, None] - QL + 1 + torch.arange(QL)
    B = len(last)
    scores = torch.randn(B, QL, G, N, generator=gen)
    ties = torch.randint(-2, 3, (B, QL, G, N), generator=gen).float()
    scores[:, :, 1:] = ties[:, :, 1:]                                 # kv group 1: integer scores, many ties
    scores[2, 0, 0, :7] = -0.0
    scores[2, 0, 1] = torch.where(torch.rand(N, generator=gen) < 0.4, float("-inf"), scores[2, 0, 1])
    scores[2, 1, 0] = float("-inf")                                   # every candidate -inf: the lowest indices
    scores[3, 0, 0, torch.randperm(N, generator=gen)[:5]] = float("nan")
    scores[3, 1, 1] = float("nan")
    # Forced units that would win by score anyway: they take their slots once, the rest still fill k.
    scores[2, 0, 0, 0] = 50.0
    scores[3, 1, 0, t[3, 1] // unit] = 50.0
    segment = (384 if unit == 1 else 48) if small_segments else None
    for poison in (float("nan"), float("inf")):
        got = decode_top_k(mod, scores, t, poison, segment, fold=topk_form.startswith("fold"))
        want = expected_top_k(spec, scores, t)
        for b in range(B):
            for qi in range(QL):
                assert torch.equal(got[b, qi], want[b, qi]), (which, b, qi, got[b, qi].tolist(), want[b, qi].tolist())
    assert t[4, 0] < 0 and (got[4, 0] == -1).all()


@pytest.mark.parametrize("segment, sum_segments, topk_form", [(4, 4, "radix"), (7, 16, "radix"),
                                                             (7, 16, "fold_list")])
def test_decode_top_k_segments_split_rows_exactly(segment, sum_segments, topk_form, monkeypatch):
    """The decode top-k splits each row into segments (radix passes on per-segment histograms, then each segment
    writes its winners at the offset the earlier segments leave): with segments of 4 and 7 blocks, rows of 40
    blocks span up to 10 of them (partial histograms summed 4 at a time in the first case), the 5 initial and 6
    local forced blocks fall in several segments, and runs of tied scores at the threshold straddle segment
    boundaries (lowest index first across segments). Every row must be the reference's, as with one segment; also in
    the top-k form `fold_list` (32-bit keys, the first pass's histogram given, pass 3 and the output on pass 2's
    lists)."""
    spec = small_token_spec("nsa_token_dec_segments", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 16, "selection.initial": 5,
        "selection.local": 6})
    mod = specgen.load(spec)
    monkeypatch.setattr(mod, "DECODE_TOPK_SUM_SEGMENTS", sum_segments)
    d = dataclasses.replace(mod._DECODE, topk_form=topk_form)
    monkeypatch.setattr(mod, "_DECODE", d)
    fold = topk_form.startswith("fold")
    unit, N = 16, 40
    gen = torch.Generator().manual_seed(11)
    G, QL = spec.heads.kv, 2
    # Candidates per row (QL = 2 queries each): 40, 40; 31, 31; k, k + 1.
    last = [unit * N - 1, unit * 30 + 7, unit * 16]
    t = torch.tensor(last)[:, None] - QL + 1 + torch.arange(QL)
    B = len(last)
    scores = torch.randint(-1, 2, (B, QL, G, N), generator=gen).float()   # integer scores: ties everywhere
    scores[0, 0, 0] = 0.0        # all tied: the lowest competing blocks, across segments
    # 2 clear winners in different segments, then a run of ties (blocks 13..22) of which 3 are taken.
    scores[0, 1, 0] = -1.0
    scores[0, 1, 0, [9, 26]] = 10.0
    scores[0, 1, 0, 13:23] = 1.0
    # Forced blocks with the worst scores (-inf; NaN ranks above): still taken, once.
    scores[1, 0, 0] = torch.randn(N, generator=gen)
    scores[1, 0, 0, :5] = float("-inf")
    scores[1, 0, 0, [7, 12, 19]] = float("nan")
    scores[1, 1, 1] = torch.where(torch.rand(N, generator=gen) < 0.5, float("-inf"), scores[1, 1, 1])
    scores[1, 1, 0] = float("-inf")
    want = expected_top_k(spec, scores, t)
    one = decode_top_k(mod, scores, t, segment=N, fold=fold)
    got = decode_top_k(mod, scores, t, segment=segment, fold=fold)
    for b in range(B):
        for qi in range(QL):
            assert torch.equal(one[b, qi], want[b, qi]), (b, qi, one[b, qi].tolist(), want[b, qi].tolist())
            assert torch.equal(got[b, qi], want[b, qi]), (segment, b, qi, got[b, qi].tolist(), want[b, qi].tolist())
    assert got[0, 1, 0].tolist() == [0, 1, 2, 3, 4, 9, 13, 14, 15, 26, 34, 35, 36, 37, 38, 39]


def test_decode_block_scores_are_the_visible_tokens_log_sum_exp(monkeypatch):
    """Block granularity: at every block a new query may select, the step's workspace holds the log-sum-exp of the
    index scores of the block's tokens up to the query (later tokens, in the cache already, count as -inf), and
    the step's selection is the top-k kernel's on that workspace (no forced blocks here: every score counts)."""
    from specgen.reference.indexer import indexer_block_scores, indexer_scores_chunk

    spec = replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_dec_blocks", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 3, "selection.initial": 0,
        "selection.local": 0})
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(5)
    QL, lens = 2, [21, 38, 75]    # the queries' own blocks are partial and hold the 2nd's token, hidden from the 1st
    B, T, G = len(lens), max(lens), spec.heads.kv
    hi = G * spec.indexer.heads

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(mod.DTYPE)

    dev = test_device()
    tokens = {name: rand(B, T, G, dim) for name, dim in mod.CACHE_TENSORS.items()}
    cache = mod.DSACache(B, max_seqlen=T + 3, device=dev).prefill(
        seqlens=lens, **{name: x.to(dev) for name, x in tokens.items()})
    q, q_idx, w_idx = rand(B, QL, spec.heads.q, spec.head_dim.qk), rand(B, QL, hi, spec.indexer.head_dim), rand(B, QL, hi)
    seen, real = {}, mod._decode_topk

    def spy(ws, *args, **kw):
        seen["ws"] = ws.cpu()
        return real(ws, *args, **kw)

    monkeypatch.setattr(mod, "_decode_topk", spy)
    _, idx = mod.dsa_decode(q.to(dev), cache, q_idx=q_idx.to(dev), w_idx=w_idx.to(dev), return_indices=True)
    idx = idx.cpu()
    ws = seen["ws"].permute(0, 2, 1, 3)            # [B, QL, G, units]
    unit = spec.selection.block
    for b, L in enumerate(lens):
        t = torch.arange(L - QL, L)
        I = indexer_scores_chunk(spec, q_idx[b:b + 1].double(), tokens["k_idx"][b:b + 1, :L].double(),
                                 w_idx[b:b + 1].double(), t)
        want = indexer_block_scores(spec, I)[0]                   # [QL, G, ceil(L / l')]
        for qi in range(QL):
            n = int(t[qi]) // unit + 1                            # the blocks the query may select
            torch.testing.assert_close(ws[b, qi, :, :n].double(), want[qi, :, :n], rtol=1e-4, atol=1e-4)
        rule = top_units(ws[b:b + 1], t, unit, spec.selection.top_k)
        assert torch.equal(idx[b:b + 1], rule), (b, idx[b].tolist(), rule.tolist())


@pytest.mark.parametrize("variant", ["paper_ratios", "l_eq_d"])
def test_block_selection_kernel_matches_the_reference_exactly_with_ties(variant):
    """The NSA decode's selection kernel (overlap rule + top-n in registers) on integer group probabilities, where
    sums are exact and ties frequent: the reference's choice exactly (forced blocks, lower index wins, padding)."""
    from specgen.reference.nsa import overlap_weights

    changes = {} if variant == "paper_ratios" else {"compression.block": 16, "compression.stride": 16}
    spec = small(f"selkernel_{variant}", **{"selection.top_k": 5, "selection.local": 2, **changes})
    mod = specgen.load(spec)
    cmp_, sel = spec.compression, spec.selection
    gen = torch.Generator().manual_seed(1)
    B, QL, G, T = 3, 2, spec.heads.kv, 200
    lengths = torch.tensor([7, 150, 200], dtype=torch.int32)
    NC = (T - cmp_.block) // cmp_.stride + 1
    n_sel = -(-T // sel.block)
    P = torch.randint(0, 3, (B, QL, G, NC), generator=gen).float()
    t = lengths.long()[:, None] - QL + torch.arange(QL)[None, :]
    visible = torch.arange(NC) * cmp_.stride + cmp_.block - 1 <= t[:, :, None, None]
    P = torch.where(visible, P, 0.0)
    dev = test_device()
    idx = torch.full((B, QL, G, sel.top_k), 99, dtype=torch.int32, device=dev)
    mod._decode_select_blocks_kernel[(B * QL * G,)](P.to(dev), lengths.to(dev), idx, QL, NC, n_sel,
                                                    NSEL_PAD=triton.next_power_of_2(n_sel))
    idx = idx.cpu()
    S = torch.einsum("bqgi,ij->bqgj", P.double(), overlap_weights(spec, NC, n_sel))
    for b in range(B):
        want = top_units(S[b:b + 1], t[b], sel.block, sel.top_k, sel.initial, sel.local)
        assert torch.equal(idx[b:b + 1], want), (b, idx[b].tolist(), want.tolist())


@pytest.mark.parametrize("field,value,words", [("decode.page_size", 24, "power of two"),
                                               ("decode.page_size", 8, "at least 16"),
                                               ("decode.max_q_len", 0, "outside 1..64"),
                                               ("decode.max_q_len", 65, "outside 1..64")])
def test_decode_spec_errors_name_the_field_and_the_fix(field, value, words):
    from specgen.model.errors import SpecError
    from specgen.model.spec import spec_from_yaml

    section, key = field.split(".")
    with pytest.raises(SpecError) as info:
        spec_from_yaml(f"name: x\n{section}:\n  {key}: {value}\n", file="x.yaml")
    text = str(info.value)
    assert field in text and words in text and "fix:" in text and "x.yaml:3" in text, text


def test_decode_section_defaults():
    spec = load_spec("specs/nsa_paper.yaml")
    assert (spec.decode.max_q_len, spec.decode.page_size) == (4, 64)


@pytest.mark.parametrize("tiles", [(16, 16, 1, 4), (2, 16, 8, 1), (2, 16, 64, 2), (4, 64, 2, 2)],
                         ids=["one_split", "8_splits", "64_splits", "2_splits"])
def test_decode_epilogue_tilings_match_the_reference(tiles, monkeypatch):
    """The decode epilogue's tilings: one split at a time (batches that fill the GPU), 8 splits per load in row
    tiles of 2 (batch 1), 64 (combine_sb's largest) and 2 splits per load; 3 splits per branch, so every tiling masks a partial group of
    splits, and the 64-wide column tile masks half its columns (DV 32)."""
    from specgen import runtime

    spec = load_spec("specs/nsa_small.yaml")
    mod = specgen.load(spec)
    monkeypatch.setattr(runtime, "decode_combine_tiles", lambda *args: tiles)
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=1, steps=1, num_splits=3, compare_prefill=False)


@pytest.mark.parametrize("name,prompt,paged", [("nsa_mqa", 47, False), ("nsa_mqa", 47, True),
                                               ("nsa_config_a", 127, False), ("nsa_small", 11, True)])
def test_append_pools_a_block_it_completes_from_the_blocks_own_rows(name, prompt, paged):
    """A compression block completed by an appended token is the pool of its own l tokens, for kv: shared (k/v
    read from the full per-token rows) and kv: independent (from the ring). Issue 14: shared specs read the ring's
    rows, which they do not have (nsa_mqa prefill 47 + 1: rel. err ~0.9)."""
    spec = load_spec(f"specs/{name}.yaml")
    mod = specgen.load(spec)
    dev = test_device()
    gen = torch.Generator().manual_seed(14)
    T = prompt + 1
    names = list(mod.CACHE_TENSORS)
    x = {n: torch.randn(1, T, spec.heads.kv, d, generator=gen).to(torch.float16).to(dev) for n, d in mod.CACHE_TENSORS.items()}
    page = spec.decode.page_size
    if paged:
        pages = -(-T // page)
        table = torch.randperm(pages + 1, generator=gen)[:pages].to(torch.int32)[None].to(dev)
        cache = mod.NSACache(1, num_pages=pages + 1, block_table=table, device=dev)
    else:
        cache = mod.NSACache(1, max_seqlen=T + 3, device=dev)
    for t in cache.tensors.values():
        t.fill_(float("nan"))
    x = {n: v.to(mod.DTYPE) for n, v in x.items()}
    cache.prefill(**{n: x[n][:, :prompt] for n in names})
    cache.append(**{n: x[n][:, prompt:] for n in names})
    l, d = spec.compression.block, spec.compression.stride
    i = (T - l) // d
    assert i * d + l == T, "the appended token must complete a block"
    k_cmp = "k" if spec.kv == "shared" else "k_cmp"
    want = x[k_cmp][0, i * d:i * d + l].double().mean(0)
    err = ((cache.kc[0, i].double() - want).norm() / want.norm()).item()
    assert err < 1e-2, f"{name}: block {i} pooled with rel. err {err:.3g}"


@pytest.mark.parametrize("path", sorted(p for p in __import__("glob").glob("specs/*.yaml") if ".sweep." not in p))
def test_generated_decode_cases_complete_blocks_while_decoding(path):
    """Every committed spec's generated decode cases (CPU and GPU prompts), contiguous and paged, complete at least
    two compression blocks and one selection block while decoding (issue 14: the cases never did, so a block
    pooled from the wrong rows went unseen); one case completes a block where a page ends."""
    from specgen.compile.render import SMALL_SPEC_WIDTH
    from specgen.compile.test_shapes import decode_cases, decode_completions, decode_gpu_prompts

    spec = load_spec(path)
    small_spec = spec.heads.q * spec.head_dim.qk <= SMALL_SPEC_WIDTH
    cases = [(layout, q_len, steps, decode_prompts(spec, small_spec))
             for layout, q_len, steps, _, _ in decode_cases(spec, small_spec)]
    cases += [("gpu", q_len, 2, decode_gpu_prompts(spec)) for q_len in (1, spec.decode.max_q_len)]
    coincide = mid = 0
    for layout, q_len, steps, prompts in cases:
        done = decode_completions(spec, prompts, q_len, steps)
        if spec.needs_compressed_kv:
            assert done["compression"] >= 2, (layout, q_len, prompts, done)
        if spec.selection is not None and spec.selection.granularity == "block":
            assert done["selection"] >= 1, (layout, q_len, prompts, done)
        coincide += done["page_and_block"]
        mid += done["mid_step"] if q_len > 1 else 0
    if spec.needs_compressed_kv or spec.selection.granularity == "block":
        assert coincide >= 1
    if spec.needs_compressed_kv:
        assert mid >= 1, "no multi-token step crosses a compression boundary after its first token"


def with_decode(monkeypatch, mod, **changes):
    """Points `mod`'s decode step and cache class at a copy of its descriptor with `changes` (e.g. the scoring path
    or the compression tile), for this test only."""
    import dataclasses

    d = dataclasses.replace(mod._DECODE, **changes)
    monkeypatch.setattr(mod, "_DECODE", d)
    monkeypatch.setattr(mod.NSACache, "DESCRIPTOR", d)
    return d


PARTIALS = {  # variant: (spec changes, compression tile): NSB = tile / (l'/d) selection blocks per tile, spill
    "paper_ratios": ({}, 8),                                                      # NSB 2, spill 1
    "spill_2_back_2": ({"compression.block": 32, "compression.stride": 8}, 2),    # NSB 1, spill 2: two tiles back
    "l_eq_d": ({"compression.block": 16, "compression.stride": 16}, 4),           # NSB 4, no spill
}


def gpu_compression_tile(tile: int, gpu_tile: int | None = None, why: str = "") -> int:
    """The compression tile a decode test runs on the test device: `tile` under the interpreter; on a GPU, where
    it is below MIN_DOT, `gpu_tile` (None: the test is skipped there, `why` saying what a tile of 16 would lose).
    Compiled for a GPU, tl.dot refuses a reduced dimension below 16 (MIN_DOT; Triton's NVIDIA backend,
    min_dot_size: "Input shapes should have ... K >= 16"), and the compression kernel's P V and partial-sum
    products reduce over the tile's keys; the interpreter has no minimum. The plan never picks such a tile
    (plan._decode_plan: 64 keys; decode_step.CMP_FORMS: 32 or 64)."""
    if test_device() == "cpu" or tile >= MIN_DOT:
        return tile
    if gpu_tile is None:
        pytest.skip(f"compression tiles of {tile} keys: a GPU's tl.dot needs at least {MIN_DOT} along the tile's "
                    f"keys (the plan never picks fewer than 32); {why}; the CPU run (the interpreter) checks it")
    return gpu_tile


def partials_case(variant: str, T: int = 200, lengths=(7, 150, 200)):
    """Inputs of the partials path's top-n built from integer group probabilities (exact in fp32, ties frequent):
    per tile and head, sums scaled by 2^-ref with integer refs, each head's lse exactly 0 (one split at 0, the
    others empty), one head that saw no block (lse +inf: its sums must not count), tiles the compression kernel
    did not walk poisoned with NaN. (mod, kernel args as the step passes them, launch constants, check(idx)):
    check asserts idx [B * QL * HKV, TOP_K] (on the CPU) is the reference's choice exactly (forced blocks, lower
    index wins, padding)."""
    from specgen.reference.nsa import overlap_weights

    changes, tile = PARTIALS[variant]
    spec = small(f"selpart_{variant}", **{"selection.top_k": 5, "selection.local": 2, **changes})
    mod = specgen.load(spec)
    cmp_, sel = spec.compression, spec.selection
    d = mod._DECODE
    nsb = tile // d.overlap_chunks
    width = nsb + d.overlap_spill
    gen = torch.Generator().manual_seed(2)
    B, QL, G, HQ, NSPLIT = len(lengths), 2, spec.heads.kv, spec.heads.q, 3
    group = HQ // G
    lengths = torch.tensor(lengths, dtype=torch.int32)
    NCV = (T - cmp_.block) // cmp_.stride + 1
    n_sel, n_tiles = -(-T // sel.block), -(-NCV // tile)
    t = lengths.long()[:, None] - QL + torch.arange(QL)[None, :]
    visible = torch.arange(NCV) * cmp_.stride + cmp_.block - 1 <= t[:, :, None, None]
    p = torch.where(visible, torch.randint(0, 3, (B, QL, HQ, NCV), generator=gen).double(), 0.0)
    lse = torch.full((NSPLIT, B, QL, HQ), float("-inf"))
    lse[1] = 0.0
    lse[:, 1, :, 0] = float("-inf")  # sequence 1, head 0: no block seen; its sums below are garbage
    ow = overlap_weights(spec, NCV, max(n_sel, n_tiles * nsb + d.overlap_spill))
    ref = -torch.randint(0, 3, (B, QL, HQ, n_tiles), generator=gen).double()
    sums = torch.stack([torch.einsum("bqhi,ic->bqhc", p[..., k * tile:(k + 1) * tile],
                                     ow[k * tile:(k + 1) * tile, k * nsb:k * nsb + width])
                        for k in range(n_tiles)], dim=3) * torch.exp2(-ref)[..., None]
    sums[1, :, 0] = 5.0
    walked = [-(-max(0, (n - cmp_.block) // cmp_.stride + 1) // tile) for n in lengths.tolist()]
    for b, w in enumerate(walked):
        sums[b, :, :, w:] = float("nan")
        ref[b, :, :, w:] = float("nan")
    p[1, :, 0] = 0.0
    dev = test_device()
    args = (sums.float().to(dev), ref.float().to(dev), lse.to(dev), NSPLIT, lengths.to(dev))
    consts = dict(B=B, QL=QL, NCV=NCV, n_sel=n_sel, tile=tile, GP=triton.next_power_of_2(group),
                  BACK=-(-d.overlap_spill // nsb))
    S = torch.einsum("bqgi,ij->bqgj", p.view(B, QL, G, group, NCV).sum(3), ow[:, :n_sel])

    def check(idx):
        idx = idx.view(B, QL, G, -1)
        for b in range(B):
            want = top_units(S[b:b + 1], t[b], sel.block, sel.top_k, sel.initial, sel.local)
            assert torch.equal(idx[b:b + 1], want), (b, idx[b].tolist(), want.tolist())
    return mod, args, consts, check


@pytest.mark.parametrize("variant", list(PARTIALS))
def test_partials_selection_kernel_matches_the_reference_exactly_with_ties(variant):
    """The partials path's selection kernel (`_decode_select_partials_kernel`) on `partials_case`'s sums: the
    reference's choice exactly."""
    mod, args, c, check = partials_case(variant)
    rows = c["B"] * c["QL"] * mod._DECODE.hkv
    idx = torch.full((rows + 1, mod._DECODE.top_k), 99, dtype=torch.int32, device=args[0].device)
    mod._decode_select_partials_kernel[(rows,)](
        *args, idx, c["B"] * c["QL"] * mod._DECODE.hq, c["QL"], c["NCV"], c["n_sel"], GP=c["GP"], BLOCK_N=c["tile"],
        NSPLIT_PAD=4, NSEL_PAD=triton.next_power_of_2(c["n_sel"]), BACK=c["BACK"])
    idx = idx.cpu()
    assert (idx[-1] == 99).all(), "written past the last row"
    check(idx[:-1])


# The chunked top-n forms (docs/decode.md "Launch forms"; runtime.decode_step.TOPN_FORMS): chunks of a row's
# selection blocks in their own programs, each keeping its TOP_K_PAD largest keys, merged by a second launch or by
# the row's last program (an atomic ticket).
TOPN_CHUNKS = {  # (blocks a program at most, chunks a row aimed at): 38 blocks of top-5 (TOP_K_PAD 8)
    "cb8_5chunks": (128, 16),   # chunks of TOP_K_PAD: each keeps all its blocks
    "cb16_3chunks": (16, 2),    # chunks of 16 cut to their top 8
    "cb64_1chunk": (128, 1),    # one chunk: the merge sees one list
}


def with_topn_chunks(monkeypatch, most_aim):
    from specgen.runtime import decode_step

    if most_aim is not None:
        monkeypatch.setattr(decode_step, "TOPN_FORMS", {
            name: (None if f is None else (*most_aim, f[2])) for name, f in decode_step.TOPN_FORMS.items()})


@pytest.mark.parametrize("variant, form, chunks", [
    ("paper_ratios", "chunked_ticket", "cb8_5chunks"), ("paper_ratios", "chunked", "cb16_3chunks"),
    ("spill_2_back_2", "chunked", "cb8_5chunks"), ("spill_2_back_2", "chunked_ticket", "cb16_3chunks"),
    ("l_eq_d", "chunked_ticket", "cb64_1chunk"), ("l_eq_d", "chunked", "cb16_3chunks")])
def test_topn_chunked_forms_match_the_reference_exactly_with_ties(variant, form, chunks, monkeypatch):
    """The chunked top-n forms (`decode_step.topn`: `_decode_topn_chunks_kernel`, then `_decode_topn_merge_kernel`
    or the ticket) on `partials_case`'s sums over 38 selection blocks (ties, forced blocks, a head with no block,
    NaN-poisoned tiles): the reference's choice exactly, the "row" kernel's bits, the tickets back at 0."""
    from specgen.runtime import decode_step

    with_topn_chunks(monkeypatch, TOPN_CHUNKS[chunks])
    mod, args, c, check = partials_case(variant, T=600, lengths=(7, 350, 600))
    dev = args[0].device
    plan = mod._DECODE
    d = dataclasses.replace(plan, topn_form=form, split_tiles={**plan.split_tiles, "compression": c["tile"]})
    cb, nch, _, ticket = decode_step.topn_chunks(d, c["n_sel"])
    assert (cb, nch) == {"cb8_5chunks": (8, 5), "cb16_3chunks": (16, 3), "cb64_1chunk": (64, 1)}[chunks]
    assert ticket == (form == "chunked_ticket")
    tickets = torch.zeros(64, dtype=torch.int32, device=dev)
    got = {}
    for name, desc in (("row", dataclasses.replace(d, topn_form="row")), (form, d)):
        idx = torch.full((c["B"], c["QL"], d.hkv, d.top_k), 99, dtype=torch.int32, device=dev)
        decode_step.topn(desc, *args, idx, tickets, c["QL"], c["NCV"], c["n_sel"])
        assert not tickets.any(), tickets.tolist()
        got[name] = idx.cpu()
    check(got[form].view(-1, d.top_k))
    assert torch.equal(got[form], got["row"])


@pytest.mark.parametrize("variant", ["paper_ratios", "spill_2_back_2"])
def test_partials_and_logits_paths_select_alike_over_many_tiles(variant, monkeypatch):
    """The compression kernel's partial sums (its tile-to-selection-block map, the spill into the next tiles,
    per-tile refs across splits) against the logits path on the same cache: the same blocks and the same output,
    with compression tiles small enough that a step walks many of them (ragged lengths, q_len 2, 3 splits). On a
    GPU paper_ratios runs tiles of 16 (NSB 4, spill 1: three tiles a step, the spill still crossing into the next
    tile); spill_2_back_2 is the interpreter's only (at 16 keys a tile holds 8 blocks: the spill of 2 reaches one
    tile back, not two)."""
    changes, tile = PARTIALS[variant]
    if variant == "paper_ratios":
        tile = gpu_compression_tile(tile, MIN_DOT)
    else:
        tile = gpu_compression_tile(tile, None, "a tile of 16 holds 8 of its selection blocks: the spill of 2 "
                                                "reaches one tile back, not two")
    spec = small(f"selpart_{variant}", **{"selection.top_k": 5, "selection.local": 2, **changes})
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(3)
    B, QL, T = 2, 2, 180
    dev = test_device()
    cache = mod.NSACache(B, max_seqlen=T, device=dev)
    hkv, hq = spec.heads.kv, spec.heads.q
    cache.prefill(seqlens=torch.tensor([T - 37, T - QL], dtype=torch.int32),
                  **{n: torch.randn(B, T - QL, hkv, w, generator=gen).to(dev, mod.DTYPE)
                     for n, w in mod.CACHE_TENSORS.items()})
    cache.append(**{n: torch.randn(B, QL, hkv, w, generator=gen).to(dev, mod.DTYPE)
                    for n, w in mod.CACHE_TENSORS.items()})
    q = (torch.randn(B, QL, hq, spec.head_dim.qk, generator=gen) * 2).to(dev, mod.DTYPE)
    gates = torch.rand(B, QL, hq, len(spec.branches), generator=gen).to(dev, mod.DTYPE)
    ncv = (T - spec.compression.block) // spec.compression.stride + 1
    assert -(-ncv // tile) >= 3 and mod._DECODE.overlap_spill >= 1, "fewer than 3 tiles a step, or no spill"
    got = {}
    for scoring in ("logits", "partials"):
        # (the split launch form for both: "auto", the plan's, runs the whole form's one split on the partials path)
        with_decode(monkeypatch, mod, scoring=scoring, form="split", topn_form="row",
                    split_tiles={**mod._DECODE.split_tiles, "compression": tile})
        got[scoring] = mod.nsa_decode(q, cache, gates=gates, num_splits=3, return_indices=True)
    assert torch.equal(got["partials"][1], got["logits"][1]), (got["partials"][1], got["logits"][1])
    assert torch.equal(got["partials"][0], got["logits"][0])
    assert (got["partials"][1] >= 0).sum() > B * QL * hkv * 3, "too few selected blocks to compare"


def test_partials_path_matches_the_reference_over_many_tiles(monkeypatch):
    """Decoding with compression tiles of 8 pooled keys (the partial sums span many tiles and splits, the spill
    crosses tiles) against the float64 reference, paged. The interpreter's only: the prompts' 16 pooled keys at
    most are one tile of the 16 a GPU's tl.dot needs."""
    spec = SMALL
    mod = specgen.load(spec)
    tile = gpu_compression_tile(8, None, "the prompts' 16 pooled keys at most would be one tile, no spill across")
    with_decode(monkeypatch, mod, split_tiles={**mod._DECODE.split_tiles, "compression": tile})
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=True, num_splits=3,
                 compare_prefill=False)


def test_bench_scoring_path_swaps_the_descriptor_and_restores_it():
    """`specgen bench --decode --decode-scoring`: the step and the cache class see the other path's descriptor
    inside the block, the plan's after it (also after an error)."""
    from specgen.perf.bench_decode import decode_forms, scoring_path

    mod = specgen.load(SMALL)
    plan = mod._DECODE
    assert plan.scoring == "partials"
    with scoring_path(mod, "partials") as d:
        assert d is plan
    with pytest.raises(RuntimeError):
        with scoring_path(mod, "logits") as d:
            assert d.scoring == "logits" and mod._DECODE is d and mod.NSACache.DESCRIPTOR is d
            raise RuntimeError
    assert mod._DECODE is plan and mod.NSACache.DESCRIPTOR is plan
    with pytest.raises(ValueError, match="partials"), scoring_path(mod, "logits"), decode_forms(mod, "fused"):
        pass  # `specgen bench` leaves this pair out
    assert mod._DECODE is plan
    with decode_forms(mod, "fused") as d:
        assert d.form == "fused" and d.scoring == "partials" and mod._DECODE is d
    assert mod._DECODE is plan and plan.form == "auto"


# The fused launch form (docs/decode.md "Launch forms"): compression + window in one launch, the epilogue split
# between the top-n launch and the selection branch's last split program per row group (atomic tickets).
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fused_form_matches_the_reference(paged, monkeypatch):
    """The fused form against the float64 reference (and, contiguous, the prefill kernel): ragged prompts that
    complete blocks while decoding, q_len 2, uneven splits."""
    spec = SMALL
    mod = specgen.load(spec)
    with_decode(monkeypatch, mod, form="fused")
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=paged, num_splits=3,
                 compare_prefill=not paged)


FUSED = {  # spec, q_len, splits, paged
    "small_q1": (lambda: SMALL, 1, 3, False),
    "small_q3_paged": (lambda: SMALL, 3, 2, True),
    "no_window_group3": (lambda: small("fused_nowin", branches=["compression", "selection"], window=None,
                                       **{"heads.q": 6, "heads.kv": 2}), 2, None, False),
}


def launch_spy(kernel, record):
    """A stand-in for a Triton kernel that calls `record(grid, kwargs)` at each launch, then launches it: the
    forms' tests check that their kernels really ran (not another form's under its name) with the settings asked."""
    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                record(grid, kw)
                return kernel[grid](*args, **kw)
            return launch
    return Spy()


def install_step(mod, d, q, cache, gates, splits):
    """Make descriptor `d` the module's (its decode step and its cache class take it) and return the step it runs:
    out (poisoned with NaN first), lse and indices of `q` against `cache`."""
    mod._DECODE, mod.NSACache.DESCRIPTOR = d, d
    B, QL, hq = q.shape[0], q.shape[1], q.shape[2]
    out = torch.full((B, QL, hq, d.dv), float("nan"), dtype=mod.DTYPE, device=q.device)

    def step():
        return mod.nsa_decode(q, cache, gates=gates, out=out, num_splits=splits, return_lse=True,
                              return_indices=True)
    return step


def step_case(mod, spec, lengths, QL, paged, dev):
    """One NSA cache holding `lengths` tokens plus QL appended (paged: a shuffled page table), and a step's q and
    gates, from a fixed seed (the forms compared on it see the same inputs)."""
    gen = torch.Generator().manual_seed(5)
    B = len(lengths)
    if paged:
        from specgen.testing.decode import shuffled_block_table
        num_pages, table = shuffled_block_table([n + QL for n in lengths], spec.decode.page_size, gen)
        cache = mod.NSACache(B, num_pages=num_pages, block_table=table.to(dev), device=dev)
    else:
        cache = mod.NSACache(B, max_seqlen=max(lengths) + QL, device=dev)
    hkv, hq = spec.heads.kv, spec.heads.q
    cache.prefill(seqlens=torch.tensor(lengths, dtype=torch.int32),
                  **{n: torch.randn(B, max(lengths), hkv, w, generator=gen).to(dev, mod.DTYPE)
                     for n, w in mod.CACHE_TENSORS.items()})
    cache.append(**{n: torch.randn(B, QL, hkv, w, generator=gen).to(dev, mod.DTYPE)
                    for n, w in mod.CACHE_TENSORS.items()})
    q = (torch.randn(B, QL, hq, spec.head_dim.qk, generator=gen) * 2).to(dev, mod.DTYPE)
    gates = torch.rand(B, QL, hq, len(spec.branches), generator=gen).to(dev, mod.DTYPE)
    return cache, q, gates


def replays_equal(step, want, cache, what):
    """CUDA: `step` captured in a graph (after a warm-up on a side stream) and replayed three times into poisoned
    outputs gives `want` bit for bit each time and leaves the cache's tickets (NSA caches) at 0."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        res = step()
    for _ in range(3):
        for x in res:
            x.fill_(-1 if x.dtype == torch.int32 else float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for x, y in zip(res, want):
            assert torch.equal(x, y), f"{what}: a replayed step differs from the eager one"
        tickets = getattr(cache, "tickets", None)  # a DSA cache has no ticketed kernel
        assert tickets is None or not tickets.any(), f"{what} replay: tickets not reset: {tickets.tolist()}"
        counters = getattr(cache, "persist_counters", None)
        assert counters is None or not counters.any(), f"{what} replay: counters not reset: {counters.tolist()}"


def fused_against_split(mod, spec, lengths, QL, splits, paged, dev, graph=False, form="fused"):
    """On one cache (lengths + QL tokens each): the split form's step, then the fused form's twice; the fused form
    must pick the same blocks, give the same output and lse within the output dtype's rounding (it sums the
    branches in another order), leave its tickets at 0, and give the same bits again. `graph` (CUDA): the fused
    step is also captured and replayed three times, each bit for bit the eager step. `form` "cw": the same for the
    split form with the compression and window in one launch (its window runs at the compression's warps).
    `form` "persist": every kernel spied, the persist step launches its one kernel and nothing else, leaves its
    counters at 0, and on the CPU gives the split form's bits (the same programs at the same splits); on a GPU one
    near-tied query may pick other blocks (its top-n runs at 8 warps)."""
    cache, q, gates = step_case(mod, spec, lengths, QL, paged, dev)
    B, hkv, hq = len(lengths), spec.heads.kv, spec.heads.q
    plan = mod._DECODE
    got = {}
    launched = []  # the fused kernels' launches: the fused form really ran (not the split form under its name)

    def spy(name, kernel):
        return launch_spy(kernel, lambda grid, kw: launched.append(name))
    kernels = dict(fused_kernels={name: spy(name, k) for name, k in plan.fused_kernels.items()})
    if form == "persist":  # every kernel: the step's launches are exactly the persist kernel's one
        others = ("combine_kernel", "select_partials_kernel", "topn_chunks_kernel", "topn_merge_kernel",
                  "group_probs_kernel", "select_blocks_kernel", "whole_kernel")
        kernels.update(persist_kernel=spy("persist", plan.persist_kernel),
                       branch_kernels={k: spy(k, v) for k, v in plan.branch_kernels.items()},
                       **{f: spy(f, getattr(plan, f)) for f in others})
    try:
        for f in ("split", form, form):
            d = __import__("dataclasses").replace(plan, form=f, **kernels)
            step = install_step(mod, d, q, cache, gates, splits)
            launched.clear()
            res = [x.clone() for x in step()]
            assert not cache.tickets.any(), f"{f}: tickets not reset: {cache.tickets.tolist()}"
            assert not cache.persist_counters.any(), f"{f}: counters not reset: {cache.persist_counters.tolist()}"
            if form == "persist":
                assert launched == ["persist"] if f == "persist" else "persist" not in launched, (f, launched)
            else:
                assert launched == ([] if f == "split" else ["cmp_win"] * ("window" in spec.branches)
                                    + (["select_merge", "selection"] if f == "fused" else [])), (f, launched)
            got.setdefault(f, []).append(res)
        if graph:
            replays_equal(step, got[form][0], cache, form)
    finally:
        mod._DECODE, mod.NSACache.DESCRIPTOR = plan, plan
    (o_s, lse_s, idx_s), = got["split"]
    (o_f, lse_f, idx_f), again = got[form]
    # A GPU's persist kernel runs the top-n at the compression's 8 warps, not 4: its head lse may sum in another
    # order, so a query whose partial sums tie within that rounding may pick another block (as the whole form's).
    same = (idx_f == idx_s).all(-1).all(-1)  # [B, QL]: every group of the query picked the same blocks
    assert int((~same).sum()) <= (1 if form == "persist" and dev != "cpu" else 0), (idx_f, idx_s)
    assert (idx_s >= 0).sum() > B * QL * hkv * 2, "too few selected blocks to compare"
    assert torch.isfinite(o_f).all()
    eps = torch.finfo(mod.DTYPE).eps
    o_ref = o_s[same].float()
    torch.testing.assert_close(o_f[same].float(), o_ref, rtol=2 * eps, atol=2 * eps * o_ref.abs().max().item())
    torch.testing.assert_close(lse_f[same], lse_s[same], rtol=1e-5, atol=1e-5)
    for x, y in zip((o_f, lse_f, idx_f), again):
        assert torch.equal(x, y), "a second fused step differs (tickets left set?)"
    if form == "persist" and dev == "cpu":  # the split form's programs and combine: its bits (a GPU: other warps)
        assert torch.equal(o_f, o_s) and torch.equal(lse_f, lse_s)


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_form_equals_the_split_form_and_replays(case):
    """The fused form against the split form on the same cache, B 3 with ragged lengths (one sequence too short
    for a selection choice), contiguous and paged, q_len 1 to 3, with and without a window branch
    (`fused_against_split`)."""
    make, QL, splits, paged = FUSED[case]
    spec = make()
    fused_against_split(specgen.load(spec), spec, [100, 21, 150 - QL], QL, splits, paged, test_device())


@pytest.mark.parametrize("case", ["small_q1", "small_q3_paged"])
def test_cw_form_equals_the_split_form(case):
    """The "cw" form (the split form with the compression and window branches in the fused form's one launch)
    against the split form: the same blocks, the output within rounding, deterministic (`fused_against_split`)."""
    make, QL, splits, paged = FUSED[case]
    spec = make()
    fused_against_split(specgen.load(spec), spec, [100, 21, 150 - QL], QL, splits, paged, test_device(), form="cw")


# The persist launch form (docs/decode.md "Launch forms"): the split form's programs in one launch, phases by
# virtual program ids taken in arrival order, waits on counters that the last program resets.
@pytest.mark.parametrize("case", ["small_q1", "small_q3_paged", "no_window_group3"])
def test_persist_form_equals_the_split_form(case):
    """The persist form against the split form on the same cache (`fused_against_split`): exactly one launch, the
    same blocks, the split form's bits on the CPU, deterministic, counters and tickets back at 0; contiguous and
    paged, q_len 1 to 3, with and without a window, a group of 3."""
    make, QL, splits, paged = FUSED[case]
    spec = make()
    fused_against_split(specgen.load(spec), spec, [100, 21, 150 - QL], QL, splits, paged, test_device(),
                        form="persist")


def test_persist_form_is_checked(monkeypatch):
    """Where the persist form does not apply, check_forms names the form, why and the fix; "auto" never picks it;
    the bench knows its name and that it needs the partials path."""
    from specgen.perf.bench_decode import _needs_partials, check_decode_forms, parse_forms
    from specgen.runtime import decode_step

    paper = specgen.load(load_spec("specs/nsa_paper.yaml"))._DECODE
    dsa = specgen.load(load_spec("specs/dsa_small.yaml"))
    decode_step.check_forms(dataclasses.replace(paper, form="persist"))
    decode_step.check_forms(dataclasses.replace(paper, form="persist", cmp_form="cmp_s3_r2"))
    refused = {
        "has no compression-scored selection": dataclasses.replace(dsa._DECODE, form="persist"),
        "needs the partials scoring path": dataclasses.replace(paper, form="persist", scoring="logits",
                                                               topn_form="row"),
        "base form, not 'ks_pf'.*use selection form 'base'": dataclasses.replace(paper, form="persist",
                                                                                 selection_form="ks_pf", mla=True),
        "no compression-scored selection with a compression branch": dataclasses.replace(paper, form="persist",
                                                                                         persist_kernel=None),
    }
    for words, d in refused.items():
        with pytest.raises(ValueError, match=f"form 'persist': .*{words}.*; use form 'split'"):
            decode_step.check_forms(d)
    with pytest.raises(ValueError, match="--decode-forms 'persist' on dsa_small: .*form 'persist'"):
        check_decode_forms(dsa, ["persist"])
    assert parse_forms("persist+cmp_s3_r2") == {"form": "persist", "cmp_form": "cmp_s3_r2"}
    with pytest.raises(ValueError, match="always runs the 'chunked_ticket' top-n"):
        parse_forms("persist+row")
    assert _needs_partials(parse_forms("persist"), paper)
    auto = dataclasses.replace(paper, form="auto")
    assert {decode_step.launch_form(auto, B, "cpu") for B in (1, 16, 64)} == {"cw", "whole"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("lengths", [[65471], [65471, 32814]], ids=["batch1", "batch2"])
def test_persist_form_realistic_and_in_a_cuda_graph(lengths):
    """nsa_paper at 64k (bf16, paged, q_len 1, the default split counts), batch 1 and 2: the persist form against
    the split form (no program may wait on one that has not started: a hang here is a deadlock), its step
    replayed from a CUDA graph to the eager step's bits three times, the counters back at 0 each time."""
    spec = load_spec("specs/nsa_paper.yaml")
    fused_against_split(specgen.load(spec), spec, lengths, 1, None, True, "cuda", graph=True, form="persist")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("q_len", [1, 4])
def test_fused_form_realistic_and_in_a_cuda_graph(q_len):
    """nsa_paper at 64k (bf16, paged, the default split counts): the fused form equals the split form, and its
    step captured in a CUDA graph replays to the eager step's bits three times (tickets reset every time)."""
    spec = load_spec("specs/nsa_paper.yaml")
    fused_against_split(specgen.load(spec), spec, [65471, 32814], q_len, None, True, "cuda", graph=True)


def test_launch_chain_pdl_keywords(monkeypatch):
    """The chain "pdl": off a GPU (or under the interpreter) no keywords at all; on one, PDL=1 for every chain-aware
    launch and launch_pdl for all but the step's first (which follows the work before the step in stream order).
    Unknown chains are refused; the bench names it as a form."""
    from specgen import runtime
    from specgen.perf.bench_decode import parse_forms
    from specgen.runtime import decode_step

    paper = specgen.load(load_spec("specs/nsa_paper.yaml"))._DECODE
    assert paper.chain == "plain" and decode_step.Chain(paper, "cuda").kw() == {}
    pdl = dataclasses.replace(paper, chain="pdl")
    decode_step.check_forms(pdl)
    assert decode_step.Chain(pdl, "cpu").kw() == {}
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    chain = decode_step.Chain(pdl, "cuda")
    assert [chain.kw() for _ in range(3)] == [{"PDL": 1, "launch_pdl": False}] + [{"PDL": 1, "launch_pdl": True}] * 2
    with pytest.raises(ValueError, match="unknown launch chain 'eager'"):
        decode_step.check_forms(dataclasses.replace(paper, chain="eager"))
    assert parse_forms("cw+pdl") == {"form": "cw", "chain": "pdl"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("form", ["split", "cw"])
def test_launch_chain_pdl_realistic_and_in_a_cuda_graph(form, monkeypatch):
    """nsa_paper at 64k (bf16, paged, q_len 1 and 2 sequences, the default split counts): the chain "pdl" (each
    kernel waits for the one before it in its prologue) gives the plain chain's bits, eagerly and replayed from a
    CUDA graph three times."""
    spec = load_spec("specs/nsa_paper.yaml")
    mod = specgen.load(spec)
    cache, q, gates = step_case(mod, spec, [65471, 32814], 1, True, "cuda")
    plan = mod._DECODE
    got = {}
    try:
        for chain in ("plain", "pdl"):
            d = dataclasses.replace(plan, form=form, chain=chain)
            step = install_step(mod, d, q, cache, gates, None)
            got[chain] = [x.clone() for x in step()]
        replays_equal(step, got["plain"], cache, f"{form}+pdl")
    finally:
        mod._DECODE, mod.NSACache.DESCRIPTOR = plan, plan
    for x, y in zip(got["pdl"], got["plain"]):
        assert torch.equal(x, y), "the pdl chain changed a value"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
def test_cw_form_realistic_and_in_a_cuda_graph():
    """nsa_paper at 64k (bf16, paged, q_len 1, the default split counts): the "cw" form against the split form, its
    step replayed from a CUDA graph to the eager step's bits three times."""
    spec = load_spec("specs/nsa_paper.yaml")
    fused_against_split(specgen.load(spec), spec, [65471, 32814], 1, None, True, "cuda", graph=True, form="cw")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("form", ["fused", "whole"])
def test_launch_form_realistic_against_the_reference(form, monkeypatch):
    """nsa_paper's fused and whole steps (the whole form below) at 64k against the float64 reference (paged,
    q_len = max_q_len, two steps)."""
    spec = load_spec("specs/nsa_paper.yaml")
    mod = specgen.load(spec)
    with_decode(monkeypatch, mod, form=form)
    check_decode(mod, spec, [65471, 32814], q_len=spec.decode.max_q_len, steps=2, paged=True, device="cuda",
                 query_chunk=128, compare_prefill=False)


# The whole launch form (docs/decode.md "Launch forms"): one launch, a program per (sequence, kv group) doing its
# whole step (compression with the partial sums, a CTA barrier, each new query's top-n and selection, the window, the
# epilogue of its rows), each branch in one split.
WHOLE = {  # spec, q_len, paged, compression form (both forms of the comparison run it), "auto" takes "whole"
    "small_q1": (lambda: SMALL, 1, False, "cmp_base", True),
    "small_q2_paged": (lambda: SMALL, 2, True, "cmp_base", True),
    "small_q3_paged": (lambda: SMALL, 3, True, "cmp_base", True),  # q_len 3: four unrolled queries, one masked off
    # (the batch rule's other side, as a GPU's at batch 3: "auto" runs "cw")
    "no_window_group3": (lambda: small("fused_nowin", branches=["compression", "selection"], window=None,
                                       **{"heads.q": 6, "heads.kv": 2}), 2, False, "cmp_base", False),
    "small_q2_k32": (lambda: SMALL, 2, False, "cmp_k32_r3", True),  # 32-key compression tiles (the partials' tile)
    # q_len 5 (QLP 8): the queries' top-n and selection in a loop, not unrolled
    "q5_loop_paged": (lambda: small("whole_q8", **{"decode.max_q_len": 8}), 5, True, "cmp_base", True),
    # one K/V for every branch (the models' specs, nsa_mqa), one kv group of 8 heads
    "shared_mqa_paged": (lambda: small("whole_shared", kv="shared", **{"heads.q": 8, "heads.kv": 1}), 2, True,
                         "cmp_base", True),
}


def whole_against_split(mod, spec, lengths, QL, paged, dev, cmp_form="cmp_base", graph=False):
    """On one cache (lengths + QL tokens each): the split form's step at one split a branch and at its own split
    counts, then the whole form's step twice (num_splits not given, then given), the staggered "whole_st" once
    (the same bits: the window branch moves, nothing else) and the "auto" form's once (the
    batch rule picks "whole" off the GPU and where B x kv groups fill the SMs, else "cw" where it applies, else
    "split": the bits of the form it ran). The
    whole step must launch its one kernel and nothing else, give the same bits twice, pick the one-split step's
    blocks and give its output and lse bit for bit on the CPU (on a GPU the selection and window run at the whole
    kernel's warps: the output within the dtype's rounding, at most one near-tied top-n row flipped), and pick the
    split counts' blocks with the output within the dtype's rounding (a GPU: at most one row flipped). `graph`
    (CUDA): the whole step captured and replayed three times, bit for bit the eager step."""
    from specgen.runtime import decode_step

    cache, q, gates = step_case(mod, spec, lengths, QL, paged, dev)
    B, hkv = len(lengths), spec.heads.kv
    plan = mod._DECODE
    launched = []

    def spy(name, kernel):
        return launch_spy(kernel, lambda grid, kw: launched.append((name, grid)))
    kernels = dict(whole_kernel=spy("whole", plan.whole_kernel), combine_kernel=spy("combine", plan.combine_kernel),
                   branch_kernels={k: spy(k, v) for k, v in plan.branch_kernels.items()},
                   select_partials_kernel=spy("topn", plan.select_partials_kernel))
    got = {}
    auto_ran = decode_step.launch_form(dataclasses.replace(plan, form="auto"), B, dev)
    try:
        for form, splits in (("split", 1), ("split", None), ("whole", None), ("whole", 3), ("whole_st", None),
                             *([("cw", None)] if auto_ran == "cw" else []), ("auto", None)):
            d = dataclasses.replace(plan, form=form, cmp_form=cmp_form, **kernels)
            step = install_step(mod, d, q, cache, gates, splits)
            launched.clear()
            got[form, splits] = [x.clone() for x in step()]
            if decode_step.launch_form(d, B, dev) in decode_step.WHOLE_FORMS:  # num_splits does not apply
                assert form != "split" and launched == [("whole", (B * hkv,))], (form, launched)
            else:
                assert form not in decode_step.WHOLE_FORMS and [n for n, _ in launched].count("whole") == 0, launched
            if graph and (form, splits) == ("whole", None):
                replays_equal(step, got[form, splits], cache, "whole")
    finally:
        mod._DECODE, mod.NSACache.DESCRIPTOR = plan, plan
    o_1, lse_1, idx_1 = got["split", 1]
    o_s, lse_s, idx_s = got["split", None]
    o_w, lse_w, idx_w = got["whole", None]
    assert (idx_1 >= 0).sum() > B * QL * hkv * 2, "too few selected blocks to compare"
    assert torch.isfinite(o_w).all()
    # whole_st: the window branch first in odd programs; the same values, so the same bits. "auto": the bits of the
    # form it ran (below the batch rule cw, whose window runs at the compression's warps: not split's bits).
    for again, want in ((got["whole", 3], (o_w, lse_w, idx_w)), (got["whole_st", None], (o_w, lse_w, idx_w)),
                        (got["auto", None], (o_w, lse_w, idx_w) if auto_ran == "whole" else got[auto_ran, None])):
        for x, y in zip(want, again):
            assert torch.equal(x, y), "another whole (or auto) step differs"
    eps = torch.finfo(mod.DTYPE).eps
    exact = dev == "cpu"
    for (o, lse, idx), one_split in (((o_1, lse_1, idx_1), True), ((o_s, lse_s, idx_s), False)):
        if exact and one_split:
            assert torch.equal(idx_w, idx_1) and torch.equal(o_w, o_1) and torch.equal(lse_w, lse_1)
            continue
        same = (idx_w == idx).all(-1).all(-1)  # [B, QL]: every group of the query picked the same blocks
        assert int((~same).sum()) <= (0 if exact else 1), (idx_w, idx)
        o_ref = o[same].float()
        torch.testing.assert_close(o_w[same].float(), o_ref, rtol=2 * eps, atol=2 * eps * o_ref.abs().max().item())
        torch.testing.assert_close(lse_w[same], lse[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(WHOLE))
def test_whole_form_equals_the_split_form(case, monkeypatch):
    """The whole form against the split form on the same cache, B 3 with ragged lengths (one sequence too short for
    a selection choice), contiguous and paged, q_len 1 to 3 (unrolled) and 5 (a loop), with and without a window
    branch, a group of 3, one K/V shared by the branches with one kv group, 32-key compression tiles, "auto" on
    either side of the batch rule (`whole_against_split`)."""
    from specgen.runtime import decode_whole

    make, QL, paged, cmp_form, fills = WHOLE[case]
    monkeypatch.setattr(decode_whole, "fills", lambda d, B, device: fills)  # the rule's side "auto" takes
    spec = make()
    whole_against_split(specgen.load(spec), spec, [100, 21, 150 - QL], QL, paged, test_device(), cmp_form)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_whole_form_matches_the_reference(paged, monkeypatch):
    """The whole form against the float64 reference (and, contiguous, the prefill kernel): ragged prompts that
    complete blocks while decoding, q_len 2 (num_splits is passed and does not apply)."""
    spec = SMALL
    mod = specgen.load(spec)
    with_decode(monkeypatch, mod, form="whole")
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=paged, num_splits=3,
                 compare_prefill=not paged)


def test_whole_form_is_checked_and_has_its_batch_rule(monkeypatch):
    """The whole form applies to compression-scored selection on the partials path with the selection form "base"
    and a group's heads in one program (whatever the top-n form: its program runs the row top-n) (else check_forms names the form and the fix); the
    batch rule (decode_whole.fills: B x kv groups programs against the SMs) and "auto"'s choice; the bench's names."""
    from specgen import runtime
    from specgen.perf.bench_decode import _needs_partials, check_decode_forms, parse_forms
    from specgen.runtime import decode_step, decode_whole

    paper = specgen.load(load_spec("specs/nsa_paper.yaml"))._DECODE
    dsa = specgen.load(load_spec("specs/dsa_small.yaml"))
    for form in ("whole", "auto"):
        decode_step.check_forms(dataclasses.replace(paper, form=form))
        decode_step.check_forms(dataclasses.replace(paper, form=form, cmp_form="cmp_s3_r2"))
    refused = {
        "has no compression-scored selection": dataclasses.replace(dsa._DECODE, form="whole"),
        "needs the partials scoring path": dataclasses.replace(paper, form="whole", scoring="logits",
                                                               topn_form="row"),
        "groups of 16 query heads take 2 programs of 8 rows": dataclasses.replace(paper, form="whole", max_gp=8),
    }
    for words, d in refused.items():
        with pytest.raises(ValueError, match=f"form 'whole': .*{words}.*; use form 'split'"):
            decode_step.check_forms(d)
    with pytest.raises(ValueError, match="--decode-forms 'whole' on dsa_small: .*form 'whole'"):
        check_decode_forms(dsa, ["whole"])
    check_decode_forms(dsa, ["auto"])  # "auto" runs "split" wherever "whole" does not apply
    assert parse_forms("whole+cmp_s3_r2") == {"form": "whole", "cmp_form": "cmp_s3_r2"}
    with pytest.raises(ValueError, match="runs its own top-n"):   # the row label would hide it
        parse_forms("whole+chunked_ticket")
    assert _needs_partials(parse_forms("whole"), paper) and not _needs_partials(parse_forms("auto"), paper)
    monkeypatch.setattr(runtime, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    auto = dataclasses.replace(paper, form="auto")
    # 4 kv groups: 33 sequences are 132 programs, one an SM.
    assert {B: decode_step.launch_form(auto, B, cuda) for B in (1, 16, 32, 33, 64)} == {
        1: "cw", 16: "cw", 32: "cw", 33: "whole", 64: "whole"}
    assert decode_whole.programs(paper, 64) == 256 and decode_whole.fills(paper, 33, cuda)
    assert paper.topn_form == "chunked_ticket"   # the plan's: the split and fused forms' top-n, not the whole's
    assert decode_step.launch_form(dataclasses.replace(auto, topn_form="chunked"), 64, cuda) == "whole"
    assert decode_step.launch_form(dataclasses.replace(dsa._DECODE, form="auto"), 64, cuda) == "split"
    # off the GPU: as on an H100's 132 SMs (the CPU tests' small batches run cw, as a GPU runs them)
    assert decode_step.launch_form(auto, 1, "cpu") == "cw" and decode_step.launch_form(auto, 33, "cpu") == "whole"
    assert decode_step.launch_form(dataclasses.replace(auto, scoring="logits"), 1, cuda) == "split"  # no cw there
    assert decode_step.launch_form(dataclasses.replace(paper, form="whole"), 1, cuda) == "whole"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("q_len", [1, 4])
def test_whole_form_realistic_and_in_a_cuda_graph(q_len):
    """nsa_paper at 64k (bf16, paged): the whole form against the split form at one split and at its own split
    counts (`whole_against_split`: at most one near-tied top-n row may differ), its step captured in a CUDA graph
    and replayed three times bit for bit."""
    spec = load_spec("specs/nsa_paper.yaml")
    whole_against_split(specgen.load(spec), spec, [65471, 32814], q_len, True, "cuda", graph=True)


ALL_TOPN = {"split": ("chunked", "chunked_ticket"), "fused": ("chunked", "chunked_ticket")}
TOPN_STEP = {  # spec, q_len, splits, paged, (blocks a program at most, chunks a row aimed at) or None (the plan's),
    # the chunked forms run in each launch form (the interpreter's time: a step is seconds)
    "small_q1": (lambda: SMALL, 1, 3, False, None, ALL_TOPN),  # 10 blocks of top-4: 3 chunks of 4
    "small_q3_paged_cut": (lambda: SMALL, 3, 2, True, (128, 2), {"split": ("chunked_ticket",), "fused": ("chunked",)}),
    # (2 chunks of 8 blocks, each cut to its top 4)
    "no_window_group3": (lambda: small("fused_nowin", branches=["compression", "selection"], window=None,
                                       **{"heads.q": 6, "heads.kv": 2}), 2, None, False, None,
                         {"split": ("chunked",), "fused": ("chunked_ticket",)}),
}


def topn_against_row(mod, spec, lengths, QL, splits, paged, dev, graph=False, exact=True, forms=ALL_TOPN):
    """On one cache (lengths + QL tokens each): each launch form's step with the top-n form "row", then the
    chunked forms `forms[launch form]`; a chunked step must give the row step's selection, output and lse bit for
    bit (the scores are the same terms summed in the same order; nothing else differs), launch its kernels (not the
    row kernel under its name) and leave the tickets at 0. `graph` (CUDA): each chunked step is also captured and
    replayed three times, bit for bit the eager step. `exact` False (a GPU: the chunked kernel merges the heads' lse
    at other warps than the row kernel, so one row of near-tied blocks may flip): at most one top-n row may differ,
    and the output of every query whose rows all agree is the row step's bits."""
    from specgen.runtime import decode_step

    cache, q, gates = step_case(mod, spec, lengths, QL, paged, dev)
    B, hkv, hq = len(lengths), spec.heads.kv, spec.heads.q
    plan = mod._DECODE
    launched = []

    def spy(name, kernel):
        return launch_spy(kernel, lambda grid, kw: launched.append((name, kw.get("CHUNKED"), kw.get("TICKET"))))
    kernels = dict(select_partials_kernel=spy("row", plan.select_partials_kernel),
                   topn_chunks_kernel=spy("chunks", plan.topn_chunks_kernel),
                   topn_merge_kernel=spy("merge", plan.topn_merge_kernel),
                   fused_kernels={**plan.fused_kernels, "select_merge": spy("select_merge",
                                                                           plan.fused_kernels["select_merge"])})
    want_launches = {
        ("split", "row"): [("row", None, None)], ("split", "chunked"): [("chunks", None, False), ("merge", None, None)],
        ("split", "chunked_ticket"): [("chunks", None, True)],
        ("fused", "row"): [("select_merge", False, False)],
        ("fused", "chunked"): [("select_merge", True, False), ("merge", None, None)],
        ("fused", "chunked_ticket"): [("select_merge", True, True)]}
    rows_differ = 0
    try:
        for form in ("split", "fused"):
            got = {}
            for topn in ("row", *forms[form]):
                d = dataclasses.replace(plan, form=form, topn_form=topn, **kernels)
                step = install_step(mod, d, q, cache, gates, splits)
                if topn != "row":  # several chunks a row, so the merge merges
                    assert decode_step.topn_chunks(d, triton.cdiv(cache.max_context, d.sel_block))[1] > 1
                launched.clear()
                got[topn] = [x.clone() for x in step()]
                assert launched == want_launches[form, topn], (form, topn, launched)
                assert not cache.tickets.any(), f"{form}/{topn}: tickets not reset: {cache.tickets.tolist()}"
                if graph and topn != "row":
                    replays_equal(step, got[topn], cache, f"{form}/{topn}")
            (o_r, lse_r, idx_r) = got["row"]
            assert (idx_r >= 0).sum() > B * QL * hkv * 2, "too few selected blocks to compare"
            for topn in forms[form]:
                o, lse, idx = got[topn]
                if exact:
                    assert torch.equal(idx, idx_r), (form, topn, idx, idx_r)
                    assert torch.equal(o, o_r) and torch.equal(lse, lse_r), (form, topn)
                    continue
                same = (idx == idx_r).all(-1)  # [B, QL, HKV]
                rows_differ += int((~same).sum())
                agree = same.all(-1)  # [B, QL]: every group's selection agrees
                assert torch.equal(o[agree], o_r[agree]) and torch.equal(lse[agree], lse_r[agree]), (form, topn)
    finally:
        mod._DECODE, mod.NSACache.DESCRIPTOR = plan, plan
    assert rows_differ <= 1, f"{rows_differ} top-n rows differ from the row form's"


@pytest.mark.parametrize("case", list(TOPN_STEP))
def test_topn_forms_equal_the_row_form(case, monkeypatch):
    """The chunked top-n forms against the row form on the same cache, in both launch forms (`topn_against_row`):
    B 3 with ragged lengths (one sequence too short for a selection choice), contiguous and paged, q_len 1 to 3,
    chunks of TOP_K_PAD blocks and chunks cut to their top candidates, with and without a window branch."""
    make, QL, splits, paged, chunks, forms = TOPN_STEP[case]
    with_topn_chunks(monkeypatch, chunks)
    spec = make()
    topn_against_row(specgen.load(spec), spec, [100, 21, 150 - QL], QL, splits, paged, test_device(), forms=forms)


@pytest.mark.parametrize("form, topn, paged", [("split", "chunked_ticket", False), ("split", "chunked", True),
                                               ("fused", "chunked_ticket", True)])
def test_topn_forms_match_the_reference(form, topn, paged, monkeypatch):
    """The chunked top-n forms against the float64 reference (and, contiguous, the prefill kernel): ragged prompts
    that complete blocks while decoding, q_len 2, uneven splits."""
    spec = SMALL
    mod = specgen.load(spec)
    with_decode(monkeypatch, mod, form=form, topn_form=topn)
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=paged, num_splits=3,
                 compare_prefill=not paged)


def test_topn_forms_are_checked():
    """A top-n form other than "row" needs compression-scored selection on the partials path; the bench's
    --decode-forms names them (alone or with a launch form) and leaves their pairs with the logits path out."""
    from specgen.perf.bench_decode import _needs_partials, check_decode_forms, parse_forms
    from specgen.runtime import decode_step

    nsa = specgen.load(SMALL)._DECODE
    dsa = specgen.load(load_spec("specs/dsa_small.yaml"))
    decode_step.check_forms(dataclasses.replace(nsa, topn_form="chunked_ticket"))
    with pytest.raises(ValueError, match="unknown top-n form"):
        decode_step.check_forms(dataclasses.replace(nsa, topn_form="nope"))
    with pytest.raises(ValueError, match="top-n form 'chunked' needs compression-scored selection on the partials"):
        decode_step.check_forms(dataclasses.replace(nsa, topn_form="chunked", scoring="logits"))
    with pytest.raises(ValueError, match="top-n form 'chunked_ticket' needs compression-scored"):
        check_decode_forms(dsa, ["chunked_ticket"])
    assert parse_forms("fused+chunked_ticket") == {"form": "fused", "topn_form": "chunked_ticket"}
    with pytest.raises(ValueError, match="both topn forms"):
        parse_forms("chunked+row")
    assert _needs_partials(parse_forms("chunked"), nsa) and _needs_partials(parse_forms("fused"), nsa)
    assert not _needs_partials(parse_forms("split+row"), nsa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("q_len", [1, 4])
def test_topn_forms_realistic_and_in_a_cuda_graph(q_len):
    """nsa_paper at 64k (bf16, paged, the default split counts and chunks: 9 of 128 blocks a row): the chunked
    top-n forms against the row form in both launch forms (at most one near-tied row may differ: the lse merges
    run at other warps), each step captured in a CUDA graph and replayed three times bit for bit, tickets reset."""
    spec = load_spec("specs/nsa_paper.yaml")
    topn_against_row(specgen.load(spec), spec, [65471, 32814], q_len, None, True, "cuda", graph=True, exact=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
def test_topn_forms_realistic_against_the_reference(monkeypatch):
    """nsa_paper's step at 64k with the top-n form "chunked_ticket" against the float64 reference (paged, q_len =
    max_q_len, two steps)."""
    spec = load_spec("specs/nsa_paper.yaml")
    mod = specgen.load(spec)
    with_decode(monkeypatch, mod, topn_form="chunked_ticket")
    check_decode(mod, spec, [65471, 32814], q_len=spec.decode.max_q_len, steps=2, paged=True, device="cuda",
                 query_chunk=128, compare_prefill=False)


# The compression kernel's launch forms (docs/decode.md "Compression forms"): the same kernel at other tiles, stages,
# warps and split counts. The interpreter ignores stages and warps, so these tests check that each form's launch
# reaches the kernel and that its tile and split rule give the base form's selection and output.
CMP_TESTED = [name for name in __import__("specgen.runtime.decode_step", fromlist=["CMP_FORMS"]).CMP_FORMS
              if name != "cmp_base"]


def cmp_against_base(mod, spec, lengths, QL, splits, paged, dev, form, launch, graph=False):
    """On one cache (lengths + QL tokens each): the step in compression form "cmp_base", then in `form`, both in the
    launch form `launch`. The form's launch must reach the compression kernel (its tile, stages and warps; the
    grid's splits `splits` or the form's rule, `decode_step.cmp_splits`). The form must pick the base's blocks and
    give its output and lse: bit for bit where nothing but the pipelining differs (the same tile and split count,
    and on a GPU the same warps: their reductions run in another order), else to the output dtype's rounding (the
    online softmax and the partial sums rescale per tile), and on a GPU with at most one near-tied top-n row
    flipped (the queries whose rows agree are compared). `graph` (CUDA): the form's step captured and replayed
    three times, bit for bit the eager step."""
    from specgen.runtime import decode_step

    cache, q, gates = step_case(mod, spec, lengths, QL, paged, dev)
    B, hq = len(lengths), spec.heads.q
    plan = mod._DECODE
    launched = []

    def spy(kernel, tile_kw):
        return launch_spy(kernel, lambda grid, kw: launched.append(
            (kw[tile_kw], kw["num_stages"], kw["num_warps"], grid[1])))
    kernels = dict(branch_kernels={**plan.branch_kernels, "compression": spy(plan.branch_kernels["compression"],
                                                                             "BLOCK_N")},
                   fused_kernels={**plan.fused_kernels, "cmp_win": spy(plan.fused_kernels["cmp_win"], "BLOCK_C")})
    got, launch_of = {}, {}
    try:
        for name in ("cmp_base", form):
            d = dataclasses.replace(plan, form=launch, cmp_form=name, **kernels)
            step = install_step(mod, d, q, cache, gates, splits)
            launched.clear()
            got[name] = [x.clone() for x in step()]
            assert len(launched) == 1, (name, launched)
            tile, stages, warps, _ = decode_step.cmp_launch(d, 2, QL)
            programs = B * d.hkv * decode_step.split_rows(d, "compression", QL)[2]
            want = launch_of[name] = (tile, stages, warps, splits or decode_step.cmp_splits(d, programs,
                                                                                            cache.nc_cap - 1, dev))
            if launch == "fused" and "window" in spec.branches:  # one grid for both branches: at least the splits
                assert launched[0][:3] == want[:3] and launched[0][3] >= want[3], (name, launched, want)
            else:
                assert launched[0] == want, (name, launched, want)
            if graph and name == form:
                replays_equal(step, got[name], cache, f"{launch}/{form}")
    finally:
        mod._DECODE, mod.NSACache.DESCRIPTOR = plan, plan
    (o_b, lse_b, idx_b), (o, lse, idx) = got["cmp_base"], got[form]
    assert (idx_b >= 0).sum() > B * QL * spec.heads.kv * 2, "too few selected blocks to compare"
    assert torch.isfinite(o).all()
    base, mine = launch_of["cmp_base"], launch_of[form]
    if base[0] == mine[0] and base[3] == mine[3] and (dev == "cpu" or base[2] == mine[2]):
        assert torch.equal(idx, idx_b) and torch.equal(o, o_b) and torch.equal(lse, lse_b), (launch, form)
        return
    same = (idx == idx_b).all(-1).all(-1)  # [B, QL]: every group of the query picked the base's blocks
    assert int((~same).sum()) <= (0 if dev == "cpu" else 1), (idx, idx_b)
    eps = torch.finfo(mod.DTYPE).eps
    o_b, o = o_b[same].float(), o[same].float()
    torch.testing.assert_close(o, o_b, rtol=2 * eps, atol=2 * eps * o_b.abs().max().item())
    torch.testing.assert_close(lse[same], lse_b[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", CMP_TESTED)
def test_cmp_form(form, monkeypatch):
    """Each compression form on nsa_small: against the base form on one cache (B 3, ragged lengths, one sequence
    too short for a selection choice; contiguous q_len 1 in one split, so a 32-key form walks two tiles in a
    program and the spill crosses them; paged q_len 3 in the fused launch form at the form's split count). A form
    whose tile is the plan's gives the base's bits here (the interpreter runs no pipeline and no warps), so the
    base's own tests (the generated test_decode_matches_prefill, contiguous and paged) hold for it; a form with
    another tile is also checked against the float64 reference and the prefill kernel (contiguous, q_len 2, uneven
    splits) and against the reference on a paged cache (q_len 2)."""
    from specgen.runtime import decode_step

    spec = SMALL
    mod = specgen.load(spec)
    dev = test_device()
    cmp_against_base(mod, spec, [100, 21, 149], 1, 1, False, dev, form, "split")
    cmp_against_base(mod, spec, [100, 21, 147], 3, None, True, dev, form, "fused")
    if decode_step.CMP_FORMS[form].tile == mod._DECODE.split_tiles["compression"]:
        return
    with_decode(monkeypatch, mod, cmp_form=form)
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=False, num_splits=3)
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=2, steps=1, paged=True, compare_prefill=False)


def test_cmp_forms_launch_and_checks(monkeypatch):
    """The forms' launches (cmp_launch: "cmp_base" is the plan's tile and stages, 8 warps on the partials path),
    their split rule on a 132-SM GPU (one round of the programs an SM holds: 1 split at batch 64 x 64k, 64 at batch
    1), the form checks, and the bench's names and bytes."""
    from specgen import runtime
    from specgen.perf.bench_decode import _bytes_view, parse_forms
    from specgen.runtime import decode_step

    paper = specgen.load(load_spec("specs/nsa_paper.yaml"))._DECODE
    assert decode_step.cmp_launch(paper) == (64, 2, 8, None)
    assert decode_step.cmp_launch(paper, 1) == (64, 2, 4, None)  # the logits path: 16 rows x 128 at 4 warps
    for name, form in decode_step.CMP_FORMS.items():
        d = dataclasses.replace(paper, cmp_form=name)
        decode_step.check_forms(d)
        assert decode_step.cmp_launch(d) == (form or (64, 2, 8, None))
        assert decode_step.score_tiles(d)[0] == (form.tile if form else 64) // 4 + 1
    monkeypatch.setattr(runtime, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    splits = {name: (decode_step.cmp_splits(dataclasses.replace(paper, cmp_form=name), 256, 4096, cuda),
                     decode_step.cmp_splits(dataclasses.replace(paper, cmp_form=name), 4, 4096, cuda))
              for name in decode_step.CMP_FORMS}
    assert splits == {"cmp_base": (2, 64), "cmp_s3": (2, 64), "cmp_s3_r2": (1, 64), "cmp_s4_r1": (1, 32),
                      "cmp_k32_r3": (1, 64)}
    with pytest.raises(ValueError, match="unknown compression form 'nope'"):
        decode_step.check_forms(dataclasses.replace(paper, cmp_form="nope"))
    with pytest.raises(ValueError, match="walks 32-key tiles, not whole selection blocks of 64"):
        decode_step.check_forms(dataclasses.replace(paper, cmp_form="cmp_k32_r3", overlap_chunks=64))
    decode_step.check_forms(dataclasses.replace(paper, cmp_form="cmp_k32_r3", overlap_chunks=64, scoring="logits",
                                                topn_form="row"))
    dsa = specgen.load(load_spec("specs/dsa_small.yaml"))._DECODE
    with pytest.raises(ValueError, match="compression form 'cmp_s3' needs the compression branch"):
        decode_step.check_forms(dataclasses.replace(dsa, cmp_form="cmp_s3"))
    assert parse_forms("fused+cmp_s3_r2+chunked_ticket") == {"form": "fused", "cmp_form": "cmp_s3_r2",
                                                             "topn_form": "chunked_ticket"}
    with pytest.raises(ValueError, match="both cmp forms"):
        parse_forms("cmp_s3+cmp_base")
    assert _bytes_view(paper) is paper
    assert _bytes_view(dataclasses.replace(paper, cmp_form="cmp_k32_r3")).split_tiles["compression"] == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("launch, q_len", [("split", 1), ("fused", 4)])
def test_cmp_forms_realistic_and_in_a_cuda_graph(launch, q_len):
    """nsa_paper at 64k (bf16, paged, each form's own split count): every compression form against the base form
    (`cmp_against_base`: "cmp_s3" must give the base's bits, its split count and warps being the base's), its step
    captured in a CUDA graph and replayed three times bit for bit."""
    spec = load_spec("specs/nsa_paper.yaml")
    mod = specgen.load(spec)
    for form in CMP_TESTED:
        cmp_against_base(mod, spec, [65471, 32814], q_len, None, True, "cuda", form, launch, graph=True)


@pytest.mark.parametrize("spec_path", ["specs/nsa_small.yaml", "dsa_fp8_indexer"])
def test_bench_paged_copy_holds_the_contiguous_values(spec_path, monkeypatch):
    """`specgen bench --decode --layouts paged` times a copy of the contiguous cache in shuffled pages: the pages are
    a permutation of the pool, every token's row is where the table says, and a step reads the same values (the
    same output, to fp32 rounding: the paged cache's capacity rounds up to whole pages, which may split the
    compression differently)."""
    from specgen.perf import bench_decode as bd

    spec = VARIANTS[spec_path]() if spec_path in VARIANTS else load_spec(spec_path)  # fp8 index keys: bytes moved
    mod = specgen.load(spec)
    dev = test_device()
    monkeypatch.setattr(bd, "DEVICE", dev)
    B, T, q_len = 2, 75, 2  # 77 rows: a whole page of 64 and a partial one
    torch.manual_seed(0)
    contiguous = bd.fill_cache(mod, spec, B, T, q_len)
    paged = bd.paged_copy(contiguous, torch.Generator().manual_seed(1))
    table = paged.block_table.flatten().tolist()
    assert paged.paged and sorted(table) == list(range(paged.num_pages)) and table != sorted(table)
    pos = torch.arange(T + q_len, device=dev)[None, :].expand(B, -1)
    rows_c, rows_p = contiguous._rows(pos).flatten(), paged._rows(pos).flatten()
    for name, x in contiguous.tensors.items():
        if name not in mod._DECODE.ring_tensors:
            y = paged.tensors[name]
            assert torch.equal(x.flatten(0, 1)[rows_c].float(), y.flatten(0, 1)[rows_p].float()), name
    if hasattr(contiguous, "k_idx_scale"):
        assert torch.equal(contiguous.k_idx_scale.flatten(0, 1)[rows_c], paged.k_idx_scale.flatten(0, 1)[rows_p])
    assert contiguous.host_seqlens == paged.host_seqlens == [T] * B
    kw = bd._step_inputs(mod, spec, B, q_len)
    q = kw.pop("q")
    decode = getattr(mod, f"{spec.family}_decode")
    out_c = decode(q, contiguous, **kw).float()
    out_p = decode(q, paged, **kw).float()
    assert out_c.abs().max() > 0
    torch.testing.assert_close(out_p, out_c, rtol=1e-5, atol=1e-5)
