"""Time DSA's sparse attention backward on the GPU: the scatter path (atomics, the default) against the
deterministic inverse-index path (torch.use_deterministic_algorithms), same inputs, same run, and the sparse
attention forward (given indices) for reference. Prints ms (median of CUDA-event timings) and TFLOP/s with
FlashAttention's convention (backward = 2.5 x the forward's 2·H·(Dqk + Dv) FLOPs per selected (query, key)).

Options for the deterministic path (issue 17, docs/backward.md "Determinism"; bench/detmode_gpu.sh): `--det-reps`
its repetitions (default reps // 2); `--profile N` the N kernels with the most GPU time in one deterministic
backward (torch.profiler); `--bitwise` forward and backward again in deterministic mode, compared bit for bit with
the first ones; `--former-index` the inverse index's build alone in deterministic mode, as built now and with the
former scatter_ compaction (GPU time and its top kernels).

Usage: python bench/dsa_bwd.py [SPEC] [--seqlens 16384 32768] [--reps 5] [--det-reps N] [--profile N] [--bitwise]
       [--former-index] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import specgen
from specgen import testing
from specgen.model.spec import load_spec
from specgen.runtime import backward as runtime_backward
from specgen.perf.bench import _commit, event_median_ms, kernel_times


@contextlib.contextmanager
def deterministic():
    """PyTorch's deterministic mode without its NaN fill of torch.empty (time the kernels, as the records did)."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with testing.deterministic_algorithms():
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().flatten().view(torch.uint8)


_CSR = runtime_backward._csr


def _former_csr(comp, R: int, n_seg: int, units_per_tile: int):
    """runtime.backward._csr as it was before commit cbcb3dd (several units per tile): the runs compacted by two
    scatter_ calls that send every non-first entry to one spare slot. Kept here to time it against the current
    build in deterministic mode, where torch takes scatter_ through its sort-based index_put_. Takes the sorted
    keys, as runtime.backward._csr does now."""
    if units_per_tile == 1:
        return _CSR(comp, R, n_seg, units_per_tile)
    device = comp.device
    padding = torch.iinfo(torch.int64).max
    upt = units_per_tile
    real = comp != padding
    key = torch.where(real, comp // upt, padding)
    n = comp.numel()
    first = real.clone()
    first[1:] &= key[1:] != key[:-1]
    slot = torch.where(first, torch.cumsum(first, 0) - 1, n)
    csum = torch.cumsum(torch.where(real, torch.ones_like(comp) << torch.where(real, comp % upt, 0), 0), 0)
    start = torch.full((n + 1,), n, dtype=torch.int64, device=device).scatter_(0, slot, torch.arange(n, device=device))
    end = start[1:n + 1] - 1
    bits = csum[end.clamp(0, max(n - 1, 0))] - torch.where(start[:n] > 0, csum[(start[:n] - 1).clamp(0)], 0)
    key = torch.full((n + 1,), padding, dtype=torch.int64, device=device).scatter_(0, slot, key)[:n]
    qpos = (key % R).to(torch.int32)
    offsets = torch.searchsorted(key // R, torch.arange(n_seg + 1, device=device))
    return offsets, qpos, bits


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (a dry run under the interpreter)"


def _top(times: dict, n: int) -> list:
    return sorted(times.items(), key=lambda kv: -kv[1])[:n]


def _print_top(title: str, times: dict, n: int) -> None:
    print(f"{title}: {sum(times.values()):.1f} ms of GPU time in {len(times)} kernels; top {n}:", flush=True)
    for name, ms in _top(times, n):
        print(f"  {ms:10.2f} ms  {name[:110]}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--seqlens", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--det-reps", type=int, default=None, help="deterministic-mode repetitions (default reps // 2)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N kernels with the most GPU time of one deterministic backward")
    ap.add_argument("--bitwise", action="store_true",
                    help="deterministic mode: forward and backward again, equal bit for bit to the first ones")
    ap.add_argument("--former-index", action="store_true",
                    help="the inverse index's build alone in deterministic mode, now and with the former scatter_")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    det_reps = args.det_reps if args.det_reps is not None else max(1, args.reps // 2)
    t_start = time.perf_counter()
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    print(f"{spec.name}: selection backward {mod._DESC.selection_backward}; {_device_name()}")
    rows = []
    for T in args.seqlens:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=dev).manual_seed(T)
        H, dqk, dv, dt = spec.heads.q, spec.head_dim.qk, spec.head_dim.v, mod.DTYPE
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

        row = {"spec": spec.name, "T": T, "gpu": _device_name(), "commit": _commit(),
               "forward_ms": event_median_ms(forward, args.reps)}
        row["scatter_ms"] = event_median_ms(backward, args.reps)
        with deterministic():
            row["deterministic_ms"] = event_median_ms(backward, det_reps)
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
              f"{row['deterministic_ms']:.1f} ms ({row['deterministic_tflops']:.0f} TFLOP/s; median of {det_reps}); "
              f"rel err scatter vs deterministic {row['rel_err']} [{time.perf_counter() - t_start:.0f} s]",
              flush=True)
        if args.bitwise:
            # Forward (indexer, top-k, attention) and backward again in deterministic mode (NaN fill on, as a
            # user's run has it): everything equal bit for bit to the first forward and the deterministic backward.
            with testing.deterministic_algorithms():
                again = mod._forward(q, k, q_idx, k_idx, w_idx, save_branch_outputs=True)
                grads2 = mod._backward(dout, q, k, again.lse, again.indices, again.branch_out, empty, empty)
            same = {n: bool(torch.equal(_bits(a), _bits(b))) for n, a, b in
                    (("out", again.out, state.out), ("lse", again.lse, state.lse),
                     ("indices", again.indices, state.indices), ("dq", grads2[0], exact[0]),
                     ("dk", grads2[1], exact[1]))}
            row["bitwise_equal"] = same
            print(f"bit for bit (deterministic mode, forward + backward again): {same} -> "
                  f"{'PASS' if all(same.values()) else 'FAIL'} [{time.perf_counter() - t_start:.0f} s]", flush=True)
            del again, grads2
        if args.profile:
            with deterministic():
                times = kernel_times(backward, calls=1, names="all", warmup=False)
            row["deterministic_kernels_ms"] = dict(_top(times, args.profile))
            _print_top("deterministic backward, one call (torch.profiler)", times, args.profile)
        if args.former_index:
            tile = specgen.runtime.launch_config(mod.CONFIGS, "selection_dkdv")["block_n"]

            def build():
                mod._selection_inverse_index(indices, T, tile)

            with deterministic():
                now = kernel_times(build, calls=1, names="all")
                runtime_backward._csr = _former_csr
                try:
                    former = kernel_times(build, calls=1, names="all", warmup=False)
                finally:
                    runtime_backward._csr = _CSR
            row["inverse_index_ms"] = {"now": sum(now.values()), "former_scatter": sum(former.values())}
            _print_top("inverse index build, deterministic mode, now", now, 5)
            _print_top("inverse index build, deterministic mode, former scatter_ compaction", former, 5)
        print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        rows.append(row)
        del q, k, q_idx, k_idx, w_idx, dout, state, indices, grads, exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
