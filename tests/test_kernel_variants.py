"""Launch-config variants found by bench/kernel_audit.py (replicated products over warpgroups, spills), each
against the float64 reference on a tiny spec under the interpreter: the block-outer selection backward's
(`tuning.selection_kv_variants`: rows per trip, the key-major product forms), the scatter backward's
(`tuning.scatter_variants`) and the selection forward's (`tuning.selection_forward_variants`: S computed once with
its key columns split over the warpgroups, the next trip's units prefetched). Warps and stages do not change what
the interpreter computes: those variants are checked for being tuning candidates and timed on the GPU
(bench/variants_gpu.sh, bench/variants_bench.py --only dsa_fwd)."""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime, testing
from specgen.compile.plan import make_plan
from specgen.compile.tuning import (SELECTION_FORWARD_DEFAULT, SELECTION_KV_BWD_DEFAULT, scatter_variants,
                                    selection_forward_variants, selection_kv_variants, split_form, tunable_kernels)
from specgen.model.spec import load_spec, replace
from specgen.runtime import launches

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
    assert all(v in plan.tuning.candidates["selection_scatter"] for v in variants.values()
               if v.get("key_major") and not split_form(v) and not v.get("chunk_inner"))  # (not candidates)
    monkeypatch.setitem(mod.CONFIGS["default"], "selection_scatter",
                        {**variants["km_k64_w8"], "block_n": 16})
    testing.check_backward(mod, SCATTER, 1, 40)


def test_selection_forward_variants_are_candidates():
    """V3.2's forward forms are its tuning candidates, the default the timed winner (S once, next units
    prefetched); specs whose selection tile has a warpgroup per 64 rows get none."""
    plan = make_plan(load_spec("specs/dsa_v32.yaml"))
    variants = selection_forward_variants(plan)
    default = plan.tuning.defaults["selection"]
    assert default == variants[SELECTION_FORWARD_DEFAULT]
    assert default["key_split"] == 1 and default["prefetch"] == 1
    assert variants["w8"]["key_split"] == 0 and variants["w8"]["prefetch"] == 0
    assert {"ks", "ks_pf", "ks_k32_s4"} <= set(variants)
    assert all(v in plan.tuning.candidates["selection"] for v in variants.values() if not v.get("chunk_inner"))
    assert not any(c.get("chunk_inner") for c in plan.tuning.candidates["selection"])  # a launch order: by name
    # Block selection (64-token units): the 32-key forms would split a unit, so they are left out.
    block = selection_forward_variants(make_plan(load_spec("specs/dsa_block.yaml")))
    assert block and all(c["block_n"] % 64 == 0 for c in block.values())
    assert selection_forward_variants(make_plan(load_spec("specs/nsa_paper.yaml"))) == {}


# GQA with a separate value load and one Q K^T part (d 64), top_k 24: two trips of 16 keys, the second partial.
FWD_GQA = replace(load_spec("specs/dsa_small.yaml"), name="dsa_fwdvar_gqa", dtype="fp32",
                  **{"selection.top_k": 24})


@pytest.mark.parametrize("spec", [SCATTER, FWD_GQA], ids=["mla", "gqa"])
def test_selection_forward_forms_match_the_reference(monkeypatch, spec):
    """The forward's forms (key_split: S's parts and P through branches; prefetch: the next trip's units carried)
    against the float64 reference: 16 keys a trip, so the queries past top_k take several trips, the last one
    partial, and the early queries' -1 slots end their lists. MLA: two Q K^T parts (32 + 16), V the key tile's
    first 32 dims; GQA: one part and a separate value load. The forms come from V3.2's variants (this tiny spec's
    tile has no replicated rows, so it has none of its own). T = top_k + 5: rows 0-15 take one trip, rows 16 on
    two (the second partial up to row top_k - 1 at top_k 24; full from row 31 at top_k 32), the last five drop
    candidates; one sequence (the forms change a query's key loop, not the batch's addressing)."""
    mod = specgen.load(spec)
    v32 = selection_forward_variants(make_plan(load_spec("specs/dsa_v32.yaml")))
    forms = {(c["key_split"], c["prefetch"]) for c in v32.values()}
    assert forms == {(0, 0), (1, 0), (1, 1), (0, 1)}
    base = dict(mod.CONFIGS["default"]["selection"])
    for key_split, prefetch in sorted(forms - {(0, 0)}):
        monkeypatch.setitem(mod.CONFIGS["default"], "selection",
                            {**base, "block_n": 16, "key_split": key_split, "prefetch": prefetch})
        testing.check_forward(mod, spec, 1, spec.selection.top_k + 5)


# Wide MLA heads: the group's 128 heads split over two programs of 64 rows (test_nsa_matrix's dsa_head_chunks).
CHUNKED = replace(load_spec("specs/dsa_small.yaml"), name="dsa_fwdvar_chunks", dtype="fp32",
                  **{"heads.q": 128, "heads.kv": 1, "mla": True, "head_dim.qk": 320, "head_dim.v": 256})


def test_selection_forward_chunks_side_by_side(monkeypatch):
    """`chunk_inner` (V3.2's ks_pf_ci: a query's head chunks neighbours on axis 0 of the grid, so the keys both
    gather are still in L2 for the second): the launch's grid, and the output and log-sum-exps equal to the default
    launch's bit for bit (each program computes what it did, in another launch order) and right against
    the float64 reference, batched (the batch and kv group still on axis 1)."""
    v32 = selection_forward_variants(make_plan(load_spec("specs/dsa_v32.yaml")))
    assert v32["ks_pf_ci"] == {**v32["ks_pf"], "chunk_inner": 1}
    mod = specgen.load(CHUNKED)
    assert make_plan(CHUNKED).selection.head_chunks == 2
    grids = []
    real = runtime.launch_with

    def spy(kernel, grid, args, meta, cfg):
        if kernel.fn.__name__ == "_selection_attention_kernel":
            grids.append((tuple(grid), cfg.get("chunk_inner", 0)))  # (a config field, not a launch meta)
        return real(kernel, grid, args, meta, cfg)

    monkeypatch.setattr(runtime, "launch_with", spy)
    monkeypatch.setattr(launches, "launch_with", spy)
    B, T = 2, CHUNKED.selection.top_k + 5
    case = testing.random_case(mod, CHUNKED, B, T, testing.test_device(), None)
    base = dict(mod.CONFIGS["default"]["selection"])
    outs = {}
    for inner in (0, 1):
        monkeypatch.setitem(mod.CONFIGS["default"], "selection", {**base, "chunk_inner": inner})
        outs[inner] = mod.dsa_attention(**case.inputs, return_lse=True)
        assert grids.pop() == (((T * 2, B), 1) if inner else ((T, B * 2), 0))
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b), "the chunks side by side compute what they did"
    testing.check_forward(mod, CHUNKED, B, T)
