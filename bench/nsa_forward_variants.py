"""Times the forward's plan variants (specgen.compile.variants) against the plan's default on the GPU: the NSA
forward of model-shaped specs at one T, per kernel (torch.profiler: each kernel's own GPU time, all its launches in
one forward, mean of `--calls` forwards) and whole (median of CUDA events over `--reps`), with the agreement of
each variant's output, log-sum-exps and selection with the default's, the compiler's registers/spills of the
kernels the variants change, and cuDNN's dense causal forward of the same shapes (the issue's yardstick).

Variants (any comma-joined set of PLAN_VARIANTS names; sets that do not apply to a spec are skipped). Baselines,
the former defaults (H100 timing of commit dc0b177, docs/forward.md "The variants timed"):
  score_masked           the block scorer with every trip masked (the kernel before the unmasked trips)
  sel_unforced           the block-outer selection's forced blocks as work items, every slot merged by the plain
                         merge (the plan attends them per query tile in its merge)
  sel_w8                 the block-outer selection forward on two warpgroups at 64 rows x 256 dims (Gemma-2's; the
                         plan runs one)
  sel_wl_torch           the block-outer work list by one torch sort (the plan's is the Triton counting sort)
Candidates (not the plan's: score_key32 departs from the exact tie rule, score_km was timed only with it):
  score_key32            the scorer's running top-n on int32 keys (the score cut to 31 - index bits)
  score_km               its key-major score tile (the group's heads summed within a thread; untimed alone)
A comma-joined part KERNEL.FIELD=VALUE overrides the module's launch config instead: select.num_stages=3 is the
scorer's former pipeline depth on Gemma-2 (the plan's 2 there: 3 stages take 133 KB of shared memory, one program
an SM), select.num_stages=2 elsewhere a candidate.
Selections may differ from the default's on near-ties (summation order, the int32 keys' cut): the record says how
many (query, kv group) rows differ and the output's relative error against the default's.

Usage (GPU): python bench/nsa_forward_variants.py [--specs llama qwen gemma] [--T 65536] [--variants V ...]
             [--json FILE] [--reps 10] [--calls 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import specgen
from specgen import reference
from specgen.compile.variants import load_variant
from specgen.model.spec import load_spec
from specgen.perf.bench import compiler_report, dense_forward_ms, event_median_ms, kernel_times

SPECS = {"llama": "specs/models/model_llama3_8b.yaml", "qwen": "specs/models/model_qwen25_7b.yaml",
         "gemma": "specs/models/model_gemma2_9b.yaml", "mha32": "specs/models/model_mha32_d128.yaml",
         "mha16": "specs/models/model_mha16_d64.yaml"}
VARIANTS = ["score_masked", "sel_unforced", "sel_w8", "select.num_stages=3", "sel_unforced,sel_w8,select.num_stages=3",
            "score_key32", "score_km", "score_km,score_key32", "score_km,score_key32,select.num_stages=2"]
# The kernels the variants touch (their compiler reports go into the record); every kernel's time is recorded.
WATCH = ("_select_blocks_kernel", "_selection_kv_attention_kernel", "_selection_kv_merge_kernel",
         "_selection_kv_forced_merge_kernel")


def short(name: str) -> str:
    return name if name.startswith("_") else ("torch:" + name[:40])


def run_spec(key: str, T: int, variants, reps: int, calls: int, out) -> None:
    spec = load_spec(SPECS[key])
    gen = torch.Generator("cuda").manual_seed(T)
    x = reference.make_inputs(spec, 1, T, dtype=torch.bfloat16, device="cuda", generator=gen)
    dense = dense_forward_ms(spec, T, backends=("cudnn",)).get("cudnn")
    print(f"{spec.name} T={T}: cuDNN dense causal forward {dense} ms", flush=True)
    base = None
    for name in ["default"] + list(variants):
        parts = [] if name == "default" else name.split(",")
        names = [n for n in parts if "=" not in n]
        overrides = [n.split("=") for n in parts if "=" in n]
        mod = specgen.load(spec) if not names else load_variant(spec, names)
        if mod is None:
            print(f"{spec.name:16s} {name:32s} does not apply", flush=True)
            continue
        saved = {k: dict(c) for k, c in mod.CONFIGS["default"].items()}
        for field, value in overrides:
            kernel, key = field.split(".")
            mod.CONFIGS["default"][kernel][key] = int(value)
        fwd = mod.nsa_forward
        rec = {"spec": spec.name, "T": T, "variant": name, "device": torch.cuda.get_device_name(),
               "cudnn_fwd_ms": dense}
        try:
            t0 = time.time()
            o, lse, idx = fwd(**x, return_lse=True, return_indices=True)
            torch.cuda.synchronize()
            rec["first_call_s"] = round(time.time() - t0, 1)
            rec["finite"] = bool(torch.isfinite(o).all())
            if base is None:
                base = (o, lse, idx)
            else:
                o0, lse0, idx0 = base
                rec["out_rel_err_vs_default"] = (torch.linalg.vector_norm((o - o0).double())
                                                 / torch.linalg.vector_norm(o0.double())).item()
                finite = torch.isfinite(lse0)
                rec["lse_max_err_vs_default"] = (lse - lse0)[finite].abs().max().item()
                rows = (idx != idx0).any(-1)
                rec["rows_selecting_otherwise"] = int(rows.sum())
                rec["rows"] = rows.numel()
            del o, lse, idx
            kt = kernel_times(lambda: fwd(**x), calls=calls, names="all")
            rec["kernels_ms"] = {short(k): round(v, 3) for k, v in sorted(kt.items(), key=lambda kv: -kv[1])}
            rec["kernel_sum_ms"] = round(sum(kt.values()), 3)
            rec["forward_ms"] = round(event_median_ms(lambda: fwd(**x), reps), 3)
            if isinstance(dense, float):
                rec["speedup_vs_cudnn"] = round(dense / rec["forward_ms"], 3)
            comp = compiler_report(mod)
            rec["compiler"] = {k: comp[k] for k in WATCH if k in comp}
        except Exception as e:  # noqa: BLE001 (a variant the GPU refuses is a result)
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for kernel, config in saved.items():
            mod.CONFIGS["default"][kernel] = config
        print(json.dumps(rec), file=out, flush=True)
        if "forward_ms" in rec:
            ks = rec["kernels_ms"]
            parts = "  ".join(f"{k.strip('_').replace('_kernel', '')} {ks[k]:.2f}" for k in WATCH if k in ks)
            agree = ("" if name == "default" else
                     f"  err {rec['out_rel_err_vs_default']:.1e} rows≠ {rec['rows_selecting_otherwise']}")
            print(f"{spec.name:16s} {name:32s} fwd {rec['forward_ms']:7.2f} ms ({rec.get('speedup_vs_cudnn', '-')}x"
                  f" cuDNN)  {parts}{agree}", flush=True)
        else:
            print(f"{spec.name:16s} {name:32s} {rec['error']}", flush=True)
        torch.cuda.empty_cache()
    del base, x
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="*", default=["llama", "qwen", "gemma"])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = open(args.json, "a") if args.json else sys.stdout
    for key in args.specs:
        run_spec(key, args.T, args.variants, args.reps, args.calls, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
