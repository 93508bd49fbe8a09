"""Decoding on small mirror specs (tier 2): variants the example specs do not cover, and the top-k rule.

The example specs' decode tests live in their generated test files (generated/test_<name>.py); these add linear
pooling with a position embedding, branch subsets, a non-power-of-two group, bf16 (widened dots), block selection
ranked by an indexer and MLA, each paged with a shuffled block table and q_len = 2, against the float64 reference.
"""

import pytest
import torch
import triton

import specgen
from specgen.reference._core import top_units
from specgen.spec import load_spec, replace
from specgen.testing_decode import check_decode
from specgen.testing_plan import decode_prompts
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
    check_decode(mod, spec, decode_prompts(spec, small=False), q_len=q_len, steps=2, paged=True)


def test_indexer_top_k_rule_matches_the_reference_exactly_with_ties():
    """Integer scores make many exact ties: the decode top-k (torch ops, indexer specs) must pick the reference's
    units (lower index wins), with forced blocks, -1 padding and -0.0 tying with 0.0."""
    spec = VARIANTS["token_block_indexer"]()
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(0)
    B, QL, G, N = 3, 2, 2, 40
    scores = torch.randint(-2, 3, (B, QL, G, N), generator=gen).float()
    scores[0, 0, 0, :5] = -0.0
    t = torch.tensor([[5, 6], [200, 201], [631, 632]])     # few candidates, some, all (l' = 16)
    sel = spec.selection
    got = mod._top_units(scores, t, sel.block, sel.top_k, sel.initial, sel.local)
    for b in range(B):
        want = top_units(scores[b:b + 1], t[b], sel.block, sel.top_k, sel.initial, sel.local)
        assert torch.equal(got[b:b + 1], want), (b, got[b].tolist(), want.tolist())


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
    idx = torch.full((B, QL, G, sel.top_k), 99, dtype=torch.int32)
    mod._decode_select_blocks_kernel[(B * QL * G,)](P, lengths, idx, QL, NC, n_sel,
                                                    NSEL_PAD=triton.next_power_of_2(n_sel))
    S = torch.einsum("bqgi,ij->bqgj", P.double(), overlap_weights(spec, NC, n_sel))
    for b in range(B):
        want = top_units(S[b:b + 1], t[b], sel.block, sel.top_k, sel.initial, sel.local)
        assert torch.equal(idx[b:b + 1], want), (b, idx[b].tolist(), want.tolist())


@pytest.mark.parametrize("field,value,words", [("decode.page_size", 24, "power of two"),
                                               ("decode.page_size", 8, "power of two >= 16"),
                                               ("decode.max_q_len", 0, "outside 1..64"),
                                               ("decode.max_q_len", 65, "outside 1..64")])
def test_decode_spec_errors_name_the_field_and_the_fix(field, value, words):
    from specgen.errors import SpecError
    from specgen.spec import spec_from_yaml

    section, key = field.split(".")
    with pytest.raises(SpecError) as info:
        spec_from_yaml(f"name: x\n{section}:\n  {key}: {value}\n", file="x.yaml")
    text = str(info.value)
    assert field in text and words in text and "fix:" in text and "x.yaml:3" in text, text


def test_decode_section_defaults():
    spec = load_spec("specs/nsa_paper.yaml")
    assert (spec.decode.max_q_len, spec.decode.page_size) == (4, 64)
