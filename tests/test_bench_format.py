"""The benchmark's bookkeeping off the GPU: per-kernel rates from the analysis' FLOPs, the table, the compiler
report's reading of Triton's kernel caches, and the README's pass rows (the timings themselves need a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from specgen import testing
from specgen.compile import analysis as A
from specgen.perf.bench import ATTENTION_KERNELS, _per_kernel, compiler_report, table
from specgen.model.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def test_per_kernel_rates_use_the_branch_flops_and_the_measured_peak():
    spec = load_spec(ROOT / "specs/nsa_paper.yaml")
    T = 65536
    out = _per_kernel(spec, T, {"_selection_attention_kernel": 20.0, "_selection_bwd_dkdv_kernel": 50.0}, 800.0)
    sel = next(b for b in A.analyse(spec).branches if b.name == "selection")
    tflops = A.evaluate(sel.flops, T) / 20.0 / 1e9
    assert out["_selection_attention_kernel"]["tflops"] == pytest.approx(tflops)
    assert out["_selection_attention_kernel"]["fraction_of_peak"] == pytest.approx(tflops / 800.0)
    # A backward kernel shares its branch's backward FLOPs with its sibling: time only, no rate.
    assert "tflops" not in out["_selection_bwd_dkdv_kernel"] and out["_selection_bwd_dkdv_kernel"]["ms"] == 50.0
    assert all(name.startswith("_") and name.endswith("_kernel") for name in ATTENTION_KERNELS)


def test_table_lists_every_pass_and_kernel():
    spec = load_spec(ROOT / "specs/nsa_config_a.yaml")
    row = {"T": 8192, "forward_ms": 2.0, "forward_tflops": 100.0, "forward_fraction_of_peak": 0.125,
           "forward_gbps": 4000.0, "backward_ms": 10.0, "backward_tflops": 50.0, "backward_fraction_of_peak": 0.0625,
           "backward_gbps": 2000.0, "fwd_bwd_ms": 12.0, "fwd_bwd_tflops": 58.0,
           "speedup": {"cudnn": 0.6, "flash": 1.2}, "speedup_backward": {"cudnn": 0.5}, "speedup_fwd_bwd": {},
           "kernels": {"_selection_attention_kernel": {"ms": 1.5, "tflops": 120.0, "fraction_of_peak": 0.15}},
           "compiler": {"_selection_attention_kernel": [{"registers": 138, "spills": 0, "shared_bytes": 73728,
                                                         "num_warps": 4, "num_stages": 2}]}}
    text = table(spec, {"matmul_tflops": 800.0, "copy_gbps": 3000.0}, [row])
    for piece in ("800 TFLOP/s", "3000 GB/s", " forward ", "backward", "fwd_bwd", "12.5", "0.60x / 1.20x",
                  "_selection_attention_kernel: 1.500 ms 120 TFLOP/s, 15.0% of peak", "138 regs, 0 spills, 72 KiB"):
        assert piece in text, piece


def test_compiler_report_skips_kernels_that_never_ran():
    class NotRun:
        device_caches = {0: ({}, None, None, None, None)}

    module = type("M", (), {"_selection_attention_kernel": NotRun()})
    assert compiler_report(module) == {}


def test_readme_rows_of_an_all_pass_record():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "bench" / "plot_results.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rec = {"spec": "x", "kind": "passes", "device": "NVIDIA H100", "commit": "abc",
           "rows": [{"T": 8192, "forward_ms": 2.0, "dense": {"cudnn": 1.0, "flash": 2.0},
                     "speedup": {"cudnn": 0.5, "flash": 1.0}, "backward_ms": 4.0,
                     "dense_backward": {"cudnn": 2.0}, "speedup_backward": {"cudnn": 0.5}}]}
    rows = list(plot._passes(rec))
    assert [r[0] for r in rows] == ["forward", "backward"]
    text = plot.table({("x", "passes"): rec})
    assert "| x | backward | 8k | 4 | 2 / — | 0.50x / — |" in text


def test_decode_bench_names_why_flashinfer_did_not_run(monkeypatch):
    """`specgen bench --decode` compares with FlashInfer's paged decode where it is installed; elsewhere the record
    says why not (not installed, or shapes its decode kernel does not take), before touching a GPU."""
    import builtins

    import torch

    from specgen.model.spec import load_spec
    from specgen.perf.bench_decode import flashinfer_decode_ms

    real_import = builtins.__import__

    def no_flashinfer(name, *args, **kwargs):
        if name == "flashinfer":
            raise ImportError("no module named flashinfer")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flashinfer)
    spec = load_spec(ROOT / "specs" / "nsa_mqa.yaml")
    q, k = torch.randn(1, 1, 32, 128), torch.randn(1, 64, 1, 128)
    assert "flashinfer is not installed" in flashinfer_decode_ms(spec, q, k, k)


def test_training_step_table_and_baseline():
    from specgen.model.spec import replace
    from specgen.perf.bench_train import PIECES, check_trainable, dense_baseline_shapes, table as step_table

    v32, small = load_spec(ROOT / "specs/dsa_v32.yaml"), load_spec(ROOT / "specs/dsa_small.yaml")
    # MLA is compared with the unabsorbed MHA DeepSeek-V3.2 would prefill densely (the dims the spec's `unabsorbed`
    # writes, the spec's scale: the same logits); other specs with their own heads.
    assert dense_baseline_shapes(v32)["heads"] == [128, 128] and dense_baseline_shapes(v32)["head_dim"] == [192, 128]
    assert dense_baseline_shapes(v32)["scale"] == v32.softmax_scale == pytest.approx(192 ** -0.5)
    other = replace(v32, **{"unabsorbed.qk": 256, "unabsorbed.v": 256})
    assert dense_baseline_shapes(other)["head_dim"] == [256, 256]
    assert dense_baseline_shapes(small)["heads"] == [small.heads.q, small.heads.kv]
    # An MLA spec without the field has no baseline to assume: refused (before any GPU work), unless skipped.
    bare = replace(v32, unabsorbed=None)
    with pytest.raises(ValueError, match="without `unabsorbed` head dims.*--no-dense"):
        check_trainable(bare)
    check_trainable(bare, dense=False)
    row = {"T": 32768, **{key: 10.0 * (i + 1) for i, (_, key) in enumerate(PIECES)},
           "attention_forward_tflops": 300.0, "attention_backward_tflops": 120.0,
           "dense": {"shapes": dense_baseline_shapes(v32), "fwd_bwd": {"cudnn": 303.0, "flash": "unsupported: x"}},
           "speedup_step": {"cudnn": 303.0 / 50.0}, "step_peak_extra_gib": 30.0,
           "step_outputs_and_grads_gib": 24.0, "step_beyond_outputs_and_grads_gib": 6.0,
           "kernels": {"_selection_bwd_scatter_kernel": {"ms": 20.0}, "_index_scores_kernel": {"ms": 5.0}}}
    text = step_table(v32, [row])
    for piece in ("indexer + top-k", "10.00 ms", "attention forward", "300 TFLOP/s", "120 TFLOP/s",
                  "whole step (sparse stage)", "50.00 ms", "warm-up (dense) stage", "60.00 ms",
                  "whole step, p shared", "70.00 ms", "sparse stage, p given", "80.00 ms",
                  "unabsorbed MHA", "303.00 ms / —", "step speedup 6.06x", "6.00 beyond them",
                  "warm-up loss, unabsorbed q/k: fwd ", "90.00 ms", "unabsorbed q/k: fwd+bwd", "100.00 ms",
                  "_selection_bwd_scatter_kernel: 20.000 ms"):
        assert piece in text, piece
    # The slowest kernels first.
    assert text.index("_selection_bwd_scatter_kernel") < text.index("_index_scores_kernel")


def test_training_step_refuses_specs_without_an_indexer(capsys):
    from specgen.cli import main

    rc = main(["bench", str(ROOT / "specs/nsa_paper.yaml"), "--training-step"])
    err = capsys.readouterr().err
    # Refused before the GPU check: the message names the flag, the spec and what it lacks.
    assert rc != 0 and "--training-step" in err and "nsa_paper" in err and "indexer" in err
    assert "CUDA" not in err


def test_training_step_runs_the_user_step_under_the_interpreter():
    """The step the benchmark times, run on the CPU at a tiny T: every piece is called, the step hands back finite
    gradients for q, k and the indexer, and the row carries each piece (timer and memory stand in for the GPU's)."""
    import torch

    from specgen.perf.bench_train import PIECES, bench_training_step

    spec = load_spec(ROOT / "specs/dsa_small.yaml")
    results = []

    def timer(fn):
        results.append(fn())
        return 1.0

    rows = bench_training_step(spec, [24], dense=False, per_kernel=False, device=testing.test_device(), timer=timer,
                               memory=lambda fn: 0.5)
    row = rows[0]
    # Every piece but the unabsorbed warm-up loss (dsa_small is no MLA spec: test_training_step_unabsorbed_piece).
    assert row["T"] == 24 and all(key in row for _, key in PIECES if "unabsorbed" not in key), row
    assert not any("unabsorbed" in key for key in row)
    step, shared = results[-1], results[-3]  # the whole step's grads: dq, dk, dq_idx, dk_idx, dw_idx, then the output
    assert len(step) == len(("dq", "dk", "dv", "dq_idx", "dk_idx", "dw_idx", "out"))  # dsa_small has its own v
    for g in step:
        assert g.dtype.is_floating_point and torch.isfinite(g).all() and g.abs().sum() > 0
    # The step with p shared (the backward's distill_p, the loss's p_main): the same gradients up to fp32 rounding.
    # On a GPU the scatter backward's dK/dV and the loss's dk_I are fp32 atomics added in an order that differs from
    # run to run, so an fp16 element may round to its neighbour (an ulp: at most 2^-10 relative).
    rtol = 1e-4 if testing.test_device() == "cpu" else 2e-3
    assert len(shared) == len(step) and all(torch.allclose(a, b, rtol=rtol, atol=1e-6) for a, b in zip(shared, step))
    # ... and the row's own check of it (what the GPU run reports at the bench's size).
    assert row["shared_p_loss_rel_diff"] < 1e-5 and row["shared_p_grad_rel_diff"] < 1e-4, row
    assert row["attention_forward_tflops"] > 0 and row["step_beyond_outputs_and_grads_gib"] < 0.5


def test_training_step_unabsorbed_piece(tmp_path, monkeypatch):
    """The training step's warm-up piece from unabsorbed q and k (a tiny MLA spec with `unabsorbed`, under the
    interpreter): forward and forward + backward timed with lse_main given, both running the loss (a finite value
    and the indexer's gradients)."""
    import torch

    import specgen
    from specgen.model.spec import spec_from_mapping
    from specgen.perf import bench_train

    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path))
    spec = spec_from_mapping({"name": "bench_mla_tiny", "family": "dsa", "heads": {"q": 4, "kv": 1},
                              "head_dim": {"qk": 48, "v": 32}, "unabsorbed": {"qk": 32, "v": 16}, "dtype": "fp32",
                              "selection": {"top_k": 8}, "indexer": {"heads": 2, "head_dim": 16},
                              "max_seqlen": 4096})
    module = specgen.load(spec)
    dev = testing.test_device()  # the interpreter's CPU, or the GPU machine's CUDA
    _, _, _, idx_in, _ = bench_train.step_inputs(spec, module, 20, dev)
    results = []

    def timer(fn):
        results.append(fn())
        return 2.0

    row = bench_train._unabsorbed_dense_times(spec, module, idx_in, 20, dev, timer)
    assert row == {"distill_dense_unabsorbed_fwd_ms": 2.0, "distill_dense_unabsorbed_fwd_bwd_ms": 2.0}
    forward, (loss, *grads) = results
    assert torch.isfinite(forward) and float(forward) > 0 and torch.equal(forward, loss.detach())
    assert len(grads) == 3 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_decode_table_names_the_paged_rows_and_their_cost():
    from specgen.perf.bench_decode import table

    spec = load_spec("specs/nsa_paper.yaml")
    base = {"batch": 64, "context": 65536, "q_len": 1, "scoring": "partials", "form": "split",
            "step_ms": 0.5, "floor_ms": 0.3, "x_floor": 1.7, "achieved_gbps": 2000.0, "dense_best_ms": 3.7}
    rows = [dict(base, layout="contiguous", graph_ms=0.40, speedup=9.25),
            dict(base, layout="paged", graph_ms=0.42, speedup=8.8, paged_vs_contiguous=1.05)]
    lines = table(spec, 3000.0, rows).splitlines()
    assert "paged/partials" in lines[3] and "paged/contiguous 1.050" in lines[3]
    assert "paged" not in lines[2]


def test_decode_bench_max_batch_is_the_largest_that_fits():
    """`specgen bench --decode --batches max`: the largest batch whose caches (one per layout timed) fit
    FIT_FRACTION of the free memory (issue 19's model-shape rows); a bad entry is refused by the parser."""
    import argparse

    import specgen
    from specgen.cli import _batch
    from specgen.perf.bench_decode import FIT_FRACTION, _cache_bytes, fit_batch

    spec = load_spec("specs/nsa_small.yaml")
    module = specgen.load(spec)
    one = _cache_bytes(module, spec, 1, 4096)
    free = int(40.5 * one / FIT_FRACTION)
    assert fit_batch(module, spec, 4096, ("contiguous",), free) == 40
    assert fit_batch(module, spec, 4096, ("contiguous", "paged"), free) == 20
    assert fit_batch(module, spec, 4096, ("contiguous",), one) == 0
    assert _batch("max") == 0 and _batch("64") == 64
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'max'"):
            _batch(bad)
