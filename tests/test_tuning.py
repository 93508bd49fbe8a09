"""Launch configs: the candidates the footprint model keeps, tuning records baked into modules, and the autotune
fallback of a module without a record (Triton's autotuner, driven here under the interpreter by a stand-in
benchmark so the choice is known and the repeated timed runs are visible in the results).
"""

from __future__ import annotations

import pytest
from pathlib import Path
import torch

import specgen
from specgen import runtime, testing
from specgen.compile.footprint import ACC_REGISTER_BUDGET, SMEM_BUDGET, launch_model
from specgen.compile.plan import make_plan
from specgen.model.spec import load_spec
from specgen.compile.tuning import (_rows, candidates, candidates_for, default_configs, scatter_variants,
                                    selection_kv_variants, tunable_kernels)

SPECS = ["nsa_paper", "nsa_config_a", "nsa_token", "dsa_v32", "dsa_block", "nsa_small"]


@pytest.mark.parametrize("name", SPECS)
def test_candidates_are_pruned_by_the_footprint_model(name):
    spec = load_spec(f"specs/{name}.yaml")
    plan = make_plan(spec)
    defaults = default_configs(plan)
    for kernel in tunable_kernels(spec):
        pool = candidates(plan, kernel)
        assert pool[0] == defaults[kernel], f"{kernel}: the default comes first"
        assert len({tuple(sorted(c.items())) for c in pool}) == len(pool), f"{kernel}: duplicates"
        if kernel == "selection_kv_bwd":
            # The block-outer backward's named variants (tuning.selection_kv_variants): no footprint model of this
            # kernel; bench/kernel_audit.py compiles them for sm_90.
            assert pool[1:] == [c for c in selection_kv_variants(plan).values() if c != pool[0]]
            continue
        model = launch_model(spec, kernel)
        # The scatter path's named forms join unpruned (the model counts a score tile the key-major forms do not
        # hold, and knows neither the split nor the prefetch; bench/dsa_bwd_offline.py compiles them).
        named = scatter_variants(plan).values() if kernel == "selection_scatter" else ()
        pool = pool[:1] + [c for c in pool[1:] if c not in named]
        for cfg in pool[1:]:
            smem, regs = model.evaluate(_rows(plan, kernel, cfg), cfg["block_n"], cfg["num_stages"], cfg["num_warps"])
            assert smem <= SMEM_BUDGET and regs <= ACC_REGISTER_BUDGET, (kernel, cfg, smem, regs)
            # Fields the kernel bakes in (row packing, the selection backward's tiles) never vary; the dK/dV
            # kernels' queries per trip do (rows: bq or bt x the group's heads, at least a dot's 16).
            if kernel.endswith("_dkdv") or kernel in ("compression_dq", "window_dq"):
                assert _rows(plan, kernel, cfg) >= 16
            else:
                assert cfg.get("bt") == pool[0].get("bt") and cfg.get("bq") == pool[0].get("bq")
            if kernel.startswith("selection_") and kernel != "selection_scatter":
                # (the scatter kernel walks the selected keys BLOCK_N at a time: its key tile is free)
                assert cfg["block_n"] == pool[0]["block_n"]


def test_the_model_prunes_what_does_not_fit():
    """MLA's 576/512 heads: three-stage selection tiles of 128 keys cannot fit shared memory, so they are dropped."""
    spec = load_spec("specs/dsa_v32.yaml")
    plan = make_plan(spec)
    pool = candidates(plan, "selection")
    assert all(not (c["block_n"] == 128 and c["num_stages"] == 3) for c in pool)
    smem, _ = launch_model(spec, "selection").evaluate(64, 128, 3, 8)
    assert smem > SMEM_BUDGET


def test_bucket_shares_one_tuning_per_power_of_two():
    assert [runtime.tune_bucket(t) for t in (1, 16, 17, 4096, 4097, 65536)] == [16, 16, 32, 4096, 8192, 65536]


def test_autotune_is_off_under_the_interpreter_and_with_the_switch(monkeypatch):
    monkeypatch.delenv("SPECGEN_AUTOTUNE", raising=False)
    assert not runtime.autotune_enabled()  # off by default (the CPU tier runs the interpreter; a GPU waits to be asked)
    monkeypatch.setenv("SPECGEN_AUTOTUNE", "0")
    assert not runtime.autotune_enabled()
    # Opt-in only: even asked for, the interpreter never autotunes (its timings mean nothing); a GPU does.
    monkeypatch.setenv("SPECGEN_AUTOTUNE", "1")
    assert runtime.autotune_enabled() == (not runtime.interpreting() and torch.cuda.is_available())


