"""The lightning indexer + exact top-k of a DSA spec, variant against variant in one run: the score tile's forms
(query-major, the first default; key-major) and the radix select's (five passes over the row, the first
default; compacting), the default before 2026-12-07 (key-major at 2 stages, select at 4 warps) and a few launch
configs of each (docs/decisions.md, indexer top-k).

For each T and variant: the whole selection's median time (CUDA events), each kernel's GPU time (torch.profiler,
all chunks summed), the scoring's TFLOP/s (T(T+1)/2 pairs x indexer heads x dim x 2), the top-k's row-read rate
(GB/s of one pass over every row: 4 bytes x T(T+1)/2 units x kv groups, each group selecting on its own rows),
the extra memory (peak allocated beyond the inputs and outputs) and whether the indices equal the first variant's
of the same score form (random inputs, never zeros).

Usage: python bench/indexer_bench.py SPEC [--seqlens 16384 32768 65536] [--variants NAME ...] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specgen
from specgen import reference
from specgen.compile.plan import make_plan
from specgen.compile.tuning import index_configs, index_previous_default
from specgen.perf.bench import kernel_times, peak_extra_gib
from specgen.testing import spec_of
from specgen.perf.bench import event_median_ms


def variants(plan) -> dict[str, dict]:
    """{name: {"select": score config, "index_topk": top-k config}}: the first default (query-major, five passes)
    first, then the default before 2026-12-07 (key-major at 2 stages, compacting select at 4 warps), the default
    (3 stages, 8 warps: the two winners of the H200 run of 2026-12-07, timed apart there), each half of it alone,
    and the other forms and launch configs."""
    old = index_configs(plan, key_major=False, compact=False)
    prev = index_previous_default(plan)
    new = index_configs(plan)
    km = index_configs(plan, key_major=True)["select"]
    qm = old["select"]
    out = {
        "old (query-major, 5 passes)": old,
        "previous default (km 2 stages, topk 4 warps)": prev,
        "default": new,
        "km 2 stages": {**new, "select": {**km, "num_stages": 2}},
        "topk 4 warps": {**new, "index_topk": {**new["index_topk"], "num_warps": 4}},
        "query-major + compact": {"select": qm, "index_topk": new["index_topk"]},
        "key-major + 5 passes": {"select": km, "index_topk": old["index_topk"]},
        "km bt32": {**new, "select": {**km, "bt": 32}},
        "km bt128": {**new, "select": {**km, "bt": 128}},
        "km 256 keys 8 warps": {**new, "select": {**km, "block_n": max(256, plan.unit), "num_warps": 8}},
        "qm 8 warps": {**new, "select": {**qm, "num_warps": 8}},
        "topk chunk 1024": {**new, "index_topk": {**new["index_topk"], "chunk": 1024}},
        # 4096 units a trip at 8 warps spills (docs/decisions.md): at 4 warps, as timed on 2026-12-07.
        "topk chunk 4096": {**new, "index_topk": {**new["index_topk"], "chunk": 4096, "num_warps": 4}},
    }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--variants", nargs="*", help="names to run (default: all); the first is the baseline")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    mod = specgen.load(args.spec)
    spec = spec_of(mod)
    plan = make_plan(spec)
    table = variants(plan)
    names = args.variants or list(table)
    default = mod.CONFIGS["default"]
    heads, dim = spec.indexer.heads * spec.heads.kv, spec.indexer.head_dim
    out = open(args.json, "a") if args.json else None
    for T in args.seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda", generator=gen)
        q, k, w = x["q_idx"], x["k_idx"], x["w_idx"]
        del x
        idx = torch.empty((1, T, spec.heads.kv, spec.selection.top_k), dtype=torch.int32, device="cuda")
        pairs = T * (T + 1) / 2
        baseline = {}
        for name in names:
            # The selection reads the module's CONFIGS at every call: the variant's configs for every GPU name.
            mod.CONFIGS = {"default": {**default, **table[name]}}
            run = lambda: mod._select_by_indexer(q, k, w, idx)  # noqa: E731
            t0 = time.time()
            try:
                run()
                torch.cuda.synchronize()
            except Exception as exc:  # a config the compiler rejects: said, and the next one runs
                print(f"T={T:6d} {name:30s} failed: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            first_s = time.time() - t0
            # Indices against the first variant of the same score form (the top-k is exact: equal scores must give
            # equal indices; the two forms sum over heads in different orders, so near-ties may differ between them).
            form = table[name]["select"]["key_major"]
            same = None
            if form not in baseline:
                baseline[form] = idx.clone()
            else:
                same = bool(torch.equal(idx, baseline[form]))
            extra = peak_extra_gib(run)
            ms = event_median_ms(run, args.reps)
            kt = kernel_times(run, calls=2, names={"_index_scores_kernel", "_radix_topk_kernel"})
            score_ms, topk_ms = kt.get("_index_scores_kernel", 0.0), kt.get("_radix_topk_kernel", 0.0)
            row = {"spec": spec.name, "T": T, "variant": name, "configs": table[name], "ms": ms,
                   "scores_ms": score_ms, "topk_ms": topk_ms,
                   "scores_tflops": pairs * heads * dim * 2 / score_ms / 1e9 if score_ms else None,
                   "topk_row_read_gbs": pairs * 4 * spec.heads.kv / topk_ms / 1e6 if topk_ms else None,
                   "extra_gib": extra, "same_indices_as_first": same, "first_call_s": first_s,
                   "gpu": torch.cuda.get_device_name()}
            tf = f"{row['scores_tflops']:.0f}" if row["scores_tflops"] else "-"
            print(f"T={T:6d} {name:30s} total {ms:8.2f} ms | scores {score_ms:8.2f} ms {tf:>5s} TFLOP/s | "
                  f"top-k {topk_ms:7.2f} ms | extra {extra:.3f} GiB | same {same} | first call {first_s:.1f} s",
                  flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
        del q, k, w, idx, baseline
        torch.cuda.empty_cache()
    mod.CONFIGS = {"default": default}


if __name__ == "__main__":
    main()
