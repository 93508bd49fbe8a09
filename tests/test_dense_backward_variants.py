"""The compression and window backward's launch-config variants (`tuning.dense_backward_variants`: row and key
tiles, warps, and the dK/dV product form `key_major` 0 / 1 / 2), each against the float64 reference: every gradient
of a small spec with every variant of both kernels of both branches. The GPU tests run the model shapes' variants
in bf16 (bench/cmp_bwd_gpu.sh) and check that each is deterministic bit for bit.

The small spec is nsa_small without its selection branch: the variants are the compression and window kernels'
(the same tiles and defaults with or without selection, test_small_spec_keeps_the_variants), and the block
scorer and selection kernels, which no variant changes, were most of each run's interpreter time. Under the
interpreter a variant that differs from one already run only in warps or stages (launch options the interpreter
ignores) runs the same program: it runs once (`distinct_under_interpreter`); on a GPU every variant runs."""

from __future__ import annotations

import itertools

import pytest
import torch

import specgen
from specgen import testing
from specgen.compile.footprint import launch_model
from specgen.compile.plan import make_plan
from specgen.compile.tuning import dense_backward_default, dense_backward_variants
from specgen.model.spec import load_spec, replace, spec_from_mapping

SMALL = load_spec("specs/nsa_small.yaml")   # GQA 4/2, d 48/32, fp16, gated, compression + selection + window
KERNELS = ("compression_dq", "compression_dkdv", "window_dq", "window_dkdv")
# Launch options, not kernel arguments (runtime.launch_with): the interpreter runs the same program for any value.
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def variants_spec(heads: tuple[int, int]):
    """nsa_small in fp32 with `heads` (q, kv), compression and window only."""
    data = replace(SMALL, name=f"nsa_small_bwdvar_g{heads[0] // heads[1]}", dtype="fp32",
                   **{"heads.q": heads[0], "heads.kv": heads[1]}).to_dict()
    data.pop("selection")
    return spec_from_mapping({**data, "branches": ["compression", "window"]})


def variant_sets(plan) -> list[dict]:
    """Configs for the four kernels per run, so that every named variant of each kernel runs at least once (the dQ
    kernels have fewer variants than the dK/dV ones: they cycle)."""
    names = {k: list(dense_backward_variants(plan, k)) for k in KERNELS}
    n = max(len(v) for v in names.values())
    cycles = {k: itertools.cycle(v) for k, v in names.items()}
    return [{k: next(cycles[k]) for k in KERNELS} for _ in range(n)]


def distinct_under_interpreter(plan, sets: list[dict]) -> list[dict]:
    """`sets` less those whose every kernel's config, launch options aside, an earlier set already ran."""
    seen, kept = set(), []
    for chosen in sets:
        key = {(k, tuple(sorted((f, v) for f, v in dense_backward_variants(plan, k)[name].items()
                                if f not in LAUNCH_OPTIONS))) for k, name in chosen.items()}
        if not key <= seen:
            kept.append(chosen)
            seen |= key
    return kept


def with_variants(mod, plan, monkeypatch, chosen: dict):
    for kernel, name in chosen.items():
        monkeypatch.setitem(mod.CONFIGS["default"], kernel, dense_backward_variants(plan, kernel)[name])


def test_default_is_a_named_variant():
    for path in ("specs/nsa_small.yaml", "specs/models/model_llama3_8b.yaml", "specs/models/model_gemma2_9b.yaml"):
        plan = make_plan(load_spec(path))
        for kernel in KERNELS:
            part = kernel.rsplit("_", 1)[1]
            assert plan.tuning.defaults[kernel] == dense_backward_variants(plan, kernel)[dense_backward_default(plan.spec)[part]]
            # Every variant the footprint model passes is a tuning candidate (specgen tune and SPECGEN_AUTOTUNE=1
            # can pick it).
            cands = plan.tuning.candidates[kernel]
            model = launch_model(plan.spec, kernel)
            for name, c in dense_backward_variants(plan, kernel).items():
                rows = c["bt"] * plan.backward.gp
                fits = c == cands[0] or model.fits(rows, c["block_n"], c["num_stages"], c["num_warps"])
                assert (c in cands) == fits, (kernel, name)


def test_small_spec_keeps_the_variants():
    """Without the selection branch the small spec's compression and window kernels have the same variants and
    defaults as nsa_small's (fp32, both head groups below)."""
    for heads in ((4, 2), (6, 2)):
        full = make_plan(replace(SMALL, dtype="fp32", **{"heads.q": heads[0], "heads.kv": heads[1]}))
        small = make_plan(variants_spec(heads))
        assert small.backward.gp == full.backward.gp
        for kernel in KERNELS:
            assert dense_backward_variants(small, kernel) == dense_backward_variants(full, kernel), kernel
            assert small.tuning.defaults[kernel] == full.tuning.defaults[kernel], kernel


@pytest.mark.parametrize("heads", [(4, 2), (6, 2)], ids=["group2", "group3"])
def test_every_variant_matches_the_reference(monkeypatch, heads):
    """Group 2 (fp32) and group 3 (padded to 4 heads a row block; the padded rows must not count)."""
    spec = variants_spec(heads)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    sets = variant_sets(plan)
    if heads == (6, 2):
        # The padded heads: the defaults and the rows-major / key-major forms at 64 rows (the rest as group 2's).
        sets = [s for s in sets if s["compression_dkdv"] in ("rows64", "km2_wg", "km2_w4_s3")]
    if testing.test_device() == "cpu":
        sets = distinct_under_interpreter(plan, sets)
    for i, chosen in enumerate(sets):
        with_variants(mod, plan, monkeypatch, chosen)
        # Two sequences once (the first set, rows-major: the generated tests run the key-major default at B = 2):
        # the batch offsets are in the macros every form shares (the prologue, row_state, the dK/dV stores).
        testing.check_backward(mod, spec, 2 if heads == (4, 2) and i == 0 else 1, 37)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.gpu
@pytest.mark.parametrize("path,every", [("specs/models/model_llama3_8b.yaml", True),
                                        ("specs/models/model_qwen25_7b.yaml", False),
                                        ("specs/models/model_gemma2_9b.yaml", False)],
                         ids=["llama3_8b", "qwen25_7b", "gemma2_9b"])
def test_variants_realistic(monkeypatch, path, every):
    """The model shapes in bf16 against the float64 reference at T = 4999 and bit for bit deterministic at 8192:
    Llama-3-8B's heads with every variant, the others with the defaults (bench/cmp_bwd.py compares their other
    variants with the former default on the GPU)."""
    spec = load_spec(path)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    sets = variant_sets(plan) if every else [{k: dense_backward_default(spec)[k.rsplit("_", 1)[1]] for k in KERNELS}]
    for chosen in sets:
        with_variants(mod, plan, monkeypatch, chosen)
        testing.check_backward(mod, spec, 1, 4999, device="cuda", query_chunk=128)
        testing.check_backward_deterministic(mod, spec, 1, 8192, device="cuda")
