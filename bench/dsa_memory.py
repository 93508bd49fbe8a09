"""Peak GPU memory of DSA's indexer + top-k and of the distillation loss at growing T (must grow linearly), and
the sparse attention forward's time and TFLOP/s.

Usage: python bench/dsa_memory.py SPEC [--seqlens 16384 32768 65536] [--json out.jsonl]
"""

import argparse
import json
import os
import time

import torch
import triton

import specgen
from specgen import reference
from specgen.perf.bench import dense_shapes_forward_ms, peak_extra_gib
from specgen.perf.bench_train import dense_baseline_shapes
from specgen.testing import spec_of


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--distill-dense-max", type=int, default=16384,
                    help="longest T at which the dense-stage loss is timed (beyond it: memory only)")
    ap.add_argument("--no-distill", action="store_true", help="skip the distillation loss")
    ap.add_argument("--json")
    args = ap.parse_args()
    mod = specgen.load(args.spec)
    spec = spec_of(mod)
    rows = []
    for T in args.seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device="cuda", generator=gen)
        idx = torch.empty((1, T, spec.heads.kv, spec.selection.top_k), dtype=torch.int32, device="cuda")
        row = {"T": T}
        select = lambda: mod._select_by_indexer(x["q_idx"], x["k_idx"], x["w_idx"], idx)  # noqa: E731
        select()
        row["indexer_topk_extra_gib"] = peak_extra_gib(select)
        row["indexer_topk_ms"] = triton.testing.do_bench(select, warmup=3, rep=30, return_mode="median")
        fwd = lambda: mod.dsa_forward(**x, indices=idx)  # noqa: E731
        fwd()
        row["sparse_attention_ms"] = triton.testing.do_bench(fwd, warmup=3, rep=30, return_mode="median")
        k = spec.selection.top_k
        attended = sum(min(t + 1, k) for t in range(T))
        row["sparse_attention_tflops"] = (attended * spec.heads.q * (spec.head_dim.qk + spec.head_dim.v) * 2
                                          / row["sparse_attention_ms"] / 1e9)
        # Dense SDPA on this machine, same run: on the spec's own shapes (every backend refuses MLA's 576-dim
        # heads so far; said in the record), and, MLA, on the unabsorbed MHA prefill the model would run densely
        # (spec.unabsorbed; V3.2: 128 heads, d_qk 192, d_v 128). TFLOP/s counts the causal half: T(T+1)/2 pairs.
        pairs = T * (T + 1) / 2
        own = dense_shapes_forward_ms(spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v, T, spec.dtype,
                                      spec.softmax_scale, backends=("cudnn", "flash", "efficient"))
        row["dense_sdpa_same_shapes_ms"] = own
        if spec.mla and spec.unabsorbed is not None:
            base = dense_baseline_shapes(spec)
            (hq, hkv), (dqk, dv) = base["heads"], base["head_dim"]
            mha = dense_shapes_forward_ms(hq, hkv, dqk, dv, T, spec.dtype, base["scale"])
            row[f"dense_sdpa_mha_{dqk}_{dv}_ms"] = mha
            row[f"dense_sdpa_mha_{dqk}_{dv}_tflops"] = {
                k: pairs * hq * (dqk + dv) * 2 / v / 1e9 for k, v in mha.items() if isinstance(v, float)}
        if hasattr(mod, "distill_loss") and not args.no_distill:
            trained = {n: x[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx", "w_idx")}
            for stage, indices in (("sparse", idx), ("dense", None)):
                run = lambda: mod.distill_loss(x["q"], x["k"], **trained, indices=indices,  # noqa: E731
                                               stage=stage).backward()
                try:
                    row[f"distill_{stage}_extra_gib"] = peak_extra_gib(run)
                except Exception as exc:  # e.g. a kernel that does not fit this GPU: a result to record
                    row[f"distill_{stage}"] = f"failed: {str(exc).splitlines()[0][:160]}"
                    continue
                # The dense stage is quadratic: beyond --distill-dense-max only its memory is measured (one run).
                if stage == "sparse" or T <= args.distill_dense_max:
                    row[f"distill_{stage}_fwd_bwd_ms"] = triton.testing.do_bench(run, warmup=1, rep=20,
                                                                                 return_mode="median")
        print(json.dumps(row), flush=True)
        rows.append(row)
        del x, idx
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"kind": "dsa_memory", "spec": spec.name, "spec_hash": spec.hash,
                                "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                "commit": os.environ.get("SPECGEN_COMMIT", "unknown"), "batch": 1,
                                "regime": "random (specgen.reference.make_inputs)",
                                "flops": "sparse attention: sum_t min(t+1,k) * Hq * (d_qk + d_v) * 2",
                                "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
