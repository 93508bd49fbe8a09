"""Chunked prefill into a cache (tier 2, docs/varlen.md "Chunked prefill"): a ragged batch prefilled in chunks of
several sizes — one-token chunks, chunks not aligned to the compression stride, the selection block or the page,
empty chunks — gives the outputs of one prefill (float64 reference of the whole prompt, and the single packed
forward) and leaves the cache bit for bit as one `cache.prefill` does; decoding after it gives the same bits;
contiguous and paged caches; the argument errors; the layers' `prefill`."""

import pytest
import torch

import specgen
from specgen.model.spec import load_spec, replace
from specgen.testing import test_device
from specgen.testing.prefill import check_chunked_prefill, check_prefill_argument_errors
from small_specs import small_token_spec

SMALL = load_spec("specs/nsa_small.yaml")     # l = 8, d = 4, l' = 16, page 64
DSA = load_spec("specs/dsa_small.yaml")

# Rounds x sequences: 1-token chunks (a first one, and one mid-prompt that completes a compression block), empty
# chunks (a sequence that waits, one that never starts), chunk ends off the stride, block and selection block,
# blocks straddling the cache/chunk boundary, both sequences with pooled blocks.
RAGGED = [[1, 0, 0], [6, 11, 0], [13, 1, 0]]                                  # prompts 20, 12, 0
EVEN = [[1, 1], [19, 19]]                                                     # batched: same S per round

VARIANTS = {
    "nsa_small": lambda: SMALL,
    # pages of 16 tokens, compression blocks of 32 over two pages, selection blocks are pages; the blocks pooled by
    # a linear pool with a position embedding (the cache pools them from rows gathered over two pages)
    "nsa_page16_l32_d8_linear": lambda: replace(SMALL, name="nsa_small_pf_page16_linear", **{
        "decode.page_size": 16, "compression.block": 32, "compression.stride": 8, "selection.block": 16,
        "compression.pool": "linear", "compression.position_embedding": True}),
    "nsa_indexer_blocks": lambda: small_token_spec("nsa_token_pf_block", **{
        "selection.granularity": "block", "selection.block": 16, "selection.top_k": 3, "selection.initial": 1,
        "selection.local": 1}),
    "dsa_small": lambda: DSA,
    "dsa_mla": lambda: replace(DSA, name="dsa_small_pf_mla", **{"heads.kv": 1, "mla": True, "head_dim.qk": 80,
                                                               "head_dim.v": 64}),
}

# (variant, schedule, paged, packed, keys): each variant once; contiguous and paged, packed and batched (a batched
# call is the packed path after its conversion) spread over them. `keys` (paged): how the chunks read the cache's
# keys (runtime.prefill.KEY_READ, docs/varlen.md "Keys"): "gather" gathers pages whatever the table (the page16
# variant's third round gathers the window's keys from its first visible page on, skipping a page per sequence),
# "in place" has consecutive pages, read where they are (no byte gathered), "auto" a random table of one page a
# sequence (read in place).
# The 1-token and empty chunks run on both families (RAGGED); the other variants need two rounds for what is theirs.
CASES = [
    ("nsa_small", RAGGED, False, True, None),
    # chunks cross pages of 16 and blocks of 32
    ("nsa_page16_l32_d8_linear", [[3, 20], [30, 18], [9, 14]], True, True, "gather"),
    ("nsa_page16_l32_d8_linear", [[20, 3], [18, 30]], True, True, "in place"),
    ("nsa_indexer_blocks", [[2, 9], [37, 25]], True, True, "gather"),
    ("dsa_small", RAGGED, False, True, None),
    ("dsa_mla", EVEN, True, False, "auto"),
]


@pytest.mark.parametrize("variant,schedule,paged,packed,keys", CASES,
                         ids=[f"{v}-{'paged' if p else 'contig'}-{'packed' if k else 'batched'}-{i}"
                              for i, (v, _, p, k, _) in enumerate(CASES)])
def test_chunked_prefill_equals_one_prefill(variant, schedule, paged, packed, keys):
    spec = VARIANTS[variant]()
    res = check_chunked_prefill(specgen.load(spec), spec, schedule, paged=paged, packed=packed,
                                pages="consecutive" if keys == "in place" else "shuffled",
                                key_read="gather" if keys == "gather" else None)
    if keys == "gather":
        assert res["gathered_bytes"] > 0
    elif keys is not None:
        assert res["gathered_bytes"] == 0, "consecutive pages (or one per sequence) are read in place"


@pytest.mark.parametrize("variant", ["nsa_small", "dsa_small"])
def test_prefill_bad_arguments_are_named(variant):
    spec = VARIANTS[variant]()
    check_prefill_argument_errors(specgen.load(spec), spec)


def test_layer_prefill_in_chunks_equals_the_layer():
    """NSAttention.prefill over chunks (RoPE at the cache positions) equals the layer on the whole prompt."""
    mod = specgen.load(SMALL)
    device = test_device()
    torch.manual_seed(0)
    layer = mod.NSAttention(32, device=device).to(mod.DTYPE)
    lens = [23, 9]
    hidden = torch.randn(sum(lens), 32, device=device, dtype=mod.DTYPE)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
    with torch.no_grad():
        want = layer(hidden, cu_seqlens=cu, max_seqlen=max(lens))
    cache = mod.NSACache(2, max_seqlen=32, device=device)
    got, held = [], [0, 0]
    for chunk in ([1, 0], [22, 9]):     # a 1-token and an empty chunk, then RoPE at cache positions 1 and 0
        rows = torch.cat([hidden[cu[b] + held[b]:cu[b] + held[b] + chunk[b]] for b in range(2)])
        cu_q = torch.tensor([0, chunk[0], sum(chunk)], dtype=torch.int32, device=device)
        y = layer.prefill(rows, cache, cu_seqlens_q=cu_q, max_seqlen_q=max(chunk))
        got.append((y[:chunk[0]], y[chunk[0]:]))
        held = [h + c for h, c in zip(held, chunk)]
    got = torch.cat([torch.cat([g[b] for g in got]) for b in range(2)])
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < 2e-3, err
    assert cache.host_seqlens == lens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.gpu
@pytest.mark.parametrize("name,schedule", [
    ("nsa_paper", [[1, 0], [700, 300], [1, 1], [1346, 1747]]),
    ("dsa_v32", [[1, 0], [700, 300], [1, 1], [1346, 1747]]),
    ("dsa_small_pf_fp8", [[1, 3], [300, 0], [211, 500]]),
])
def test_chunked_prefill_realistic(name, schedule):
    """On the GPU in the spec's dtype (fp8 index keys for dsa_v32): 2048-token prompts in ragged chunks, paged."""
    if name == "dsa_small_pf_fp8":
        spec = replace(DSA, name=name, **{"indexer.dtype": "fp8_e4m3", "indexer.head_dim": 32,
                                          "selection.top_k": 8})
    else:
        spec = load_spec(f"specs/{name}.yaml")
    check_chunked_prefill(specgen.load(spec), spec, schedule, paged=True, packed=True, query_chunk=256)
