"""The forward's plan variants (specgen.compile.variants), each against the float64 reference under the interpreter
at tiny shapes: the block scorer's key-major score tile and int32 keys (several loop trips, so the unmasked trips
run; groups whose heads take 0 and 3 column bits, padded head rows included), and the block-outer selection's
forced blocks attended in its merge (the kv-order group sizes, query chunks, given indices, the backward fed by it).
"""

from __future__ import annotations

import pytest
import torch

from specgen import runtime, testing
from specgen.compile.plan import make_plan
from specgen.compile.variants import PLAN_VARIANTS, load_variant, variant_plan
from specgen.model.spec import load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")   # l=8 d=4 l'=16, top_k 4 (1 initial + 1 local), fp16
GROUPS = {1: (2, 2), 2: (4, 2), 3: (3, 1), 4: (8, 2), 7: (7, 1), 16: (16, 1)}   # group -> (q heads, kv heads)


def small_spec(group: int, tag: str, **changes):
    hq, hkv = GROUPS[group]
    return replace(SMALL, name=f"nsa_fv_{tag}_g{group}", branches=["compression", "selection"], window=None,
                   max_seqlen=512, **{"heads.q": hq, "heads.kv": hkv, "head_dim.qk": 16, "head_dim.v": 16,
                                      "selection.loop_order": "kv" if group <= 8 else "query", **changes})


def test_variants_apply_where_their_tiles_do():
    llama = load_spec("specs/models/model_llama3_8b.yaml")
    plan = variant_plan(llama, ["score_km", "score_key32", "sel_forced"])
    assert plan.score_key_major and plan.score_head_bits == (0, 3) and plan.score_pos_bits == (1, 2, 4, 5)
    assert plan.score_index_bits == 10           # 1024 blocks of 64 at 64k
    assert plan.sel_kv_forced
    assert not make_plan(llama).score_key_major  # the defaults are unchanged
    paper = load_spec("specs/nsa_paper.yaml")    # group 16: 256 score rows, query-outer selection
    assert variant_plan(paper, ["score_km"]) is None and variant_plan(paper, ["sel_forced"]) is None
    assert variant_plan(paper, ["score_key32"]).score_index_bits == 10
    assert set(PLAN_VARIANTS) == {"score_masked", "score_km", "score_key32", "sel_forced", "sel_w4",
                                  "sel_wl_torch", "bwd_scatter"}
    assert variant_plan(llama, ["bwd_scatter"]) is None                      # no token selection
    assert variant_plan(load_spec("specs/dsa_v32.yaml"), ["bwd_scatter"]) is None   # already on the scatter path
    assert variant_plan(load_spec("specs/models/dsa_gqa16_4.yaml"), ["bwd_scatter"]) is None   # the plan's path
    pair = variant_plan(replace(load_spec("specs/dsa_small.yaml"), name="g2", **{"heads.q": 4}),
                        ["bwd_scatter"]).backward   # a group of 2: the plan keeps the inverse index
    assert (pair.scatter, pair.scatter_gp, pair.scatter_chunks) == (True, 16, 1)
    assert make_plan(llama).sel_kv_worklist == "triton"
    assert variant_plan(llama, ["sel_wl_torch"]).sel_kv_worklist == "torch"
    assert variant_plan(paper, ["sel_wl_torch"]).sel_kv_worklist == "torch"   # its backward is block outer
    assert variant_plan(load_spec("specs/nsa_token.yaml"), ["sel_wl_torch"]) is None   # no block-outer pass
    gemma = load_spec("specs/models/model_gemma2_9b.yaml")   # 64 rows x 256 dims: two warpgroups by default
    assert make_plan(gemma).sel_kv_warps == 8 and variant_plan(gemma, ["sel_w4"]).sel_kv_warps == 4
    assert variant_plan(gemma, ["sel_forced"]).sel_kv_forced_warps == 8 and plan.sel_kv_forced_warps == 4
    assert variant_plan(llama, ["sel_w4"]) is None