def _favour_last(calls):
    """A stand-in for do_bench: runs the candidate (with the autotuner's restore hooks) and reports times that fall
    with each call, so the last candidate of every kernel wins."""
    def bench(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        t = 1000.0 - len(calls)
        return [t, t, t]
    return bench


def _own_module(name: str, tmp_path):
    """The spec's module under a tuning record for a GPU that is not this machine: no tuned config applies here,
    and the record gives the module custom ops of its own (another module of the spec, loaded by an earlier test,
    would otherwise run the autograd op with its own candidates)."""
    from specgen.compile.jit import import_path
    from specgen.compile.render import render_module

    spec = load_spec(f"specs/{name}.yaml")
    record = {"spec_hash": spec.hash, "gpu": "no such GPU", "triton": "", "date": "",
              "configs": default_configs(make_plan(spec))}
    path = tmp_path / f"{name}_autotune.py"
    path.write_text(render_module(spec, [record]))
    return import_path(path, f"specgen_test_autotune.{name}_{tmp_path.name}"), spec


@pytest.mark.parametrize("name", ["nsa_small"])
def test_autotune_fallback_picks_a_candidate_and_keeps_results_exact(name, monkeypatch, tmp_path):
    """Forward and backward through the autotuner: every tunable kernel (three of them accumulate into outputs the
    tuner must restore after each timed run) picks the stand-in's winner, and the results still match the float64
    reference, so repeated timed runs leave no trace."""
    mod, spec = _own_module(name, tmp_path)
    calls: list = []
    monkeypatch.setattr(runtime, "AUTOTUNE_BENCH", _favour_last(calls))
    monkeypatch.setattr(runtime, "_autotuners", {})
    # The autotuner keeps its timings in Triton's cache (cache_results): a fresh one, so a rerun on a warm machine
    # times every candidate again.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    # Three candidates per kernel keep the interpreter's time small; the default is one of them.
    monkeypatch.setattr(mod, "CANDIDATES", {k: v[:1] + v[-2:] for k, v in mod.CANDIDATES.items()})
    testing.check_backward(mod, spec, 1, 37)
    tuned = {name: tuner for (_, name, _), tuner in runtime._autotuners.items()}
    assert set(tuned) == set(tunable_kernels(spec)), sorted(tuned)
    for kernel, tuner in tuned.items():
        best = tuner.best_config
        want = mod.CANDIDATES[kernel][-1]
        assert best.num_warps == want["num_warps"] and best.num_stages == want["num_stages"], kernel
        assert best.kwargs.get("BLOCK_N") == want.get("block_n"), kernel  # (selection_kv_bwd: none)
        assert best.kwargs.get("BQ") == want.get("bq"), kernel
    assert len(calls) == sum(len(v) for v in mod.CANDIDATES.values() if len(v) > 1)
    # A second call reuses the choices: nothing is timed again.
    before = len(calls)
    testing.check_forward(mod, spec, 1, 37)
    assert len(calls) == before


def test_a_tuned_config_for_the_device_wins_over_autotuning(monkeypatch, tmp_path):
    mod, spec = _own_module("nsa_small", tmp_path)
    calls: list = []
    monkeypatch.setattr(runtime, "AUTOTUNE_BENCH", _favour_last(calls))
    monkeypatch.setattr(runtime, "_autotuners", {})
    pick = {k: v[-1] for k, v in mod.CANDIDATES.items()}
    monkeypatch.setattr(mod, "CONFIGS", {**mod.CONFIGS, runtime._device_name(): pick})  # "cpu" off a GPU
    testing.check_forward(mod, spec, 1, 37)
    assert not calls and not runtime._autotuners


def test_modules_carry_their_candidates():
    spec = load_spec("specs/nsa_paper.yaml")
    mod = specgen.load("specs/nsa_paper.yaml")
    assert mod.CANDIDATES == candidates_for(make_plan(spec))
    assert set(mod.CONFIGS["default"]) >= set(tunable_kernels(spec)) | {"preprocess", "pool", "select"}
    assert torch.cuda.is_available() or runtime.launch_config(mod.CONFIGS, "selection_dq") == \
        mod.CONFIGS["default"]["selection_dq"]


def test_load_bakes_the_record_beside_the_spec_and_names_ops_by_it():
    """A Spec object finds its tuning record through spec_path; a module with the record and one without get
    different custom ops, since a registered op runs its first registrant's configs."""
    path = "specs/nsa_paper.yaml"
    spec = load_spec(path)
    tuned = specgen.load(spec, spec_path=path)
    untuned = specgen.load(spec)
    assert set(tuned.CONFIGS) - {"default"}, "the committed record names at least one GPU"
    assert set(untuned.CONFIGS) == {"default"}
    assert tuned._OP != untuned._OP and tuned._OP.startswith(f"{spec.name}_{spec.hash}_")


def test_selection_dkdv_candidates_vary_the_queries_per_trip():
    """The paper configuration's selection dK/dV spills at its default (4 queries x 16 heads per trip): other
    queries per trip (1, 2 and 8; 16 does not fit the model) are candidates."""
    plan = make_plan(load_spec("specs/nsa_paper.yaml"))
    assert {c["bq"] for c in candidates(plan, "selection_dkdv")} == {1, 2, 4, 8}


def test_tune_kernels_rejects_an_unknown_kernel(monkeypatch, tmp_path):
    """`specgen tune --kernels` names the kernels it knows when given one it does not (before any GPU work)."""
    from specgen.perf.tune import tune

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test GPU")
    spec = load_spec("specs/nsa_small.yaml")
    with pytest.raises(ValueError) as info:
        tune(spec, Path("specs/nsa_small.yaml"), 64, tmp_path, kernels=["window_dkvd"])
    text = str(info.value)
    assert "window_dkvd" in text and "window_dkdv" in text and "nsa_small" in text, text

