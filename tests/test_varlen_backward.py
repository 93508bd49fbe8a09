"""The packed (varlen) training call run natively, forward and backward (docs/varlen.md, "Native backward"): the
gradients of a batch of one long sequence and many short ones (empty, one token, shorter than every block, lengths
that are multiples of no block size) against the float64 reference run per sequence, with the padded batch never
built, every fresh buffer poisoned and the largest buffer bounded by a multiple of the packed tokens; and the
selection's packed inverse index against a brute-force one. The example specs' own packed backward tests are in
generated/test_<name>.py; forward-only ones in tests/test_varlen.py.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime, testing
from specgen.model.spec import load_spec, replace
from specgen.runtime import backward as runtime_backward
from specgen.testing import varlen as testing_varlen

SMALL = load_spec("specs/nsa_small.yaml")
# One sequence of five selection blocks (77 tokens, a multiple of no block size: top-4 drops one; 3 query tiles of
# 32, 2 key tiles of 64) and short ones: empty, one token, shorter than a compression (8) or selection (16) block,
# lengths that are multiples of no block size (a neighbour's block would straddle the boundary if anything crossed
# it). The trailing empty sequences make the padded batch (15 x 77 rows) exceed the allocation bound at the cost of
# one early-exit program each. (Few tokens and few non-empty sequences: the query-order kernels run one program per
# token, and every sequence costs the interpreter a few programs of every launch, the block scorer's most of all.)
LONG_AND_SHORT = [77] + [0, 1, 7, 17, 2, 0, 9, 3] + [0] * 6


def small(name: str, **changes):
    return replace(SMALL, name=f"nsa_small_vbwd_{name}", **changes)


@pytest.fixture(scope="module", autouse=True)
def _specgen_cache(tmp_path_factory):
    """Build into a temporary cache, never into ~/.cache/specgen."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECGEN_CACHE", str(tmp_path_factory.mktemp("specgen_cache")))
        yield




# Each selection loop order once, at GQA groups 2 (kv order) and 1 (query order): the kv-order and query-order
# kernels at groups 1 and 2 are one code path apiece (the group a constexpr, the rows wider), and DSA runs the
# query-order ones at group 2; DSA token selection; and the scatter backward (atomics) of a DeepSeek-V3.2 miniature
# (MLA, 64 heads in two chunks: the plan's scatter path), on a shorter batch (64 heads per query cost the
# interpreter most; fp32 rows make padding visible sooner).
SHORTER = [24, 0, 1, 5, 3, 0, 2]
NATIVE = {
    "kv_order_gqa2": lambda: (SMALL, LONG_AND_SHORT),
    "query_order_gqa1": lambda: (small("gqa1_query", **{"heads.q": 2, "heads.kv": 2,
                                                        "selection.loop_order": "query"}), LONG_AND_SHORT),
    # a group of 2: the inverse-index kernels (groups of 4 and up take the scatter path: generated/test_dsa_small.py)
    "dsa_token": lambda: (replace(load_spec("specs/dsa_small.yaml"), name="dsa_vbwd_token_g2", **{"heads.q": 4}),
                          LONG_AND_SHORT),
    "dsa_scatter_mla": lambda: (replace(load_spec("specs/dsa_v32.yaml"), name="dsa_vbwd_scatter_mla", dtype="fp32",
                                        max_seqlen=4096, **{"heads.q": 64, "head_dim.qk": 48, "head_dim.v": 32,
                                                            "selection.top_k": 8, "indexer.heads": 2,
                                                            "indexer.head_dim": 32, "indexer.dtype": "bf16"}),
                                SHORTER),
}


