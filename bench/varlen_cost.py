"""What a packed (varlen) batch costs on the GPU against the batched call on the same tokens.

For each spec: forward (with --training, forward + backward through <family>_attention) of a packed batch with
lengths LENGTHS (default 40000 20000 5536 0: 64k tokens), against
  - its sequences run one by one (batched calls of B=1, T=len_i, in turn): what a packed call should beat, since
    it does the same work in one launch sequence;
  - one batched sequence of the same tokens (B=1, T=total): an upper bound of the packed work, since the causal
    work of one long sequence bounds that of its pieces.
Both the forward and the training step run natively on the packed rows (no padding: docs/varlen.md). Medians in
ms and peak memory beyond the inputs in GiB; also the summed GPU kernel time (torch.profiler) of the packed call and
of the sequences one by one, the target's measure (issue 18: packed <= 1.1x one by one, launch gaps excluded). `--lengths 32768 $(printf '128 %.0s' $(seq 256))` is one long
sequence and 256 short ones (where per-sequence calls pay 257 launch sequences).

Usage: python bench/varlen_cost.py SPEC... [--lengths 40000 20000 5536 0] [--training] [--json out.jsonl]
"""

import argparse
import json
import os
import time

import torch
import triton

import specgen
from specgen import reference
from specgen.perf.bench import kernel_times, peak_extra_gib
from specgen.reference.varlen import SHARED
from specgen.testing import differentiable_inputs, spec_of


def _timed(fn) -> tuple[float, float]:
    fn()
    gib = peak_extra_gib(fn)
    return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median"), gib


def _gpu_ms(fn) -> float:
    """Summed GPU time of every kernel `fn` launches (torch.profiler, mean of 3 calls): the issue's measure, which
    leaves out the host's launch gaps (257 launch sequences for 257 sequences one by one are the host's cost)."""
    return sum(kernel_times(fn, calls=3, names="all", warmup=False).values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--lengths", type=int, nargs="+", default=[40000, 20000, 5536, 0])
    ap.add_argument("--training", action="store_true", help="forward + backward through <family>_attention")
    ap.add_argument("--label", default="", help="a name for the batch in the JSON rows")
    ap.add_argument("--json")
    args = ap.parse_args()
    lengths, total = args.lengths, sum(args.lengths)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device="cuda")
    for path in args.specs:
        mod = specgen.load(path)
        spec = spec_of(mod)
        gen = torch.Generator(device="cuda").manual_seed(0)
        batched = reference.make_inputs(spec, 1, total, dtype=mod.DTYPE, device="cuda", generator=gen)
        packed = {n: (x if n in SHARED else x[0]) for n, x in batched.items()}
        names = differentiable_inputs(spec) if args.training else []
        fn = mod.__dict__[f"{spec.family}_{'attention' if args.training else 'forward'}"]

        def call(inputs, **kw):
            leaves = {n: x.detach().requires_grad_(n in names) for n, x in inputs.items()}
            out = fn(**leaves, **kw)
            if args.training:
                out.backward(torch.ones_like(out))

        row = {"kind": "varlen_cost", "spec": spec.name, "spec_hash": spec.hash, "lengths": lengths,
               "batch": args.label, "training": args.training, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "commit": os.environ.get("SPECGEN_COMMIT", "unknown"), "dtype": spec.dtype, "regime": "random",
               "baseline": "the same tokens as one batched sequence of T = total (B=1)"}
        row["packed_ms"], row["packed_extra_gib"] = _timed(lambda: call(packed, cu_seqlens=cu, max_seqlen=max(lengths)))
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        alone = [{n: (x if n in SHARED else x[:, s:s + n_i]) for n, x in batched.items()}
                 for s, n_i in zip(starts, lengths) if n_i > 0]

        def one_by_one():
            for inputs in alone:
                call(inputs)

        row["one_by_one_ms"], row["one_by_one_extra_gib"] = _timed(one_by_one)
        row["packed_vs_one_by_one"] = row["one_by_one_ms"] / row["packed_ms"]
        # The target's measure: GPU kernel time, packed against the sum over the sequences run one by one.
        row["packed_gpu_ms"] = _gpu_ms(lambda: call(packed, cu_seqlens=cu, max_seqlen=max(lengths)))
        row["one_by_one_gpu_ms"] = _gpu_ms(one_by_one)
        row["packed_gpu_over_one_by_one_gpu"] = row["packed_gpu_ms"] / row["one_by_one_gpu_ms"]
        row["batched_T_total_ms"], row["batched_T_total_extra_gib"] = _timed(lambda: call(batched))
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del batched, packed, alone
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
