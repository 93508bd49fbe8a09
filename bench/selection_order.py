"""Both selection loop orders of each spec, timed in one process on the GPU, with dense SDPA of the same run.

Usage (GPU): python bench/selection_order.py --seqlens 32768 --out DIR specs/models/*.yaml specs/nsa_paper.yaml
For every spec: the spec as written with selection.loop_order query, then kv (block outer), each through
`specgen bench`'s pass timer (forward, backward, forward+backward, per-kernel times, cuDNN and flash), one JSON
record per spec and order; then a table of the ratio kv / query per pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specgen.model.spec import load_spec, replace
from specgen.perf.bench import bench_passes, machine_peaks, record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768])
    ap.add_argument("--orders", nargs="+", default=["query", "kv"])
    ap.add_argument("--out", default="bench/results/selection_order")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args(argv)
    machine = machine_peaks()
    summary = []
    for path in args.specs:
        base = load_spec(path)
        times = {}
        for order in args.orders:
            spec = replace(base, name=f"{base.name}_{order}", **{"selection.loop_order": order})
            machine, rows = bench_passes(spec, args.seqlens, backward=not args.no_backward, machine=machine,
                                         spec_path=Path(path))
            record(spec, "passes", rows, regime="random", out_dir=Path(args.out), machine=machine)
            for r in rows:
                times[(order, r["T"])] = r
                print(f"{spec.name:<28} T={r['T']:>6} fwd {r['forward_ms']:8.3f} ms "
                      f"({r['speedup'].get('cudnn', float('nan')):.2f}x cuDNN)"
                      + (f"  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms ({r['speedup_fwd_bwd'].get('cudnn', float('nan')):.2f}x)"
                         if "fwd_bwd_ms" in r else "")
                      + "  sel: " + ", ".join(f"{k.replace('_selection_', '').replace('_kernel', '')} {v['ms']:.2f}"
                                              for k, v in sorted(r["kernels"].items()) if "selection" in k),
                      flush=True)
        for T in args.seqlens:
            if all((o, T) in times for o in ("query", "kv")):
                q, k = times[("query", T)], times[("kv", T)]
                summary.append({"spec": base.name, "T": T, "forward_kv_over_query": k["forward_ms"] / q["forward_ms"],
                                "fwd_bwd_kv_over_query": (k.get("fwd_bwd_ms", 0) / q["fwd_bwd_ms"]
                                                          if "fwd_bwd_ms" in q else None)})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
