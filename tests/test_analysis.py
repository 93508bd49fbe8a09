"""The symbolic cost analysis against brute-force counts that follow docs/semantics.md literally."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from specgen.compile import analysis as A
from specgen.model.spec import load_spec, replace, spec_from_mapping

SPECS = Path(__file__).resolve().parent.parent / "specs"


def spec(name: str):
    return load_spec(SPECS / f"{name}.yaml")


def small_token_spec():
    """nsa_token shrunk to a size where a Python loop over every (t, s) pair is instant."""
    return replace(spec("nsa_token"), **{
        "heads.q": 4, "heads.kv": 2, "head_dim.qk": 32, "head_dim.v": 32, "selection.top_k": 8,
        "indexer.heads": 2, "indexer.head_dim": 16, "compression.block": 8, "compression.stride": 4,
        "window.size": 16, "max_seqlen": 4096})


def dsa_spec():
    return spec_from_mapping({"name": "dsa_v32", "family": "dsa"})


# ---------------------------------------------------------------------------------------------------------------
# Brute force: walk every query, count what it attends by the rules, multiply by the per-key cost
# ---------------------------------------------------------------------------------------------------------------

def brute_keys(s, T: int, rng: random.Random) -> dict[str, int]:
    """Σ over queries t < T of the keys each branch attends (index pairs for the indexer)."""
    out = {}
    if s.selection is not None and s.selection.scorer == "indexer":
        out["indexer"] = sum(t + 1 for t in range(T))
    for name in s.branches:
        if name == "compression":
            l, d = s.compression.block, s.compression.stride
            blocks = [i for i in range(T) if i * d + l <= T]  # complete blocks only
            out[name] = sum(1 for t in range(T) for i in blocks if i * d + l - 1 <= t)
        elif name == "selection":
            sel = s.selection
            lp, k = sel.block, sel.top_k
            total = 0
            for t in range(T):
                cands = list(range(t // lp + 1))  # j·l' ≤ t
                if len(cands) <= k:
                    chosen = cands
                else:
                    forced = {0} if sel.initial else set()
                    forced |= {t // lp - x for x in range(sel.local)}
                    rest = [j for j in cands if j not in forced]
                    # the winners depend on the data; the token count must not, so pick them at random
                    chosen = sorted(forced) + rng.sample(rest, k - len(forced))
                assert len(set(chosen)) == min(k, len(cands))
                total += sum(1 for j in chosen for tok in range(j * lp, (j + 1) * lp) if tok <= t)
            out[name] = total
        elif name == "window":
            w = s.window.size
            out[name] = sum(1 for t in range(T) for x in range(T) if t - w < x <= t)
    return out


def brute_flops(s, T: int, rng: random.Random) -> dict[str, int]:
    keys = brute_keys(s, T, rng)
    attn = 2 * s.heads.q * (s.head_dim.qk + s.head_dim.v)
    out = {}
    for name, n in keys.items():
        if name == "indexer":
            out[name] = n * 2 * s.heads.kv * s.indexer.heads * (s.indexer.head_dim + 1)
        else:
            out[name] = n * attn
    if "compression" in out:
        l, d = s.compression.block, s.compression.stride
        n_blocks = sum(1 for i in range(T) if i * d + l <= T)
        dkv = s.head_dim.qk + (0 if s.mla else s.head_dim.v)
        out["compression"] += 2 * l * n_blocks * s.heads.kv * dkv  # mean pool: l multiply-adds per value
    return out


T_VALUES = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 66, 79, 100, 127, 129, 200, 257, 300]


@pytest.mark.parametrize("make", [lambda: spec("nsa_small"), small_token_spec], ids=["nsa_small", "token_small"])
def test_symbolic_flops_match_brute_force(make):
    s = make()
    a = A.analyse(s)
    rng = random.Random(0)
    for T in T_VALUES:
        want = brute_flops(s, T, rng)
        got = {b.name: A.evaluate(b.flops, T) for b in a.branches}
        assert got == pytest.approx(want, rel=0, abs=0), f"T={T}"
        assert A.flops(s, T) == sum(want.values())
        assert A.evaluate(a.dense.flops, T) == 2 * s.heads.q * (s.head_dim.qk + s.head_dim.v) * T * (T + 1) // 2


def test_selection_without_local_block_is_the_upper_bound():
    s = replace(spec("nsa_small"), **{"selection.local": 0})
    lp, k = s.selection.block, s.selection.top_k
    attn = 2 * s.heads.q * (s.head_dim.qk + s.head_dim.v)
    for T in (10, 64, 65, 150):
        bound = sum(min(t + 1, k * lp) for t in range(T)) * attn
        assert A.evaluate(A.analyse(s).branch("selection").flops, T) == bound


def test_decode_bytes_match_brute_force():
    for s in (spec("nsa_small"), small_token_spec()):
        row = s.heads.kv * (s.head_dim.qk + s.head_dim.v) * 2  # fp16 / bf16
        rng = random.Random(1)
        for ctx in (1, 5, 8, 16, 17, 64, 65, 100, 257):
            # one query at position ctx − 1: its keys are the increase of the forward sums from ctx − 1 to ctx
            before = brute_keys(s, ctx - 1, rng)
            after = brute_keys(s, ctx, rng)
            got = A.decode_bytes(s, ctx)
            for name in s.branches:
                assert got[name] == (after[name] - before.get(name, 0)) * row, (name, ctx)
            assert got["dense"] == ctx * row


def test_paper_decode_ratio_at_64k():
    # docs/marks.md: 5,630 of 65,536 tokens per step, 11.6x fewer bytes
    s = spec("nsa_paper")
    b = A.decode_bytes(s, 65536)
    row = 4 * (192 + 128) * 2
    assert b["compression"] / row == 4095 and b["selection"] / row == 1024 and b["window"] / row == 512
    assert A.decode_ratio(s, 65536) == pytest.approx(11.6, rel=0.03)


def test_paper_forward_speedup_and_marks():
    s = spec("nsa_paper")
    # ~3,584 keys per query against 32,768 dense (~9.1x); the early-sequence ramp makes the exact count a bit lower
    assert 8.8 < A.promised_speedup(s, 65536) < 9.6
    # config A's selection gather at 64k, if every (t, kv head) loads its 16 blocks: 137 GB (docs/marks.md)
    a = A.analyse(spec("nsa_config_a"))
    gather = A.evaluate(a.branch("selection").bytes, 65536)
    assert gather == pytest.approx(137e9, rel=0.03)


def test_dsa_forward_flops_follow_the_marks_formula():
    s = dsa_spec()
    k = s.selection.top_k
    for T in (100, 2048, 5000):
        attended = sum(min(t + 1, k) for t in range(T))
        assert A.evaluate(A.analyse(s).branch("selection").flops, T) == attended * 2 * 128 * (576 + 512)
    assert [b.name for b in A.analyse(s).branches] == ["indexer", "selection"]


@pytest.mark.parametrize("d,parts", [(192, (128, 64)), (576, (512, 64)), (48, (32, 16)), (128, (128,)),
                                     (16, (16,)), (80, (64, 16))])
def test_head_dim_parts(d, parts):
    assert A.head_dim_parts(d) == parts
    assert sum(parts) == d


def test_padding_waste():
    assert A.padding_waste(192) == (256, 0.25)
    assert A.padding_waste(128) == (128, 0.0)


def test_overlap_weights():
    assert A.overlap_weights(spec("nsa_paper")) == (1, 2, 2, 2, 1)
    assert A.overlap_weights(spec("nsa_small")) == (1, 2, 2, 2, 1)
    assert A.overlap_weights(spec("nsa_config_a")) == (1,)
    assert A.overlap_weights(spec("nsa_token")) == ()  # ranked by the indexer: no mapping


@pytest.mark.parametrize("l,d,lp", [(32, 16, 64), (64, 16, 32), (64, 64, 64), (32, 32, 64), (64, 16, 16),
                                    (16, 16, 64), (32, 8, 32)])
def test_overlap_weights_follow_the_rule_and_the_closed_form(l, d, lp):
    s = replace(spec("nsa_paper"), **{"compression.block": l, "compression.stride": d, "selection.block": lp})
    w = A.overlap_weights(s)
    # by hand from the rule: each d-token chunk of selection block j is covered by l/d compression blocks
    assert sum(w) == lp // d * (l // d)
    # the closed form quoted in explain
    n = (l + lp) // d - 1
    assert w == tuple(min(k + 1, l // d, lp // d, n - k) for k in range(n))


def test_large_T_form_is_close():
    s = spec("nsa_paper")
    for b in A.analyse(s).branches:
        exact = A.evaluate(b.flops, 65536)
        approx = A.evaluate(A.large_T(b.flops), 65536)
        assert approx == pytest.approx(exact, rel=1e-3), b.name


def test_naive_intermediates_dwarf_the_kernels():
    a = A.analyse(spec("nsa_paper"))
    kernel = sum(A.evaluate(b.intermediates, 65536) for b in a.branches)
    naive = A.evaluate(a.naive_intermediates, 65536)
    # [T, Hq, Nc] fp32 compression probabilities alone: 65536 · 64 · 4095 · 4 B ≈ 64 GiB
    assert naive - kernel == pytest.approx(65536 * 64 * 4095 * 4 + 65536 * 4 * 1024 * 4)


@pytest.mark.parametrize("path", sorted(p for p in SPECS.glob("*.yaml") if not p.name.endswith(".sweep.yaml")), ids=lambda p: p.stem)
def test_explain_runs_for_every_spec(path):
    s = load_spec(path)
    text = A.explain(s, 4096)
    for b in A.analyse(s).branches:
        assert b.name in text
    for word in ("dense", "speedup", "memory-access ratio", "naive", "constraints"):
        assert word in text
    assert A.explain(s)  # default T = max_seqlen
    assert A.analyse(s) is A.analyse(load_spec(path))  # cached per spec


def test_explain_dsa():
    text = A.explain(dsa_spec(), 16384)
    assert "indexer" in text and "selection" in text and "576 = 512 + 64" in text


def test_backward_flops_and_bytes():
    """The backward counts 2.5x each attention branch's forward FLOPs (FlashAttention's convention) and no indexer;
    its bytes are at least twice the attention branches' forward reads."""
    s = spec("nsa_small")
    assert A.flops(s, 64, pass_="backward") == pytest.approx(2.5 * A.flops(s, 64))
    d = dsa_spec()
    attention = sum(A.evaluate(b.flops, 4096) for b in A.analyse(d).branches if b.name != "indexer")
    assert A.flops(d, 4096, "backward") == pytest.approx(2.5 * attention) and attention < A.flops(d, 4096)
    assert A.backward_bytes(s, 64) > 2 * A.forward_bytes(s, 64)  # no indexer: every branch read twice
    with pytest.raises(ValueError, match="pass_"):
        A.flops(s, 64, pass_="sideways")
