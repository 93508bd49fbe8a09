"""The forward's plan variants (specgen.compile.variants) and the defaults they were timed against, each against the
float64 reference under the interpreter at tiny shapes: the block scorer's key-major score tile and int32 keys
(several loop trips, so the unmasked trips run; groups whose heads take 0 and 3 column bits, padded head rows
included), the block-outer selection's forced blocks attended in its merge (the plan's default: the kv-order group
sizes, query chunks, given indices, the backward fed by it) and the baselines of the former defaults (sel_unforced:
every slot merged by the plain merge; sel_w8: two warpgroups at a [64, 256] output tile).
"""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime, testing
from specgen.compile.footprint import programs_per_sm, score_smem
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
    plan = variant_plan(llama, ["score_km", "score_key32"])
    assert plan.score_key_major and plan.score_head_bits == (0, 3) and plan.score_pos_bits == (1, 2, 4, 5)
    assert plan.score_index_bits == 10           # 1024 blocks of 64 at 64k
    default = make_plan(llama)
    assert not default.score_key_major and not default.score_index_bits   # the exact tie rule stays the plan's
    paper = load_spec("specs/nsa_paper.yaml")    # group 16: 256 score rows, query-outer selection
    assert variant_plan(paper, ["score_km"]) is None and variant_plan(paper, ["sel_unforced"]) is None
    assert variant_plan(paper, ["score_key32"]).score_index_bits == 10
    assert set(PLAN_VARIANTS) == {"score_masked", "score_km", "score_key32", "sel_unforced", "sel_w8",
                                  "sel_wl_torch", "bwd_scatter"}
    assert variant_plan(llama, ["bwd_scatter"]) is None                      # no token selection
    assert variant_plan(load_spec("specs/dsa_v32.yaml"), ["bwd_scatter"]) is None   # already on the scatter path
    assert variant_plan(load_spec("specs/models/dsa_gqa16_4.yaml"), ["bwd_scatter"]) is None   # the plan's path
    pair = variant_plan(replace(load_spec("specs/dsa_small.yaml"), name="g2", **{"heads.q": 4}),
                        ["bwd_scatter"]).backward   # a group of 2: the plan keeps the inverse index
    assert (pair.scatter, pair.scatter_gp, pair.scatter_chunks) == (True, 16, 1)
    assert default.sel_kv_worklist == "triton"
    assert variant_plan(llama, ["sel_wl_torch"]).sel_kv_worklist == "torch"
    assert variant_plan(paper, ["sel_wl_torch"]).sel_kv_worklist == "torch"   # its backward is block outer
    assert variant_plan(load_spec("specs/nsa_token.yaml"), ["sel_wl_torch"]) is None   # no block-outer pass


def test_the_forced_merge_and_one_warpgroup_are_the_plans():
    """The forced blocks in the merge wherever the forward is block outer with forced blocks (on 8 warps from a
    [64, 256] output tile), the block-outer forward on one warpgroup up to that tile; sel_unforced and sel_w8 render
    the former defaults."""
    llama = load_spec("specs/models/model_llama3_8b.yaml")
    gemma = load_spec("specs/models/model_gemma2_9b.yaml")   # 64 rows x 256 dims
    for path in ("specs/models/model_llama3_8b.yaml", "specs/models/model_qwen25_7b.yaml",
                 "specs/models/model_gemma2_9b.yaml", "specs/models/model_mha32_d128.yaml",
                 "specs/models/model_mha16_d64.yaml", "specs/nsa_small.yaml"):
        spec = load_spec(path)
        plan = make_plan(spec)
        assert plan.selection_order == "kv" and plan.sel_kv_forced and plan.sel_kv_warps == 4, path
        assert plan.sel_kv_forced_warps == (8 if spec.name == gemma.name else 4), path
        base = variant_plan(spec, ["sel_unforced"])
        assert not base.sel_kv_forced and base.sel_kv_warps == plan.sel_kv_warps, path
    for path in ("specs/nsa_paper.yaml", "specs/nsa_config_a.yaml", "specs/nsa_mqa.yaml", "specs/nsa_token.yaml"):
        plan = make_plan(load_spec(path))   # query-outer forward (the token spec: no blocks)
        assert plan.selection_order == "query" and not plan.sel_kv_forced, path
        assert variant_plan(load_spec(path), ["sel_unforced"]) is None, path
    assert variant_plan(gemma, ["sel_w8"]).sel_kv_warps == 8 and variant_plan(llama, ["sel_w8"]) is None
    assert variant_plan(gemma, ["sel_unforced", "sel_w8"]).sel_kv_warps == 8
    # Without forced blocks nothing is left to take out of the work list.
    none = replace(load_spec("specs/nsa_small.yaml"), name="nsa_fv_noforced",
                   **{"selection.initial": 0, "selection.local": 0})
    assert make_plan(none).selection_order == "kv" and not make_plan(none).sel_kv_forced
    assert variant_plan(none, ["sel_unforced"]) is None


