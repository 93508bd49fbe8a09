"""The selected-block attention's two loop orders (docs/selection_order.md): query outer (each query gathers its
blocks) and block outer (each selected block attends the queries that chose it, then a merge), at the GQA group
sizes real models have, against the float64 reference; the block -> queries work list against a brute-force one;
the plan's choice and the spec field that overrides it.

Tiny shapes under the CPU interpreter (d 16, T 37, compression + selection branches only): the forward of both
orders at group sizes 1, 2, 3, 4, 7 and 16, the backward fed by each order at two of them.
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime, testing
from specgen.compile.plan import make_plan
from specgen.model.errors import SpecError
from specgen.model.spec import load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")   # l=8 d=4 l'=16, top_k 4 (1 initial + 1 local)
GROUPS = {1: (2, 2), 2: (4, 2), 3: (3, 1), 4: (8, 2), 7: (7, 1), 16: (16, 1)}   # group -> (q heads, kv heads)


def order_spec(group: int, order: str, **changes):
    hq, hkv = GROUPS[group]
    return replace(SMALL, name=f"nsa_order_g{group}_{order}", branches=["compression", "selection"], window=None,
                   max_seqlen=256, **{"heads.q": hq, "heads.kv": hkv, "head_dim.qk": 16, "head_dim.v": 16,
                                      "selection.loop_order": order, **changes})


@pytest.mark.parametrize("order", ["query", "kv"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_forward_in_both_orders_matches_the_reference(group, order):
    spec = order_spec(group, order)
    mod = specgen.load(spec)
    assert make_plan(spec).selection_order == order
    testing.check_forward(mod, spec, 1, 37)


@pytest.mark.parametrize("order", ["query", "kv"])
@pytest.mark.parametrize("group", [3, 7])
def test_backward_fed_by_both_orders_matches_the_reference(group, order):
    """The backward reads the forward's selection log-sum-exp and branch output: the kv order's merge must give
    the same ones."""
    spec = order_spec(group, order)
    plan = make_plan(spec)
    assert plan.selection_bwd_order == order
    if order == "kv":
        # The first block is chosen by all 37 queries: more than one work item, so the reduce sums partials.
        assert plan.sel_kv_split < 37
    testing.check_backward(specgen.load(spec), spec, 1, 37)


def test_kv_order_with_mla_and_a_ragged_last_block():
    """MLA (V is K's first d_v dims, read from the key tile) and T ending inside a selection block."""
    spec = replace(SMALL, name="nsa_order_mla_kv", kv="shared", mla=True, branches=["compression", "selection"],
                   window=None, **{"heads.q": 4, "heads.kv": 1, "head_dim.qk": 32, "head_dim.v": 16,
                                   "selection.loop_order": "kv"})
    testing.check_forward(specgen.load(spec), spec, 2, 45)


def _brute_force(indices: torch.Tensor, T: int, unit: int):
    """(segment, query, slot) triples, sorted, from a plain loop."""
    B, _, Hkv, K = indices.shape
    n_units = -(-T // unit)
    out = []
    for b in range(B):
        for t in range(T):
            for g in range(Hkv):
                for j in range(K):
                    u = int(indices[b, t, g, j])
                    if u >= 0:
                        out.append(((b * Hkv + g) * n_units + u, t, j))
    return sorted(out)


@pytest.mark.parametrize("tile", [1, 3, 8])
def test_the_work_list_covers_every_selection_once(tile):
    gen = torch.Generator().manual_seed(testing.fresh_seed())
    B, T, Hkv, K, unit = 2, 41, 3, 4, 8
    n_units = -(-T // unit)
    indices = torch.full((B, T, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for g in range(Hkv):
                visible = t // unit + 1
                n = int(torch.randint(1, min(K, visible) + 1, (1,), generator=gen))
                units = torch.randperm(visible, generator=gen)[:n].sort().values
                indices[b, t, g, :n] = units.to(torch.int32)
    qpos, slot, item_seg, item_start, item_end, n_items = runtime.selection.kv_order_worklist(
        indices, T, unit=unit, tile_queries=tile)
    assert n_items == -(-B * T * Hkv * K // tile) + B * Hkv * n_units   # from shapes alone: no host sync
    seen = []
    for i in range(n_items):
        seg = int(item_seg[i])
        if seg < 0:
            continue
        start, end = int(item_start[i]), int(item_end[i])
        assert start < end and end - start > 0
        for e in range(start, min(start + tile, end)):
            seen.append((seg, int(qpos[e]), int(slot[e])))
    assert seen == _brute_force(indices, T, unit)
    # Every item but a segment's last is full: no work is split finer than the tile.
    real = [i for i in range(n_items) if int(item_seg[i]) >= 0]
    assert len(real) == sum(-(-sum(1 for s in seen if s[0] == seg) // tile) for seg in {s[0] for s in seen})


def test_the_plan_chooses_the_order_from_the_bytes_model():
    """Small groups move fewer bytes block outer; the groups of 16+ that NSA was published with, query outer."""
    for name, order in [("model_llama3_8b", "kv"), ("model_mha32_d128", "kv"), ("model_gemma2_9b", "kv")]:
        plan = make_plan(load_spec(f"specs/models/{name}.yaml"))
        assert plan.selection_order == order, name
        assert plan.sel_kv_bytes["kv"] < plan.sel_kv_bytes["query"]
    for name in ["nsa_paper", "nsa_config_a", "nsa_mqa"]:
        plan = make_plan(load_spec(f"specs/{name}.yaml"))
        assert plan.selection_order == "query", name
        assert plan.sel_kv_bytes["kv"] >= plan.sel_kv_bytes["query"]
    # The spec field overrides the model either way, and leaves the hash of a spec that does not set it alone.
    paper = load_spec("specs/nsa_paper.yaml")
    assert make_plan(replace(paper, **{"selection.loop_order": "kv"})).selection_order == "kv"
    assert replace(paper, **{"selection.loop_order": "auto"}).hash == paper.hash
    assert replace(paper, **{"selection.loop_order": "kv"}).hash != paper.hash


def test_kv_order_needs_blocks_of_at_least_16_tokens():
    with pytest.raises(SpecError, match="selection.loop_order"):
        replace(SMALL, name="x", **{"selection.block": 8, "selection.loop_order": "kv"})
    with pytest.raises(SpecError, match="selection.loop_order"):
        replace(load_spec("specs/nsa_token.yaml"), name="y", **{"selection.loop_order": "kv"})


@pytest.mark.parametrize("group", [2, 7])
def test_kv_order_in_query_chunks_matches_the_reference(group, monkeypatch):
    """Long sequences or large batches go by query chunks so the per-(query, slot) buffers stay bounded
    (runtime.selection.query_chunks): here chunks of a few queries, forward and backward (dK/dV summed over chunks)."""
    spec = order_spec(group, "kv")
    hq, top_k, d = spec.heads.q, spec.selection.top_k, spec.head_dim.v
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 5 * hq * top_k * (d * 2 + 4))   # ~5 queries a chunk
    assert len(runtime.selection.query_chunks(1, 37, hq * top_k * (d * 2 + 4), runtime.launches.KV_PARTIAL_BYTES)) > 5
    mod = specgen.load(spec)
    testing.check_forward(mod, spec, 1, 37)
    testing.check_backward(mod, spec, 1, 37)


def test_query_chunks_cover_every_position_once():
    assert runtime.selection.query_chunks(2, 10, 100, 800) == [(0, 4), (4, 8), (8, 10)]
    assert runtime.selection.query_chunks(1, 10, 100, 10**9) == [(0, 10)]
    assert runtime.selection.query_chunks(1, 10, 100, 1) == [(t, t + 1) for t in range(10)]   # never empty chunks
    assert runtime.selection.query_chunks(1, 0, 100, 800) == [(0, 0)]


# Each score form and each merge of a trip's chunk into the running top-n once: weighted sums with the bitonic merge
# (top_k 16: the chunk as wide as the buffer), overlap products with the top-k of the joined keys (top_k 4). The
# merge is the same code after either form, so sums with the joined top-k would repeat both paths. The products'
# case has l = 32 over l' = 16 (a compression block spans three selection blocks, and a trip's spill reaches two of
# the next trip's), so its selection runs block-outer, which the interpreter runs in a fraction of the per-query
# programs of l' = 8.
@pytest.mark.parametrize("blocks,overlap,top_k", [((32, 4, 16), "dot", 4), ((8, 4, 16), "sums", 16)])
def test_block_scores_across_loop_trips_match_the_reference(blocks, overlap, top_k):
    """The scoring kernel walks the selection blocks BJ at a time and carries each trip's spill into the next: a
    sequence of several trips, with the weighted-sum scores (a compression block within two selection blocks) and
    the overlap-product ones (l > l': a block spans three); top_k 16 merges each trip's chunk of as many blocks
    into the running top-n by one bitonic merge (top_k 4: a top-k of the joined keys)."""
    l, d, sel = blocks
    spec = replace(SMALL, name=f"nsa_trips_{overlap}_{top_k}", branches=["compression", "selection"], window=None,
                   max_seqlen=1024, **{"heads.q": 2, "heads.kv": 1, "head_dim.qk": 16, "head_dim.v": 16,
                                       "compression.block": l, "compression.stride": d, "selection.block": sel,
                                       "selection.top_k": top_k})
    plan = make_plan(spec)
    assert plan.score_overlap == overlap
    assert (plan.score_bj == plan.topk_pad) == (top_k == 16)
    bt, bj, trip = plan.score_bt, plan.score_bj, plan.score_bj * sel
    T = 2 * trip + bt + 5
    # The last query tile (the kernel's rule: the trips whose chunk its first query sees whole go unmasked) takes
    # two unmasked trips, the second carrying the first's spill, then a masked third that ends inside its chunk
    # (ragged); earlier tiles take the masked trips after one unmasked trip or none.
    t_lo = (T - 1) // bt * bt
    full_end = (t_lo - l + 1 - (plan.score_bnc - 1) * d) // sel + 1
    assert -(-full_end // bj) == 2
    assert 2 * bj < (T - 1) // sel + 1 < 3 * bj
    testing.check_forward(specgen.load(spec), spec, 1, T)
