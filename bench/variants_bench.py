"""Times the launch-config variants that bench/kernel_audit.py's findings added, side by side with the current
default, on the GPU: the block-outer selection backward (`selection_kv_bwd`, tuning.selection_kv_variants) at
Llama-3-8B heads and the scatter backward (`selection_scatter`, tuning.scatter_variants) at DeepSeek-V3.2's. Per
variant: the kernel's own GPU time (torch.profiler, all its launches in one backward, mean of `--calls` calls), the
whole backward (median of CUDA events over `--reps`), the gradients' agreement with the default's (relative error:
the variants differ in fp32 accumulation order, and key-major 2 in where the gate is applied) and finiteness. One
JSON line per (spec, T, kernel, variant).

Usage (GPU): python bench/variants_bench.py [--only llama|dsa] [--variants NAME ...] [--json FILE] [--reps 5]
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
from specgen.compile.tuning import scatter_variants, selection_kv_variants
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CASES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="only these variant names (and the default)")
    args = ap.parse_args(argv)
    out = open(args.json, "a") if args.json else sys.stdout
    for key in args.only:
        run_case(key, args.reps, args.calls, out, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
