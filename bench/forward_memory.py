"""Peak GPU memory and time of a generated forward at long T, against the inputs' own size (issue: no O(T^2/d)).

Usage: python bench/forward_memory.py specs/nsa_paper.yaml --seqlens 8192 16384 32768 [--json out.json]
Prints one line per T: peak bytes allocated during the call minus the bytes of inputs and output, which must grow
linearly in T (the naive [T, Hq, T/d] compression probabilities alone would be 68 GiB at T=65536).
"""

import argparse
import json
import subprocess
import sys
import time

import torch
import triton

import specgen
from specgen import reference
from specgen.analysis import analyse, evaluate
from specgen.testing import spec_of


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--json")
    args = ap.parse_args()
    mod = specgen.load(args.spec)
    spec = spec_of(mod)
    fn = getattr(mod, f"{spec.family}_forward")
    rows = []
    for T in args.seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        inputs = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda",
                                       generator=gen)
        out = torch.empty((1, T, spec.heads.q, spec.head_dim.v), dtype=mod.DTYPE, device="cuda")
        fn(**inputs, out=out)  # compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(**inputs, out=out)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(lambda: fn(**inputs, out=out), warmup=5, rep=40)
        a = analyse(spec)
        naive = evaluate(a.naive_intermediates, T)
        row = {"T": T, "extra_peak_bytes": extra, "inputs_bytes": sum(v.numel() * v.element_size() for v in inputs.values()),
               "naive_intermediate_bytes": naive, "forward_ms_median": ms}
        rows.append(row)
        print(f"T={T:>6}  extra peak {extra / 2**30:7.3f} GiB  (inputs {row['inputs_bytes'] / 2**30:.3f} GiB; naive "
              f"would hold {naive / 2**30:.1f} GiB)  forward {ms:.2f} ms", flush=True)
        del inputs, out
        torch.cuda.empty_cache()
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.json, "w") as f:
            json.dump({"spec": spec.name, "spec_hash": spec.hash, "device": torch.cuda.get_device_name(),
                       "date": time.strftime("%Y-%m-%d"), "commit": commit, "rows": rows,
                       "inputs": "torch.randn-style random (specgen.reference.make_inputs), B=1"}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
