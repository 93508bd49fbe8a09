"""Times the launch-config variants that bench/kernel_audit.py's findings added, side by side with the current
default, on the GPU: the block-outer selection backward (`selection_kv_bwd`, tuning.selection_kv_variants) at
Llama-3-8B heads and the scatter backward (`selection_scatter`, tuning.scatter_variants) at DeepSeek-V3.2's. Per
variant: the kernel's own GPU time (torch.profiler, all its launches in one backward, mean of `--calls` calls), the
whole backward (median of CUDA events over `--reps`), the gradients' agreement with the default's (relative error:
the variants differ in fp32 accumulation order, and key-major 2 in where the gate is applied) and finiteness. One
JSON line per (spec, T, kernel, variant).

`--only dsa_fwd`: the selection forward's forms (`selection`, tuning.selection_forward_variants) at DeepSeek-V3.2,
T = 16384 and 65536 (`--fwd-T`): one selection from the module's own indexer per T, then per variant the forward
kernel's GPU time (torch.profiler, mean of `--calls` calls), its TFLOP/s (analysis FLOPs of the selection branch,
FlashAttention's convention: 2 (d_qk + d_v) per query, head and attended key), the output's and log-sum-exp's
agreement with the default's, finiteness, and the compiled kernel's registers, spills and shared memory.

Usage (GPU): python bench/variants_bench.py [--only llama|dsa|dsa_fwd] [--variants NAME ...] [--json FILE]
             [--reps 5] [--fwd-T 16384 65536]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import specgen
from specgen import reference
from specgen.compile.plan import make_plan
from specgen.compile.analysis import analyse, evaluate
from specgen.compile.tuning import scatter_variants, selection_forward_variants, selection_kv_variants
from specgen.model.spec import load_spec
from specgen.perf.bench import event_median_ms, kernel_times
from specgen.testing import differentiable_inputs

CASES = {
    "llama": ("specs/models/model_llama3_8b.yaml", 65536, "selection_kv_bwd", "_selection_kv_bwd_kernel",
              selection_kv_variants),
    "dsa": ("specs/dsa_v32.yaml", 16384, "selection_scatter", "_selection_bwd_scatter_kernel", scatter_variants),
}


def run_case(key: str, reps: int, calls: int, out, only_variants=None) -> None:
    path, T, config, kernel, variants_of = CASES[key]
    spec = load_spec(path)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    default = dict(mod.CONFIGS["default"][config])
    gen = torch.Generator("cuda").manual_seed(0)
    x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda", generator=gen)
    names = differentiable_inputs(spec)
    leaves = [x[n].requires_grad_(True) for n in names]
    fn = mod.__dict__[f"{spec.family}_attention"]
    out_ = fn(**x)
    dout = torch.randn(out_.shape, generator=gen, device="cuda").to(mod.DTYPE)
    del out_

    def backward():
        o = fn(**x)
        return torch.autograd.grad(o, leaves, dout)

    variants = variants_of(plan)
    if only_variants:
        variants = {n: c for n, c in variants.items() if n in only_variants or c == default}
    order = sorted(variants, key=lambda n: variants[n] != default)  # the default first
    first = None
    for name in order:
        cfg = variants[name]
        mod.CONFIGS["default"][config] = cfg
        rec = {"spec": spec.name, "T": T, "kernel": config, "variant": name, "config": cfg,
               "default": cfg == default, "device": torch.cuda.get_device_name()}
        try:
            t0 = time.time()
            grads = [g.clone() for g in backward()]
            torch.cuda.synchronize()
            rec["first_call_s"] = round(time.time() - t0, 2)
            rec["finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
            if first is None:
                first = grads
            rec["rel_err_vs_default"] = max(
                (torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double())).item()
                for a, b in zip(grads, first))
            del grads
            rec["kernel_ms"] = round(kernel_times(backward, calls=calls, names={kernel}).get(kernel, float("nan")), 3)
            rec["fwd_bwd_ms"] = round(event_median_ms(backward, reps), 3)
        except Exception as e:  # noqa: BLE001 (a variant the GPU refuses is a result)
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(rec), file=out, flush=True)
        tag = (f"kernel {rec['kernel_ms']:8.2f} ms  fwd+bwd {rec['fwd_bwd_ms']:8.2f} ms  err {rec['rel_err_vs_default']:.1e}"
               f"  finite {rec['finite']}") if "fwd_bwd_ms" in rec else rec["error"]
        print(f"{spec.name:14s} T={T:6d} {config:18s} {name:10s}{'*' if rec['default'] else ' '} {tag}", flush=True)
        torch.cuda.empty_cache()
    mod.CONFIGS["default"][config] = default


FWD_SPEC, FWD_KERNEL = "specs/dsa_v32.yaml", "_selection_attention_kernel"


def _rel_err(a: torch.Tensor, b: torch.Tensor, rows: int = 2048) -> float:
    """||a - b|| / ||b|| over the token axis in chunks (an 8 GiB output has no room for float64 copies)."""
    num = den = 0.0
    for t0 in range(0, a.shape[1], rows):
        x, y = a[:, t0:t0 + rows].float(), b[:, t0:t0 + rows].float()
        num += torch.linalg.vector_norm(x - y).item() ** 2
        den += torch.linalg.vector_norm(y).item() ** 2
    return (num / den) ** 0.5 if den else float("nan")


def _compiled_kernels(fn) -> dict:
    """{id: compiled kernel} of a JIT function's device caches (what it has compiled so far)."""
    out = {}
    for cache in getattr(fn, "device_caches", {}).values():
        for compiled in cache[0].values():
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            if getattr(compiled, "n_regs", None) is not None:
                out[id(compiled)] = compiled
    return out