@pytest.mark.parametrize("group,variants", [(1, "score_km,score_key32"), (7, "score_km,score_key32"),
                                            (2, "score_key32")])
def test_block_scorer_variants_match_the_reference(group, variants):
    """T = 340: tiles from t_lo = 259 on (every group's last ones) take an unmasked trip (a trip scores 256
    tokens), then a ragged masked one; rows past T in the last tile. (The unmasked trips' rows past T and padded
    head rows must get p = 0 without a mask: group 7's padded row fails if they do not.)"""
    spec = small_spec(group, "score")
    names = variants.split(",")
    plan = variant_plan(spec, names)
    assert plan.score_key_major == ("score_km" in names)
    mod = load_variant(spec, names)
    testing.check_forward(mod, spec, 1, 340)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
def test_forced_blocks_in_the_merge_match_the_reference(group):
    spec = small_spec(group, "forced")
    mod = load_variant(spec, ["sel_forced"])
    testing.check_forward(mod, spec, 1, 37)


def test_forced_blocks_several_initial_and_local_in_query_chunks(monkeypatch):
    """Two initial and two local blocks (with top_k 4: nothing else to merge for most rows), query chunks of a
    few queries (tiles that start inside a block), the backward fed by the variant's log-sum-exp and output."""
    spec = small_spec(4, "forced22", **{"selection.initial": 2, "selection.local": 2, "selection.top_k": 5})
    hq, top_k, d = spec.heads.q, spec.selection.top_k, spec.head_dim.v
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 5 * hq * top_k * (d * 2 + 4))   # ~5 queries a chunk
    mod = load_variant(spec, ["sel_forced"])
    testing.check_forward(mod, spec, 2, 45)
    testing.check_backward(mod, spec, 1, 45)


def test_forced_blocks_variant_with_given_indices():
    """Given indices need not hold the forced blocks: the variant then merges every slot as the default does."""
    spec = small_spec(2, "forcedgiven")
    mod = load_variant(spec, ["sel_forced"])
    case = testing.random_case(mod, spec, 1, 40, None, None)
    out, _, idx = mod.nsa_forward(**case.inputs, return_lse=True, return_indices=True)
    # Drop every query's forced first block from its list (still a valid list for the attention).
    given = torch.where(idx == 0, -1, idx)
    given = torch.sort(torch.where(given < 0, 1 << 30, given), dim=-1).values
    given = torch.where(given == 1 << 30, -1, given).to(torch.int32)
    got = mod.nsa_forward(**case.inputs, indices=given)
    from specgen import reference
    ref = reference.nsa_forward(spec, **case.exact, indices=given)
    err = reference.rel_err(got.to(torch.float64), ref.out)
    assert err < testing.OUT_TOL[mod.DTYPE], f"{err:.3e} {case.where}"
    assert not torch.allclose(got, out)  # the first block was really left out


def test_forced_slots_are_the_initial_and_the_local_blocks():
    """runtime.selection.forced_slots, which the sel_forced work list leaves out: queries 99 .. 101 (own blocks 6, 6
    and 6 of 16 tokens), one initial and two local blocks; padding is never forced."""
    idx = torch.tensor([[0, 3, 5, 6], [0, 4, 6, -1], [1, 2, 5, 6]], dtype=torch.int32).view(1, 3, 1, 4)
    got = runtime.selection.forced_slots(idx, 99, 16, 1, 2)
    want = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool).view(1, 3, 1, 4)
    assert torch.equal(got, want)
    qpos, slot, item_seg, *_ = runtime.selection.kv_order_worklist(idx, 128, unit=16, tile_queries=2,
                                                                   skip_forced=(99, 1, 2))
    # The kept entries by block (1, 2, 3, 4), each (query, slot); one work item per block.
    assert qpos[:4].tolist() == [2, 2, 0, 1] and slot[:4].tolist() == [0, 1, 1, 1]
    assert item_seg[item_seg >= 0].tolist() == [1, 2, 3, 4]
