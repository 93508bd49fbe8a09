"""Chunked prefill into a paged cache against one prefill of the whole prompt (issue 18, item 2).

For each spec: a prompt of T tokens (default 65536, batch 1) written into a paged cache
  - at once: `cache.prefill(**per_token)` then `<family>_forward(...)` over the whole prompt (what a single prefill
    costs: the cache's pooling and stores, then the packed forward);
  - in chunks of C tokens (default 8192): `<family>_prefill(q_chunk, cache, **chunk)` per chunk, each appending the
    chunk (stores, pooled blocks, index keys) and attending to the cache and the chunk (the paged cache's keys
    read in place, or with --gather its pages gathered once per chunk into a packed key buffer: docs/varlen.md).
Median of REPS CUDA-event timings each (one warm-up), the chunked/single ratio (issue 18's target: <= 1.15), each
chunk's time, the peak memory beyond the inputs, the bytes the key gathers move, and the chunked outputs' relative
difference from the single forward's. JSON rows with device, date, commit and shapes.

Each chunk's time (`chunk_ms`, CUDA events, the stream synchronised after each chunk) starts before the call's host
work, so it is host time plus what the GPU runs after it; `chunk_host_ms` is the call's host time alone (wall time
of the call, which queues its work without synchronising): a chunk whose host time is near its event time is
host-bound, and the pipelined total (`chunked_ms`, no synchronisation between chunks) hides host time only behind
the previous chunk's GPU work.

The cache's block table is the default one (each sequence's pages in pool order), so a chunk reads the paged keys
in place (runtime.prefill.KEY_READ "auto"; `key_gather_gb` 0); `--gather` gathers them as for any other table
(`key_gather_gb`: the bytes the gathers moved over the prompt, read + write, as the runtime counts them).

Usage: python bench/prefill_cost.py SPEC... [--tokens 65536] [--chunk 8192] [--reps 3] [--gather] [--json out.jsonl]
"""

import argparse
import json
import time

import torch

import specgen
from specgen import reference
from specgen.runtime import prefill as prefill_runtime
from specgen.perf.bench import _commit, event_median_ms, peak_extra_gib
from specgen.testing import spec_of

PER_QUERY = ("q", "gates", "q_idx", "w_idx")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gather", action="store_true", help="gather the paged keys (KEY_READ='gather'), as for a "
                    "block table whose pages are not in pool order")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one chunked prefill")
    args = ap.parse_args()
    T, C = args.tokens, args.chunk
    prefill_runtime.KEY_READ = "gather" if args.gather else "auto"
    for path in args.specs:
        mod = specgen.load(path)
        spec = spec_of(mod)
        fam = spec.family
        Cache, prefill, forward = (getattr(mod, f"{fam.upper()}Cache"), getattr(mod, f"{fam}_prefill"),
                                   getattr(mod, f"{fam}_forward"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda", generator=gen)
        names = list(mod.CACHE_TENSORS)
        for n, dim in mod.CACHE_TENSORS.items():
            if n not in inputs:
                inputs[n] = torch.randn(1, T, spec.heads.kv, dim, device="cuda", generator=gen).to(mod.DTYPE)
        page = spec.decode.page_size
        pool = {k: v for k, v in inputs.items() if k.startswith(("w_pool", "pe_pool"))}
        one = Cache(1, num_pages=-(-T // page), device="cuda", **pool)
        chunked = Cache(1, num_pages=-(-T // page), device="cuda", **pool)
        fwd_args = {k: v for k, v in inputs.items() if k in mod._DESC.arg_names}
        result = {}

        def single():
            one.prefill(**{n: inputs[n] for n in names})
            result["single"] = forward(**fwd_args)

        chunk_ms, chunk_host_ms = [], []

        def in_chunks(timed=False):
            chunked.host_seqlens = [0]
            chunked.seqlens.zero_()
            outs = []
            for c0 in range(0, T, C):
                kw = {n: inputs[n][:, c0:c0 + C] for n in names + [p for p in PER_QUERY if p in inputs]}
                if timed:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0 = time.perf_counter()
                outs.append(prefill(kw.pop("q"), chunked, **kw))
                if timed:
                    chunk_host_ms.append((time.perf_counter() - t0) * 1e3)
                    end.record()
                    torch.cuda.synchronize()
                    chunk_ms.append(start.elapsed_time(end))
            result["chunked"] = outs

        row = {"kind": "prefill_cost", "spec": spec.name, "spec_hash": spec.hash, "tokens": T, "chunk": C,
               "batch": 1, "cache": f"paged, {page}-token pages", "dtype": spec.dtype,
               "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
               "single": "cache.prefill + one forward of the whole prompt",
               "chunked": f"{fam}_prefill per chunk (append + attention to cache and chunk)",
               "key_read": prefill_runtime.KEY_READ}
        row["single_ms"] = event_median_ms(single, args.reps)
        row["single_extra_gib"] = peak_extra_gib(single)
        row["chunked_ms"] = event_median_ms(in_chunks, args.reps)
        row["chunked_extra_gib"] = peak_extra_gib(in_chunks)
        row["chunked_vs_single"] = row["chunked_ms"] / row["single_ms"]
        gathered = prefill_runtime.GATHERED["bytes"]
        in_chunks(timed=True)
        row["key_gather_gb"] = (prefill_runtime.GATHERED["bytes"] - gathered) / 1e9   # read + write, one prompt
        row["chunk_ms"] = [round(x, 3) for x in chunk_ms]
        row["chunk_host_ms"] = [round(x, 3) for x in chunk_host_ms]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                in_chunks()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        # The last chunk's rows (a 64k x 128 x 512 fp32 copy would not fit beside the inputs).
        got, want = result["chunked"][-1][0].float(), result["single"][0, T - C:].float()
        row["last_chunk_vs_single_rel_diff"] = ((got - want).norm() / want.norm()).item()
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del inputs, one, chunked, result
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