@pytest.mark.parametrize("variant", list(NATIVE))
def test_native_backward_never_pads(variant, monkeypatch):
    """`<family>_attention` on the long-and-short batch, forward and backward: the output and every gradient (q,
    every k/v input, the gates) match the per-sequence reference, the padded batch is never built (`Packed.pad`
    raises), no gradient row is left unwritten (fresh buffers are NaN), and no buffer is larger than 4 bytes per
    (token, query head, selected block (block-outer order) or branch, head dim) plus the index entries and the
    indexer's fixed workspace, which the padded batch's q alone exceeds. Small budgets make the block-outer passes
    go by query chunks and the inverse index by groups of packed rows that cut the long sequence."""
    spec, lengths = NATIVE[variant]()
    mod = specgen.load(spec)
    sel = spec.selection
    assert (mod._DESC.selection_backward == "scatter") == (variant == "dsa_scatter_mla")

    def no_padding(*args, **kwargs):
        raise AssertionError("the native packed training call padded its inputs")

    monkeypatch.setattr(runtime.Packed, "pad", no_padding)
    per_query = spec.heads.q * sel.top_k * (max(spec.head_dim.qk, spec.head_dim.v) * 2 + 4)
    partial_bytes = 20 * per_query
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", partial_bytes)
    monkeypatch.setattr(runtime.indexer, "INDEX_WORKSPACE_BYTES", 1 << 14)
    # The inverse index by groups of 50 packed rows: cuts at rows 50 (the long sequence) and 100 (the one of 17).
    monkeypatch.setattr(mod, "INVERSE_INDEX_ENTRIES", 50 * spec.heads.kv * sel.top_k)

    total, n, longest = sum(lengths), len(lengths), max(lengths)
    # Per token, in 4-byte words: the saved branch outputs and the fp32 dQ (a head dim per query head and
    # branch), the selection's index entries (int64); plus the block-outer passes' per-chunk partials and the
    # indexer's fixed workspace, neither of which grows with the batch.
    per_token = spec.heads.q * len(spec.branches) * max(spec.head_dim.qk, spec.head_dim.v) + 2 * spec.heads.kv * sel.top_k
    workspace = 16 * spec.heads.kv * -(-longest // sel.block) + (1 << 12)
    bound = 4 * (total * per_token + workspace) + partial_bytes
    padded_q = n * longest * spec.heads.q * spec.head_dim.qk * mod.DTYPE.itemsize
    assert bound < padded_q, "the batch must make padding visible: the padded q alone would exceed the bound"

    watch = testing_varlen.AllocationWatch()
    errors = testing_varlen.check_backward_varlen(mod, spec, lengths, seed=11, around=lambda: watch)
    assert set(errors) == set(testing.differentiable_inputs(spec))
    assert watch.largest[0] <= bound, f"largest buffer {watch.largest} exceeds {bound} bytes ({variant})"


def _brute_inverse_index(indices, cu, tile, unit, heads_kv):
    """{(sequence, key tile, kv head): [(packed row, bits), ...]} of a packed selection, by loops."""
    out: dict = {}
    for i in range(cu.numel() - 1):
        for r in range(int(cu[i]), int(cu[i + 1])):
            for g in range(heads_kv):
                for u in indices[r, g].tolist():
                    if u < 0:
                        continue
                    key = (i, u * unit // tile, g)
                    rows = out.setdefault(key, {})
                    rows[r] = rows.get(r, 0) | (1 << ((u * unit % tile) // unit))
    return {k: sorted(v.items()) for k, v in out.items()}


@pytest.mark.parametrize("unit,tile", [(16, 16), (4, 16)])
def test_packed_inverse_index(unit, tile):
    """The packed block -> queries index: per sequence and key tile of the layout's table, the packed rows that
    selected a unit in it (ascending) and, with several units per tile, which ones; built by groups of rows (each
    group's qpos in packed rows), as the backward does."""
    lengths = [37, 0, 1, 9, 16, 0, 23]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total, heads_kv, k = sum(lengths), 2, 3
    packed = runtime.check_varlen("f", cu, max(lengths), total, cu.device, 4096, "s")
    lay = packed.layout()
    gen = torch.Generator().manual_seed(5)
    rows = []
    for n in lengths:
        for t in range(n):
            for g in range(heads_kv):
                units = torch.randperm(t // unit + 1, generator=gen)[:k].sort().values.tolist()
                rows.append(units + [-1] * (k - len(units)))
    indices = torch.tensor(rows, dtype=torch.int32).view(total, heads_kv, k)
    want = _brute_inverse_index(indices, cu, tile, unit, heads_kv)
    table, n_programs = lay.token_tiles(tile)
    got: dict = {}
    for r0 in range(0, total, 20):
        offsets, qpos, bits = runtime_backward.selection_inverse_index(
            indices[None, r0:r0 + 20], total, tile, unit=unit, heads_kv=heads_kv, units_per_tile=tile // unit,
            varlen=(lay, r0))
        assert offsets.numel() == n_programs * heads_kv + 1
        for p in range(n_programs):
            seq, j = table[p].tolist()
            for g in range(heads_kv):
                a, b = offsets[p * heads_kv + g].item(), offsets[p * heads_kv + g + 1].item()
                if seq < 0:
                    assert a == b, "a program past the batch's tiles has entries"
                    continue
                entries = [(qpos[e].item(), bits[e].item() if tile > unit else 1 << 0) for e in range(a, b)]
                got.setdefault((seq, j, g), []).extend(entries)
    got = {key: v for key, v in got.items() if v}
    if tile == unit:
        want = {key: [(r, 1) for r, _ in v] for key, v in want.items()}
    assert got == want
