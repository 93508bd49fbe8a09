"""Launch-config variants found by bench/kernel_audit.py (replicated products over warpgroups, spills), each
against the float64 reference on a tiny spec under the interpreter: the block-outer selection backward's
(`tuning.selection_kv_variants`: rows per trip, the key-major product forms) and the scatter backward's
(`tuning.scatter_variants`). Warps and stages do not change what the interpreter computes: those variants are
checked for being tuning candidates and timed on the GPU (bench/variants_gpu.sh)."""

from __future__ import annotations

import pytest

import specgen
from specgen import testing
from specgen.compile.plan import make_plan
from specgen.compile.tuning import (SELECTION_KV_BWD_DEFAULT, scatter_variants, selection_kv_variants,
                                    tunable_kernels)
from specgen.model.spec import load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")   # l=8 d=4 l'=16, top_k 4 (1 initial + 1 local)


def kv_spec(hq: int, hkv: int):
    return replace(SMALL, name=f"nsa_kvvar_{hq}_{hkv}", branches=["compression", "selection"], window=None,
                   dtype="fp32", max_seqlen=256, **{"heads.q": hq, "heads.kv": hkv, "head_dim.qk": 16,
                                                    "head_dim.v": 16, "selection.loop_order": "kv"})


def test_selection_kv_variants_are_candidates():
    for path in ("specs/models/model_llama3_8b.yaml", "specs/nsa_paper.yaml"):
        spec = replace(load_spec(path), **{"selection.loop_order": "kv"})
        plan = make_plan(spec)
        assert "selection_kv_bwd" in tunable_kernels(spec)
        variants = selection_kv_variants(plan)
        assert plan.tuning.defaults["selection_kv_bwd"] == variants[SELECTION_KV_BWD_DEFAULT]
        assert all(v in plan.tuning.candidates["selection_kv_bwd"] for v in variants.values())


@pytest.mark.parametrize("heads", [(4, 2), (6, 2)], ids=["group2", "group3"])
def test_selection_kv_variants_match_the_reference(monkeypatch, heads):
    """Every product form and row count (group 3: padded head rows that must not count); 37 queries over
    SPLIT-query work items, so the reduce kernels sum several items' partials."""
    spec = kv_spec(*heads)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    assert plan.selection_bwd_order == "kv" and plan.sel_kv_split < 37
    default = plan.tuning.defaults["selection_kv_bwd"]
    # The default's form runs in tests/test_selection_order.py; group 3 runs the key-major form only.
    seen = {(default["bq"], default["key_major"])}
    for name, cfg in selection_kv_variants(plan).items():
        key = (cfg["bq"], cfg["key_major"])
        if key in seen or (heads == (6, 2) and cfg["key_major"] != 2):
            continue  # warps / stages only: the same computation under the interpreter
        seen.add(key)
        monkeypatch.setitem(mod.CONFIGS["default"], "selection_kv_bwd", cfg)
        testing.check_backward(mod, spec, 1, 37)


# The scatter path's miniature of V3.2 (tests/test_scatter_backward.py): MLA, 64 heads in two programs of 32
# rows; top_k 32 so that 16 keys a trip take two trips.
SCATTER = replace(load_spec("specs/dsa_v32.yaml"), name="dsa_kmvar_mla", dtype="fp32", max_seqlen=4096,
                  **{"heads.q": 64, "head_dim.qk": 48, "head_dim.v": 32, "selection.top_k": 32, "indexer.heads": 2,
                     "indexer.head_dim": 32, "indexer.dtype": "bf16"})


def test_scatter_key_major_matches_the_reference(monkeypatch):
    """The scatter backward's key-major form (S^T = K Q^T, dQ kept transposed) against the float64 reference,
    several key trips per query (16 keys a trip, up to 32 selected)."""
    mod = specgen.load(SCATTER)
    plan = make_plan(SCATTER)
    assert plan.backward.scatter
    variants = scatter_variants(plan)
    assert all(v in plan.tuning.candidates["selection_scatter"] for v in variants.values() if v.get("key_major"))
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter",
                        {**variants["km_k64_w8"], "block_n": 16})
    testing.check_backward(mod, SCATTER, 1, 40)
