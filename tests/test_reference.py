"""The float64 reference (specgen.reference) against an independent, deliberately naive formulation of
docs/semantics.md: explicit loops, token-level masks, one softmax per (query, head)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import specgen.reference as R
from specgen.model.spec import load_spec, replace, spec_from_mapping

# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------

SMALL = load_spec("specs/nsa_small.yaml")          # GQA 4/2, l=8 d=4 l'=16, top_k 4 (1 initial + 1 local), w=16
TOKEN = replace(load_spec("specs/nsa_token.yaml"), **{
    "heads.q": 4, "heads.kv": 2, "head_dim.qk": 32, "head_dim.v": 32, "selection.top_k": 8,
    "indexer.heads": 2, "indexer.head_dim": 16, "compression.block": 8, "compression.stride": 4,
    "window.size": 16, "max_seqlen": 4096})
DSA = spec_from_mapping({"name": "dsa_tiny", "family": "dsa", "heads": {"q": 4, "kv": 1},
                         "head_dim": {"qk": 64, "v": 32}, "selection": {"top_k": 8},
                         "indexer": {"heads": 2, "head_dim": 16}, "max_seqlen": 4096})

SPECS = {
    "gqa": SMALL,
    "mha": replace(SMALL, **{"heads.kv": 4}),
    "mqa": replace(SMALL, **{"heads.kv": 1}),
    "linear_pe_shared": replace(SMALL, kv="shared", **{"compression.pool": "linear",
                                                       "compression.position_embedding": True}),
    "mla_block": replace(SMALL, kv="shared", mla=True, **{"heads.kv": 1, "selection.local": 2}),
    "token": TOKEN,
    "dsa": DSA,
}
TS = [1, 7, 37, 70]     # at 1 and 7 every t <= 6 < l - 1 sees no compressed block; 37, 70 divide by none of 4, 8, 16


def inputs_for(spec, B, T, seed=0):
    return R.make_inputs(spec, B, T, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# An independent dense formulation
# ---------------------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, mask, scale):
    """q [B,T,Hq,D], k/v [B,S,Hkv,*], mask bool [B,T,Hkv,S]: one softmax per (b, t, h) over its allowed keys."""
    B, T, Hq, _ = q.shape
    G = Hq // k.shape[2]
    o = torch.zeros(B, T, Hq, v.shape[-1], dtype=q.dtype)
    lse = torch.full((B, T, Hq), -math.inf, dtype=q.dtype)
    p = torch.zeros(B, T, Hq, k.shape[1], dtype=q.dtype)
    for b in range(B):
        for t in range(T):
            for h in range(Hq):
                keys = mask[b, t, h // G].nonzero().flatten()
                if len(keys) == 0:
                    continue
                logits = k[b, keys, h // G] @ q[b, t, h] * scale
                probs = torch.softmax(logits, dim=0)
                o[b, t, h] = probs @ v[b, keys, h // G]
                lse[b, t, h] = torch.logsumexp(logits, dim=0)
                p[b, t, h, keys] = probs
    return o, lse, p


def naive_pool(spec, x, weight, pe):
    """Block i = tokens i*d .. i*d+l-1 of a sequence, complete blocks only, by an explicit loop."""
    l, d = spec.compression.block, spec.compression.stride
    B, T, Hkv, D = x.shape
    blocks = []
    i = 0
    while i * d + l <= T:
        rows = x[:, i * d: i * d + l]                                       # [B, l, Hkv, D]
        if spec.compression.pool == "mean":
            blocks.append(rows.mean(dim=1))
        else:
            pooled = torch.zeros(B, Hkv, weight.shape[-1], dtype=x.dtype)
            for r in range(l):                                              # row r feeds weight rows r*D..r*D+D-1
                row = rows[:, r] + (pe[r] if pe is not None else 0)
                pooled += torch.einsum("bgd,gde->bge", row, weight[:, r * D:(r + 1) * D])
            blocks.append(pooled)
        i += 1
    return torch.stack(blocks, dim=1) if blocks else x.new_zeros(B, 0, Hkv, weight.shape[-1] if weight is not None
                                                                 else D)


def naive_topk(scores_row, candidates, forced, k):
    rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-float(scores_row[j]), j))
    chosen = sorted(set(forced) | set(rest[:k - len(set(forced))]))
    return chosen + [-1] * (k - len(chosen))


def dense_forward(spec, x):
    """Everything recomputed from the rules: pooled keys, visibility by loops, S by interval overlap of Python
    ranges, top-k by sorting Python lists, token masks, naive softmax. Returns branch outputs/lse, indices, scores."""
    q = x["q"]
    B, T, Hq, _ = q.shape
    Hkv, G = spec.heads.kv, spec.heads.q // spec.heads.kv
    scale = spec.softmax_scale

    def kv(branch):
        if spec.kv == "shared":
            k = x["k"]
            return k, (k[..., :spec.head_dim.v] if spec.mla else x["v"])
        names = {"compression": ("k_cmp", "v_cmp"), "selection": ("k_slc", "v_slc"), "window": ("k_win", "v_win")}
        return tuple(x[n] for n in names[branch])

    outs, lses, indices, scores = {}, {}, None, None
    if "compression" in spec.branches:
        l, d = spec.compression.block, spec.compression.stride
        kc, vc = kv("compression")
        kc = naive_pool(spec, kc, x.get("w_pool_k"), x.get("pe_pool_k"))
        vc = naive_pool(spec, vc, x.get("w_pool_v"), x.get("pe_pool_v"))
        mask = torch.zeros(B, T, Hkv, kc.shape[1], dtype=torch.bool)
        for t in range(T):
            for i in range(kc.shape[1]):
                mask[:, t, :, i] = i * d + l - 1 <= t
        outs["compression"], lses["compression"], p_cmp = naive_attention(q, kc, vc, mask, scale)

    if "window" in spec.branches:
        w = spec.window.size
        mask = torch.zeros(B, T, Hkv, T, dtype=torch.bool)
        for t in range(T):
            mask[:, t, :, max(0, t - w + 1): t + 1] = True
        outs["window"], lses["window"], _ = naive_attention(q, *kv("window"), mask, scale)

    if "selection" in spec.branches:
        sel = spec.selection
        top_k = sel.top_k
        if sel.granularity == "block":
            l_sel = sel.block
            n_sel = -(-T // l_sel)
            scores = torch.zeros(B, T, Hkv, n_sel, dtype=q.dtype)
            for i in range(p_cmp.shape[-1]):
                for j in range(n_sel):
                    shared = len(set(range(i * d, i * d + l)) & set(range(j * l_sel, (j + 1) * l_sel)))
                    if shared:
                        P = p_cmp[..., i].reshape(B, T, Hkv, G).sum(-1)
                        scores[..., j] += P * shared / d
        else:
            l_sel = 1
            H_I, d_I = spec.indexer.heads, spec.indexer.head_dim
            iscale = spec.indexer.scale or d_I ** -0.5 * H_I ** -0.5
            scores = torch.full((B, T, Hkv, T), -math.inf, dtype=q.dtype)
            for t in range(T):
                for g in range(Hkv):
                    total = 0
                    for j in range(H_I):
                        col = g * H_I + j
                        total = total + x["w_idx"][:, t, col, None] * torch.relu(
                            x["k_idx"][:, : t + 1, g] @ x["q_idx"][:, t, col].unsqueeze(-1)).squeeze(-1)
                    scores[:, t, g, : t + 1] = iscale * total
        initial, local = (sel.initial, sel.local) if sel.granularity == "block" else (0, 0)
        indices = torch.zeros(B, T, Hkv, top_k, dtype=torch.int32)
        mask = torch.zeros(B, T, Hkv, T, dtype=torch.bool)
        for b in range(B):
            for t in range(T):
                newest = t // l_sel
                candidates = [j for j in range(newest + 1)]
                forced = [j for j in candidates if j < initial or j > newest - local]
                for g in range(Hkv):
                    chosen = naive_topk(scores[b, t, g], candidates, forced, top_k)
                    indices[b, t, g] = torch.tensor(chosen)
                    for j in chosen:
                        if j >= 0:
                            for s in range(j * l_sel, min((j + 1) * l_sel, t + 1)):
                                mask[b, t, g, s] = True
        outs["selection"], lses["selection"], _ = naive_attention(q, *kv("selection"), mask, scale)

    if spec.gated:
        out = sum(x["gates"][..., c, None] * outs[br] for c, br in enumerate(spec.branches))
    else:
        out = outs[spec.branches[0]]
    return out, outs, lses, indices, scores


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_dense_formulation(name, T):
    spec = SPECS[name]
    x = inputs_for(spec, 2 if name in ("gqa", "token") else 1, T, seed=T)
    res = R.nsa_forward(spec, **x)
    out, outs, lses, indices, scores = dense_forward(spec, x)

    assert not res.out.isnan().any() and not res.lse.isnan().any()
    if "selection" in spec.branches:
        assert res.indices.dtype == torch.int32
        assert torch.equal(res.indices, indices), "selection differs from the naive top-k"
        assert R.rel_err(res.scores, scores) < 1e-10
        R.check_selection(spec, res.indices, res.scores, T)
    for c, branch in enumerate(spec.branches):
        assert R.rel_err(res.branch_out[branch], outs[branch]) < 1e-10, branch
        assert R.rel_err(res.lse[..., c], lses[branch]) < 1e-10, branch
    assert R.rel_err(res.out, out) < 1e-10
    if "compression" in spec.branches and T < spec.compression.block:        # no compressed block complete
        c = spec.branches.index("compression")
        assert torch.equal(res.branch_out["compression"], torch.zeros_like(res.branch_out["compression"]))
        assert torch.isneginf(res.lse[..., c]).all()


def test_nothing_visible_gives_zero_and_finite_gradients():
    spec = SMALL
    x = inputs_for(spec, 1, 9)                        # queries t <= 6 < l - 1 = 7 see no compressed block
    for v in x.values():
        v.requires_grad_(True)
    res = R.nsa_forward(spec, **x)
    assert torch.isneginf(res.lse[:, :7, :, 0]).all() and (res.branch_out["compression"][:, :7] == 0).all()
    assert res.lse[:, 7:, :, 0].isfinite().all()
    res.out.sum().backward()
    for name, v in x.items():
        assert v.grad is not None and v.grad.isfinite().all(), name


# ---------------------------------------------------------------------------------------------------------------
# Pieces by hand
# ---------------------------------------------------------------------------------------------------------------

def test_overlap_weights_by_hand():
    spec = replace(SMALL, **{"compression.block": 32, "compression.stride": 16, "selection.block": 64,
                             "window.size": 64})
    T = 256
    n_cmp = R.num_compressed_blocks(spec, T)                         # (256 - 32) // 16 + 1 = 15
    assert n_cmp == 15
    # Row t of P is one-hot on compression block t (put on the first head of each group; the others are zero).
    p = torch.zeros(1, T, spec.heads.q, n_cmp, dtype=torch.float64)
    G = spec.heads.q // spec.heads.kv
    for i in range(n_cmp):
        p[0, i, ::G, i] = 1.0
    S = R.selection_scores(spec, p)                                 # [1, T, Hkv, 4]
    assert S.shape == (1, T, spec.heads.kv, 4)
    for j in range(4):
        expected = {4 * j - 1: 1, 4 * j: 2, 4 * j + 1: 2, 4 * j + 2: 2, 4 * j + 3: 1}
        for i in range(n_cmp):
            assert S[0, i, 0, j].item() == expected.get(i, 0), (i, j)
    # Summing probabilities over the group's heads: two heads with 0.25 each on block 5 give 0.5 * its weights.
    p2 = torch.zeros(1, T, spec.heads.q, n_cmp, dtype=torch.float64)
    p2[0, 0, 0:2, 5] = 0.25
    assert R.selection_scores(spec, p2)[0, 0, 0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_scores_equal_probabilities_when_l_d_lsel_agree():
    spec = replace(SMALL, **{"compression.block": 16, "compression.stride": 16, "selection.block": 16})
    x = inputs_for(spec, 1, 70)
    res = R.nsa_forward(spec, **x)
    k_pooled = R.pool_kv(spec, x["k_cmp"])
    v_pooled = R.pool_kv(spec, x["v_cmp"])
    _, _, p = R.compression_attention(spec, x["q"], k_pooled, v_pooled, 70)
    P = p.reshape(1, 70, spec.heads.kv, -1, p.shape[-1]).sum(3)
    assert R.rel_err(res.scores[..., :P.shape[-1]], P) < 1e-15
    assert (res.scores[..., P.shape[-1]:] == 0).all()               # the trailing partial block has no mass


def test_linear_pool_row_major():
    spec = replace(SMALL, **{"compression.pool": "linear", "compression.position_embedding": True})
    x = inputs_for(spec, 2, 21)
    pooled = R.pool_kv(spec, x["k_cmp"], x["w_pool_k"], x["pe_pool_k"])
    assert pooled.shape == (2, R.num_compressed_blocks(spec, 21), spec.heads.kv, spec.head_dim.qk)
    l, d, D = 8, 4, spec.head_dim.qk
    b, i, g = 1, 2, 1
    flat = torch.cat([x["k_cmp"][b, i * d + r, g] + x["pe_pool_k"][r] for r in range(l)])   # [l*D]
    assert flat.shape == (l * D,)
    assert R.rel_err(pooled[b, i, g], flat @ x["w_pool_k"][g]) < 1e-14


def test_indexer_scores_by_hand():
    x = inputs_for(TOKEN, 1, 9)
    I = R.indexer_scores(TOKEN, x["q_idx"], x["k_idx"], x["w_idx"])
    assert I.shape == (1, 9, 2, 9)
    t, s, g = 6, 4, 1
    H_I, d_I = 2, 16
    by_hand = sum(x["w_idx"][0, t, g * H_I + j] * torch.relu(x["q_idx"][0, t, g * H_I + j] @ x["k_idx"][0, s, g])
                  for j in range(H_I)) * d_I ** -0.5 * H_I ** -0.5
    assert abs(I[0, t, g, s] - by_hand) < 1e-14
    assert torch.isneginf(I[0, t, :, t + 1:]).all() and I[0, t, :, : t + 1].isfinite().all()
    assert R.rel_err(R.indexer_scores(TOKEN, x["q_idx"], x["k_idx"], x["w_idx"], query_chunk=2), I) < 1e-14


# ---------------------------------------------------------------------------------------------------------------
# Selection rules
# ---------------------------------------------------------------------------------------------------------------

def test_block_ties_go_to_lower_j_and_forced_count_within_top_k():
    spec = SMALL                                                     # l' = 16, top_k 4, initial 1, local 1
    T = 160
    S = torch.ones(1, T, spec.heads.kv, 10, dtype=torch.float64)
    idx = R.select_blocks(spec, S, T)
    assert idx[0, 159, 0].tolist() == [0, 1, 2, 9]                  # forced 0 and 9, then ties: 1, 2
    assert idx[0, 100, 1].tolist() == [0, 1, 2, 6]
    R.check_selection(spec, idx, S, T)


def test_forced_blocks_chosen_even_with_the_lowest_score():
    spec = replace(SMALL, **{"selection.local": 2, "selection.top_k": 4})
    T = 160
    S = torch.arange(10, dtype=torch.float64).flip(0).repeat(1, T, spec.heads.kv, 1).clone()   # 9, 8, ..., 0
    S[..., 0] = -5.0                                                 # block 0 is the worst
    idx = R.select_blocks(spec, S, T)
    assert idx[0, 159, 0].tolist() == [0, 1, 8, 9]                  # forced 0, 8, 9; best free is 1
    assert idx[0, 40, 0].tolist() == [0, 1, 2, -1]                  # only 3 candidates: all, padded
    assert idx[0, 5, 0].tolist() == [0, -1, -1, -1]
    R.check_selection(spec, idx, S, T)


def test_planted_block_is_selected():
    spec = replace(SMALL, kv="shared")
    T = 101
    x = inputs_for(spec, 1, T, seed=3)
    u = torch.randn(spec.head_dim.qk, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x["q"][0, 100] = u                                               # every head of the last query asks for u
    x["k"][0, 48:64] = 4 * u / u.norm()                              # selection block 3 is made of u
    res = R.nsa_forward(spec, **x)
    # top_k 4: forced 0 and 100 // 16 = 6, and block 3 must be among the two free picks, for both kv groups.
    for g in range(spec.heads.kv):
        assert 3 in res.indices[0, 100, g].tolist()
        assert int(res.scores[0, 100, g].argmax()) == 3
    R.check_selection(spec, res.indices, res.scores, T)


def test_token_selection_ties_padding_and_planting():
    spec = TOKEN                                                    # top_k 8
    T = 20
    I = torch.zeros(1, T, 2, T, dtype=torch.float64)
    I = I.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[None, :, None, :], -math.inf)
    idx = R.select_tokens(spec, I)
    assert idx[0, 3, 0].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]    # 4 visible keys, padding last
    assert idx[0, 19, 1].tolist() == list(range(8))                  # all tied: the lowest s
    I2 = I.clone()
    I2[0, 19, 0, 17] = 1.0                                           # one key wins
    assert R.select_tokens(spec, I2)[0, 19, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 17]
    R.check_selection(spec, idx, I, T)

    # Through the indexer: w = 0 makes every index score 0 (ties); a planted index key wins for the query that
    # asks for it.
    x = inputs_for(spec, 1, T)
    x["w_idx"] = torch.zeros_like(x["w_idx"])
    res = R.nsa_forward(spec, **x)
    assert res.indices[0, 19, 0].tolist() == list(range(8))
    x = inputs_for(spec, 1, T)
    x["w_idx"] = x["w_idx"].abs()
    x["k_idx"][0, 13] = 10 * x["q_idx"][0, 19].reshape(2, 2, 16).mean(1)   # group g's key matches its heads
    res = R.nsa_forward(spec, **x)
    for g in range(2):
        assert 13 in res.indices[0, 19, g].tolist()
        assert int(res.scores[0, 19, g].argmax()) == 13
    R.check_selection(spec, res.indices, res.scores, T)


def test_indexer_block_scorer():
    # Not generated yet (the validator refuses it), but its rule is defined: score = logsumexp of the block's
    # visible index scores. Build the spec without validation.
    spec = dataclasses.replace(TOKEN, selection=dataclasses.replace(TOKEN.selection, granularity="block", block=8,
                                                                    top_k=3, initial=1, local=1))
    T = 37
    x = inputs_for(spec, 1, T)
    res = R.nsa_forward(spec, **x)
    I = R.indexer_scores(spec, x["q_idx"], x["k_idx"], x["w_idx"])
    t, g, j = 30, 1, 2
    assert abs(res.scores[0, t, g, j] - torch.logsumexp(I[0, t, g, 16:24], 0)) < 1e-14
    assert abs(res.scores[0, t, g, 3] - torch.logsumexp(I[0, t, g, 24:31], 0)) < 1e-14   # only s <= t count
    R.check_selection(spec, res.indices, res.scores, T)


# ---------------------------------------------------------------------------------------------------------------
# Chunking, decoding, API
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "token", "mla_block", "dsa"])
def test_query_chunking_gives_the_same_result(name):
    spec = SPECS[name]
    x = inputs_for(spec, 2, 70)
    whole = R.nsa_forward(spec, **x)
    for chunk in (1, 16, 23):
        part = R.nsa_forward(spec, query_chunk=chunk, **x)
        assert torch.equal(part.indices, whole.indices)
        assert R.rel_err(part.out, whole.out) < 1e-13
        assert R.rel_err(part.lse, whole.lse) < 1e-13
        assert R.rel_err(part.scores, whole.scores) < 1e-13


def test_decoding_rows_match_the_prefill():
    spec = SMALL
    T, n_new = 53, 3
    x = inputs_for(spec, 1, T)
    full = R.nsa_forward(spec, **x)
    x_dec = dict(x, q=x["q"][:, -n_new:], gates=x["gates"][:, -n_new:])
    dec = R.nsa_forward(spec, **x_dec)
    assert torch.equal(dec.indices, full.indices[:, -n_new:])
    assert R.rel_err(dec.out, full.out[:, -n_new:]) < 1e-13
    fed = R.nsa_forward(spec, indices=full.indices[:, -n_new:], **x_dec)
    assert R.rel_err(fed.out, full.out[:, -n_new:]) < 1e-13


def test_given_indices_are_used():
    spec = SMALL
    x = inputs_for(spec, 1, 70)
    res = R.nsa_forward(spec, **x)
    other = torch.full_like(res.indices, -1)
    other[..., 0] = 0                                                # only block 0 for everyone
    fed = R.nsa_forward(spec, indices=other, **x)
    assert torch.equal(fed.indices, other)
    assert torch.equal(fed.scores, res.scores)                       # scores are still the reference's
    o, _ = R.sparse_attention(spec, x["q"], x["k_slc"], x["v_slc"], other, 16)
    assert R.rel_err(fed.branch_out["selection"], o) < 1e-15
    assert R.rel_err(fed.branch_out["selection"], res.branch_out["selection"]) > 1e-3


def test_unknown_or_missing_inputs_raise_type_error():
    x = inputs_for(SMALL, 1, 8)
    with pytest.raises(TypeError, match="unexpected"):
        R.nsa_forward(SMALL, return_lse=True, **x)
    with pytest.raises(TypeError, match="unexpected"):
        R.nsa_forward(SMALL, k=x["k_cmp"], **x)
    del x["v_win"]
    with pytest.raises(TypeError, match="missing"):
        R.nsa_forward(SMALL, **x)


def test_make_inputs_names_and_shapes():
    for spec in SPECS.values():
        x = inputs_for(spec, 2, 16)
        assert list(x) == R.input_names(spec)
        for name, v in x.items():
            assert v.dtype == torch.float64 and (v != 0).all(), name
    x = inputs_for(SPECS["linear_pe_shared"], 2, 16)
    assert x["w_pool_k"].shape == (2, 8 * 48, 48) and x["pe_pool_v"].shape == (8, 32)
    assert "v" not in inputs_for(SPECS["mla_block"], 1, 4) and "gates" not in inputs_for(DSA, 1, 4)
    x = inputs_for(TOKEN, 2, 16)
    assert x["q_idx"].shape == (2, 16, 4, 16) and x["k_idx"].shape == (2, 16, 2, 16) and x["w_idx"].shape == (2, 16, 4)


def test_reference_imports_no_yaml_jinja_sympy():
    code = ("import sys, specgen.reference; bad = [m for m in ('yaml', 'jinja2', 'sympy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# check_selection and rel_err
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_selection():
    spec = replace(SMALL, **{"selection.top_k": 3})
    T = 70
    res = R.nsa_forward(spec, **inputs_for(spec, 1, T, seed=5))
    R.check_selection(spec, res.indices, res.scores, T)
    return spec, res.indices, res.scores, T


def _bad(spec, idx, S, T, match):
    with pytest.raises(AssertionError, match=match):
        R.check_selection(spec, idx, S, T)


def test_check_selection_catches_a_wrong_set(block_selection):
    spec, idx, S, T = block_selection
    t = 69                                           # blocks 0..4 are candidates; 0 and 4 forced, one free pick
    row = idx[0, t, 0].tolist()
    free = [j for j in row if j not in (0, 4)][0]
    worst = min((j for j in range(1, 4) if j != free), key=lambda j: S[0, t, 0, j])
    assert S[0, t, 0, worst] < S[0, t, 0, free] - 1e-2
    bad = idx.clone()
    bad[0, t, 0] = torch.tensor(sorted([0, worst, 4]), dtype=torch.int32)
    _bad(spec, bad, S, T, "not a top-k")
    R.check_selection(spec, bad, S, T, tol=1e3)      # a loose enough tolerance accepts it


def test_check_selection_catches_rule_violations(block_selection):
    spec, idx, S, T = block_selection
    row = lambda *v: torch.tensor(v, dtype=torch.int32)
    cases = {
        "duplicate": (69, row(0, 4, 4)),
        "forced blocks missing": (69, row(1, 2, 3)),
        "padding before": (40, row(0, -1, 2)),
        "not ascending": (69, row(0, 4, 2)),
        "wrong number": (40, row(0, 2, -1)),
        "starts after the query": (20, row(0, 1, 2)),
        "outside": (69, row(0, 4, 9)),
    }
    for match, (t, value) in cases.items():
        bad = idx.clone()
        bad[0, t, 1] = value
        _bad(spec, bad, S, T, match)
    _bad(spec, idx.long(), S, T, "int32")


def test_check_selection_tokens():
    x = inputs_for(TOKEN, 1, 30)
    res = R.nsa_forward(TOKEN, **x)
    R.check_selection(TOKEN, res.indices, res.scores, 30)
    bad = res.indices.clone()
    bad[0, 29, 0, 0] = bad[0, 29, 0, 1]
    _bad(TOKEN, bad, res.scores, 30, "duplicate")
    bad = res.indices.clone()
    unchosen = [s for s in range(30) if s not in bad[0, 29, 0].tolist()]
    worst = min(unchosen, key=lambda s: res.scores[0, 29, 0, s])
    bad[0, 29, 0] = torch.tensor(sorted(bad[0, 29, 0, 1:].tolist() + [worst]), dtype=torch.int32)
    if res.scores[0, 29, 0, worst] < res.scores[0, 29, 0, res.indices[0, 29, 0, 0]] - 1e-2:
        _bad(TOKEN, bad, res.scores, 30, "not a top-k")


def test_rel_err():
    b = torch.tensor([3.0, 4.0, -math.inf], dtype=torch.float64)
    assert R.rel_err(b, b) == 0
    assert R.rel_err(torch.tensor([3.0, 4.0 + 5e-3, -math.inf], dtype=torch.float64), b) == pytest.approx(1e-3)
    assert R.rel_err(torch.tensor([3.0, 4.0, 0.0]), b) == math.inf
    assert R.rel_err(torch.zeros(3), torch.zeros(3)) == 0
    assert R.rel_err(torch.tensor([0.0, 2.0]), torch.zeros(2)) == 2.0
    assert math.isnan(R.rel_err(torch.tensor([math.nan]), torch.tensor([1.0])))
