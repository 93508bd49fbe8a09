"""Time DSA's sparse attention backward on the GPU: the scatter path (atomics, the default) against the
deterministic inverse-index path (torch.use_deterministic_algorithms), same inputs, same run, and the sparse
attention forward (given indices) for reference. Prints ms (median of CUDA-event timings) and TFLOP/s with
FlashAttention's convention (backward = 2.5 x the forward's 2·H·(Dqk + Dv) FLOPs per selected (query, key)).

Usage: python bench/dsa_bwd.py [SPEC] [--seqlens 16384 32768] [--reps 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import specgen
from specgen import testing
from specgen.model.spec import load_spec
from specgen.perf.bench import event_median_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--seqlens", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    print(f"{spec.name}: selection backward {mod._DESC.selection_backward}; {torch.cuda.get_device_name()}")
    rows = []
    for T in args.seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        H, dqk, dv, dev, dt = spec.heads.q, spec.head_dim.qk, spec.head_dim.v, "cuda", mod.DTYPE
        q = torch.randn(1, T, H, dqk, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, T, spec.heads.kv, dqk, device=dev, dtype=dt, generator=gen)
        idx = spec.indexer
        q_idx = torch.randn(1, T, spec.heads.kv * idx.heads, idx.head_dim, device=dev, dtype=dt, generator=gen)
        k_idx = torch.randn(1, T, spec.heads.kv, idx.head_dim, device=dev, dtype=dt, generator=gen)
        w_idx = torch.randn(1, T, spec.heads.kv * idx.heads, device=dev, dtype=dt, generator=gen)
        dout = torch.randn(1, T, H, dv, device=dev, dtype=dt, generator=gen)
        state = mod._forward(q, k, q_idx, k_idx, w_idx, save_branch_outputs=True)
        indices = state.indices
        pairs = int((indices >= 0).sum()) * spec.heads.group_size
        fwd_flops = 2 * pairs * (dqk + dv)
        empty = q.new_empty((0,))

        def forward():
            mod._forward(q, k, q_idx, k_idx, w_idx, indices=indices, save_branch_outputs=True)

        def backward():
            mod._backward(dout, q, k, state.lse, indices, state.branch_out, empty, empty)

        row = {"spec": spec.name, "T": T, "gpu": torch.cuda.get_device_name(),
               "forward_ms": event_median_ms(forward, args.reps)}
        row["scatter_ms"] = event_median_ms(backward, args.reps)
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of torch.empty: time the kernels
        with testing.deterministic_algorithms():
            row["deterministic_ms"] = event_median_ms(backward, max(1, args.reps // 2))
        torch.utils.deterministic.fill_uninitialized_memory = fill
        # The two paths' gradients on these inputs (relative error of the scatter path's against the other's).
        grads = mod._backward(dout, q, k, state.lse, indices, state.branch_out, empty, empty)
        with testing.deterministic_algorithms():
            exact = mod._backward(dout, q, k, state.lse, indices, state.branch_out, empty, empty)
        row["rel_err"] = {n: float((a.float() - b.float()).norm() / b.float().norm())
                          for n, a, b in zip(("dq", "dk"), grads, exact)}
        row["forward_tflops"] = fwd_flops / row["forward_ms"] / 1e9
        for path in ("scatter", "deterministic"):
            row[f"{path}_tflops"] = 2.5 * fwd_flops / row[f"{path}_ms"] / 1e9
        print(f"T={T}: forward {row['forward_ms']:.1f} ms ({row['forward_tflops']:.0f} TFLOP/s); backward scatter "
              f"{row['scatter_ms']:.1f} ms ({row['scatter_tflops']:.0f} TFLOP/s), deterministic "
              f"{row['deterministic_ms']:.1f} ms ({row['deterministic_tflops']:.0f} TFLOP/s); "
              f"rel err scatter vs deterministic {row['rel_err']}", flush=True)
        rows.append(row)
        del q, k, q_idx, k_idx, w_idx, dout, state, indices, grads, exact
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