def run_forward_case(seqlens, calls: int, out, only_variants=None) -> None:
    """The selection forward's forms at V3.2 (module docstring, `--only dsa_fwd`). Without a GPU it runs under the
    interpreter (a smoke test at a tiny T: agreement only, no timings)."""
    spec = load_spec(FWD_SPEC)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    variants = selection_forward_variants(plan)
    default = dict(mod.CONFIGS["default"]["selection"])
    if only_variants:
        variants = {n: c for n, c in variants.items() if n in only_variants or c == default}
    order = sorted(variants, key=lambda n: variants[n] != default)  # the default first
    # The launch reads the GPU's tuned entry before the default: both are replaced per variant, restored at the end.
    saved = {name: dict(entry["selection"]) for name, entry in mod.CONFIGS.items() if "selection" in entry}
    sel_flops = {b.name: b.flops for b in analyse(spec).branches}["selection"]
    reports: dict = {}
    for T in seqlens:
        gen = torch.Generator(device).manual_seed(T)
        x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device=device, generator=gen)
        t0 = time.time()
        indices = mod.index_topk(x["q_idx"], x["k_idx"], x["w_idx"])
        sync()
        print(f"{spec.name} T={T}: selection by the indexer in {time.time() - t0:.1f} s", flush=True)
        result = torch.full((1, T, spec.heads.q, spec.head_dim.v), float("nan"), dtype=mod.DTYPE, device=device)

        def forward():
            return mod.dsa_forward(**x, indices=indices, out=result, return_lse=True)

        first = None
        tflop = evaluate(sel_flops, T) / 1e12
        for name in order:
            cfg = variants[name]
            for entry in saved:
                mod.CONFIGS[entry]["selection"] = cfg
            rec = {"spec": spec.name, "T": T, "kernel": "selection", "variant": name, "config": cfg,
                   "default": cfg == default, "device": torch.cuda.get_device_name() if gpu else "cpu"}
            try:
                before = _compiled_kernels(getattr(mod, FWD_KERNEL))
                result.fill_(float("nan"))
                t0 = time.time()
                _, lse = forward()
                sync()
                rec["first_call_s"] = round(time.time() - t0, 2)
                rec["finite"] = bool(torch.isfinite(result).all()) and not bool(torch.isnan(lse).any())
                new = [k for i, k in _compiled_kernels(getattr(mod, FWD_KERNEL)).items() if i not in before]
                if new:
                    k = new[-1]
                    reports[name] = {"registers": k.n_regs, "spills": k.n_spills, "shared_bytes": k.metadata.shared}
                rec.update(reports.get(name, {}))
                if first is None:
                    first = (result.clone(), lse.clone())
                rec["rel_err_vs_default"] = _rel_err(result, first[0])
                finite = torch.isfinite(first[1])
                rec["lse_max_abs_diff_vs_default"] = (lse[finite] - first[1][finite]).abs().max().item()
                times = kernel_times(forward, calls=calls, names={FWD_KERNEL}) if gpu else {}
                rec["kernel_ms"] = round(times.get(FWD_KERNEL, float("nan")), 3)
                rec["tflops"] = round(tflop / rec["kernel_ms"] * 1e3, 1)
            except Exception as e:  # noqa: BLE001 (a variant the GPU refuses is a result)
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(rec), file=out, flush=True)
            tag = (f"kernel {rec['kernel_ms']:8.2f} ms  {rec['tflops']:6.1f} TFLOP/s  "
                   f"err {rec['rel_err_vs_default']:.1e}"
                   f"  regs {rec.get('registers', '?')} spills {rec.get('spills', '?')} smem "
                   f"{rec.get('shared_bytes', '?')}  finite {rec['finite']}") if "tflops" in rec else rec["error"]
            print(f"{spec.name:14s} T={T:6d} selection {name:10s}{'*' if rec['default'] else ' '} {tag}", flush=True)
        del x, indices, result, first
        if gpu:
            torch.cuda.empty_cache()
    for name, cfg in saved.items():
        mod.CONFIGS[name]["selection"] = cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CASES), choices=[*CASES, "dsa_fwd"],
                    help="groups to run (default: the backward groups; dsa_fwd: the selection forward's forms)")
    ap.add_argument("--fwd-T", type=int, nargs="*", default=[16384, 65536], help="lengths of the dsa_fwd group")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="only these variant names (and the default)")
    args = ap.parse_args(argv)
    out = open(args.json, "a") if args.json else sys.stdout
    for key in args.only:
        if key == "dsa_fwd":
            run_forward_case(args.fwd_T, args.calls, out, args.variants)
        else:
            run_case(key, args.reps, args.calls, out, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