def test_the_scorer_stages_follow_the_programs_an_sm_holds():
    """Two pipeline stages where three leave one 4-warp scorer program an SM by shared memory and two leave two
    (Gemma-2's 64 x 256 key tiles); three elsewhere: several programs an SM at three stages (d 128 and below), or
    8-warp programs whose registers hold one an SM anyway (256 rows)."""
    gemma = load_spec("specs/models/model_gemma2_9b.yaml")
    assert score_smem(gemma, 64, 64, 3) == 132096 and score_smem(gemma, 64, 64, 2) == 99328
    assert programs_per_sm(score_smem(gemma, 64, 64, 3)) == 1 and programs_per_sm(score_smem(gemma, 64, 64, 2)) == 2
    plan = make_plan(gemma)
    assert (plan.score_warps, plan.score_stages) == (4, 2)
    assert plan.tuning.defaults["select"] == {"num_warps": 4, "num_stages": 2}
    want = {"specs/models/model_llama3_8b.yaml": 4, "specs/models/model_qwen25_7b.yaml": 4,
            "specs/models/model_mha32_d128.yaml": 4, "specs/models/model_mha16_d64.yaml": 4, "specs/nsa_small.yaml": 4,
            "specs/nsa_paper.yaml": 8, "specs/nsa_config_a.yaml": 8, "specs/nsa_mqa.yaml": 8}
    for path, warps in want.items():
        assert make_plan(load_spec(path)).tuning.defaults["select"] == {"num_warps": warps, "num_stages": 3}, path
    # d 256 at a group of one (64 positions a tile) takes two stages by the same rule.
    mha256 = replace(load_spec("specs/models/model_mha32_d128.yaml"), name="mha_d256",
                     **{"head_dim.qk": 256, "head_dim.v": 256})
    assert make_plan(mha256).score_stages == 2


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


@pytest.mark.parametrize("variant", ["", "sel_unforced"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
def test_forced_blocks_in_the_merge_match_the_reference(group, variant):
    """The plan's forced merge, and the sel_unforced baseline (every slot a work item, the plain merge)."""
    spec = small_spec(group, "forced")
    assert make_plan(spec).sel_kv_forced
    mod = load_variant(spec, [variant]) if variant else specgen.load(spec)
    assert hasattr(mod, "_selection_kv_forced_merge_kernel") == (not variant)
    testing.check_forward(mod, spec, 1, 37)


@pytest.mark.parametrize("variant", ["", "sel_unforced"])
def test_forced_blocks_several_initial_and_local_in_query_chunks(variant, monkeypatch):
    """Two initial and two local blocks (with top_k 4: nothing else to merge for most rows), query chunks of a
    few queries (tiles that start inside a block), the backward fed by the forward's log-sum-exp and output."""
    spec = small_spec(4, "forced22", **{"selection.initial": 2, "selection.local": 2, "selection.top_k": 5})
    hq, top_k, d = spec.heads.q, spec.selection.top_k, spec.head_dim.v
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 5 * hq * top_k * (d * 2 + 4))   # ~5 queries a chunk
    mod = load_variant(spec, [variant]) if variant else specgen.load(spec)
    testing.check_forward(mod, spec, 2, 45)
    testing.check_backward(mod, spec, 1, 45)


def test_one_warpgroup_and_the_two_warpgroup_baseline_match_the_reference():
    """A [64, 256] output tile (a group of 2, d 256: Gemma-2's): the plan's one-warpgroup block-outer forward with the
    forced merge on 8 warps, and sel_w8 (two warpgroups), the former default."""
    spec = small_spec(2, "d256", **{"head_dim.qk": 256, "head_dim.v": 256})
    plan = make_plan(spec)
    assert (plan.sel_kv_warps, plan.sel_kv_forced, plan.sel_kv_forced_warps) == (4, True, 8)
    assert 'warps=4' in open(specgen.load(spec).__file__).read()
    for mod in (specgen.load(spec), load_variant(spec, ["sel_w8"])):
        testing.check_forward(mod, spec, 1, 37)


def test_forced_merge_with_given_indices():
    """Given indices need not hold the forced blocks: the plan's module then merges every slot as the plain merge
    does."""
    spec = small_spec(2, "forcedgiven")
    mod = specgen.load(spec)
    assert hasattr(mod, "_selection_kv_forced_merge_kernel")
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
    """runtime.selection.forced_slots, which the forced merge's work list leaves out: queries 99 .. 101 (own blocks 6, 6
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
