"""Static shared-memory estimates (specgen/compile/footprint.py): every kernel of every committed spec fits an H100's
227 KiB per block with some margin, and the model reproduces the figures the H100 compiler reported."""

import dataclasses
from pathlib import Path

import pytest

from specgen.compile.footprint import SMEM_BUDGET, SMEM_LIMIT, backward_footprints, index_scores_smem
from specgen.compile.plan import MIN_DOT, make_plan
from specgen.compile.render import has_distillation
from specgen.compile.render_distill import distill_footprints, make_distill_plan
from specgen.compile.tuning import index_configs
from specgen.model.spec import load_spec, replace

SPECS = sorted(p for p in (Path(__file__).parent.parent / "specs").glob("*.yaml") if not p.name.endswith(".sweep.yaml"))
MODEL_SPECS = sorted((Path(__file__).parent.parent / "specs" / "models").glob("*.yaml"))


def _index_scores_footprint(spec, plan):
    """index_scores_smem of the plan's default score-tile config."""
    cfg = index_configs(plan)["select"]
    if cfg["key_major"]:
        return index_scores_smem(spec, True, plan.index_key_heads, cfg["block_n"], cfg["num_stages"])
    return index_scores_smem(spec, False, cfg["bt"] * plan.index_hp, plan.index_bs, cfg["num_stages"])


def _footprints(spec):
    plan = make_plan(spec)
    out = backward_footprints(spec, plan)
    if spec.selection is not None and spec.selection.scorer == "indexer":
        out["_index_scores_kernel"] = _index_scores_footprint(spec, plan)
    if has_distillation(spec):
        out.update(distill_footprints(spec))
    return out


def test_budget_leaves_margin():
    assert SMEM_LIMIT == 232448 and SMEM_BUDGET <= 0.9 * SMEM_LIMIT


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_kernel_fits_shared_memory(path):
    spec = load_spec(path)
    fp = _footprints(spec)
    assert fp
    over = {k: v for k, v in fp.items() if v > SMEM_BUDGET}
    assert not over, f"{spec.name}: over {SMEM_BUDGET} bytes: {over}"


@pytest.mark.parametrize("path", SPECS + MODEL_SPECS, ids=lambda p: p.stem)
def test_index_score_defaults_fit(path):
    """The index-score kernel's default (key-major at 3 stages where that fits) fits, on the model specs too."""
    spec = load_spec(path)
    if spec.selection is None or spec.selection.scorer != "indexer":
        pytest.skip("no indexer")
    plan = make_plan(spec)
    assert _index_scores_footprint(spec, plan) <= SMEM_BUDGET
    if plan.index_key_major:
        assert plan.index_km_stages == 3, "every committed key-major spec takes the 3 stages measured on V3.2"


def test_index_score_stages_fall_back():
    """The widest indexer (128 heads x 256 dims in bf16, 128-token blocks) does not fit 3 stages of the key-major
    loop, nor 2 of the model's (conservative) shared memory: the default falls back to what fits."""
    spec = replace(load_spec("specs/dsa_block.yaml"), name="wide_indexer", **{
        "indexer.heads": 128, "indexer.head_dim": 256, "selection.block": 128, "selection.top_k": 16})
    plan = make_plan(spec)
    assert plan.index_key_major and plan.index_km_stages < 3
    assert _index_scores_footprint(spec, plan) <= SMEM_BUDGET


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_dot_dims_at_least_16(path):
    spec = load_spec(path)
    if spec.selection is None:
        return
    t = make_plan(spec).backward
    assert min(t.sel_dq_gp, t.sel_dq_block_n, t.sel_tile, t.sel_bq * t.sel_dkdv_gp) >= MIN_DOT
    assert t.sel_dq_gp * t.sel_dq_chunks >= spec.heads.group_size
    assert t.sel_dkdv_gp * t.sel_dkdv_chunks >= spec.heads.group_size
    if has_distillation(spec):
        from specgen.compile.render_distill import dot_shapes
        d = make_distill_plan(spec)
        assert all(min(mkn) >= MIN_DOT for mkn in dot_shapes(spec, d).values()), dot_shapes(spec, d)


def test_calibration_dsa_v32_before_head_chunks():
    # The unchunked V3.2 distillation kernels: 435200 (dense) and 345856 (sparse) bytes, as reported on the H100.
    spec = load_spec(Path(__file__).parent.parent / "specs" / "dsa_v32.yaml")
    old = dataclasses.replace(make_distill_plan(spec), head_chunks=1, num_stages=None)
    fp = distill_footprints(spec, old)
    assert fp["_distill_fwd_dense_kernel"] == 435200
    assert fp["_distill_fwd_sparse_kernel"] == 345856
