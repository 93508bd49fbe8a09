"""Times the block-outer selection's work-list forms (runtime.selection.WORKLIST_FORMS: "torch", one sort of every
int64 key; "triton", the counting sort of runtime.worklist) on the GPU at Llama-3-8B's selection shapes (B = 1,
8 kv groups, 16 selected blocks of 64 tokens, the first and two local ones forced; docs/selection_order.md,
"Work list"), and checks that both give the same list, bit for bit.

For each T: the forward's list (tile = the plan's sel_kv_bq; with --forced also the list with the forced slots left
out, the plan's forward list since commit dc0b177's timing: plan sel_kv_forced) and the backward's (tile =
sel_kv_split, with the per-segment item ranges): median of CUDA events per form, the speed-up, whether every
output is equal, and the triton form's per-kernel GPU time (torch.profiler).
--packed adds a packed batch of the same total (4 sequences, one empty). --sweep times the triton form's chunk
and tile sizes (runtime.worklist.CHUNK_ENTRIES x TILE_PROGRAMS). --model times model_llama3_8b's whole forward and
forward+backward under the plan (triton list) and the sel_wl_torch variant, with their outputs and gradients
compared.

Usage (GPU): python bench/worklist_bench.py [--T 16384 32768 65536] [--reps 20] [--forced] [--packed] [--sweep]
             [--model] [--json FILE]
A smoke run of the script's own logic on a CPU (Triton's interpreter, wall-clock times, no per-kernel times):
             python bench/worklist_bench.py --device cpu --T 300 --reps 1 --forced --packed
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import specgen
from specgen import reference
from specgen.compile.plan import make_plan
from specgen.compile.variants import load_variant
from specgen.model.spec import load_spec, replace
from specgen.perf.bench import _commit, event_median_ms, kernel_times
from specgen.runtime import selection, worklist
from specgen.runtime.varlen import Layout
from specgen.testing import differentiable_inputs, random_selection

LLAMA = "specs/models/model_llama3_8b.yaml"
FIELDS = ("qpos", "slot", "item_seg", "item_start", "item_end", "n_items", "seg_first_item", "seg_items")


def differing(want, got) -> list[str]:
    """The outputs (FIELDS) that differ between two work lists."""
    bad = []
    for name, a, b in zip(FIELDS, want, got):
        same = a == b if isinstance(a, int) else (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        if not same:
            bad.append(name)
    return bad


def median_ms(fn, reps: int, device: str) -> float:
    if device == "cuda":
        return event_median_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def time_forms(build, reps: int, device: str) -> dict:
    """{form: ms}, the speed-up, the outputs that differ, and the triton form's per-kernel times, for `build(form)`
    (a work list's outputs)."""
    want, got = build("torch"), build("triton")
    row = {"differ": differing(want, got)}
    again = build("triton")
    row["triton_repeatable"] = not differing(got, again)
    for form in selection.WORKLIST_FORMS:
        row[f"{form}_ms"] = median_ms(lambda f=form: build(f), reps, device)
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    if device == "cuda":
        row["triton_kernels_ms"] = {k: round(v, 4) for k, v in
                                    kernel_times(lambda: build("triton"), calls=3, names="all").items()}
    return row


def worklist_rows(T: int, spec, args) -> list[dict]:
    plan, sel = make_plan(spec), spec.selection
    Hkv, K, unit = spec.heads.kv, sel.top_k, sel.block
    dev = args.device
    gen = torch.Generator(dev).manual_seed(T)
    idx = random_selection(1, T, Hkv, K, unit, gen, initial=sel.initial, local=sel.local)
    cases = [("forward", dict(tile_queries=plan.sel_kv_bq)), ("backward", dict(tile_queries=plan.sel_kv_split))]
    if args.forced:
        cases.insert(1, ("forward_forced", dict(tile_queries=plan.sel_kv_bq, skip_forced=(0, sel.initial,
                                                                                         sel.local))))
    rows = []
    for name, kw in cases:
        row = {"T": T, "list": name, "entries": idx.numel(), **time_forms(
            lambda form: selection.kv_order_segments(idx, T, unit=unit, form=form, **kw), args.reps, dev)}
        rows.append(row)
        print(f"T={T:6d} {name:15s} torch {row['torch_ms']:.3f} ms  triton {row['triton_ms']:.3f} ms  "
              f"x{row['speedup']:.1f}  differ={row['differ'] or 'none'}  kernels={row.get('triton_kernels_ms')}",
              flush=True)
    if args.packed:
        lengths = [T // 2 + T // 64, 0, T // 3 - T // 64, T - T // 2 - T // 3]
        parts = [random_selection(1, n, Hkv, K, unit, gen, initial=sel.initial, local=sel.local) for n in lengths if n]
        pidx = torch.cat(parts, dim=1)
        cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
        lay = Layout(cu, max(lengths), T, seq)
        cu_units, _, n_batch_units = lay.units(unit)
        row = {"T": T, "list": "backward_packed", "lengths": lengths, "entries": pidx.numel(), **time_forms(
            lambda form: selection.kv_order_segments_packed(pidx, seq, cu_units, n_batch_units,
                                                            tile_queries=plan.sel_kv_split, form=form),
            args.reps, dev)}
        rows.append(row)
        print(f"T={T:6d} backward_packed torch {row['torch_ms']:.3f} ms  triton {row['triton_ms']:.3f} ms  "
              f"x{row['speedup']:.1f}  differ={row['differ'] or 'none'}", flush=True)
    if args.sweep:
        want = selection.kv_order_segments(idx, T, unit=unit, tile_queries=plan.sel_kv_bq)
        defaults = worklist.CHUNK_ENTRIES, worklist.TILE_PROGRAMS
        for chunk in (256, 512, 1024, 2048):
            for programs in (256, 512, 1024, 2048, 4096):
                worklist.CHUNK_ENTRIES, worklist.TILE_PROGRAMS = chunk, programs
                try:
                    def build():
                        return selection.kv_order_segments(idx, T, unit=unit, tile_queries=plan.sel_kv_bq,
                                                           form="triton")
                    row = {"T": T, "list": "forward_sweep", "chunk_entries": chunk, "tile_programs": programs,
                           "tiles": list(worklist.tiles_for(T, K, Hkv)), "differ": differing(want, build()),
                           "triton_ms": median_ms(build, args.reps, dev)}
                except Exception as e:   # a size the compiler refuses: recorded, the sweep goes on
                    row = {"T": T, "list": "forward_sweep", "chunk_entries": chunk, "tile_programs": programs,
                           "error": repr(e)[:300]}
                rows.append(row)
                print(f"T={T:6d} sweep chunk {chunk:5d} programs {programs:5d}: "
                      f"{row.get('triton_ms', float('nan')):.3f} ms differ={row.get('differ', row.get('error'))}",
                      flush=True)
        worklist.CHUNK_ENTRIES, worklist.TILE_PROGRAMS = defaults
    return rows


def model_rows(T: int, spec, reps: int, dev: str) -> list[dict]:
    """model_llama3_8b's forward and forward+backward with either list (sel_wl_torch's module and the plan's)."""
    mods = {"torch": load_variant(spec, ["sel_wl_torch"]), "triton": specgen.load(spec)}
    gen = torch.Generator(dev).manual_seed(T)
    dtype = mods["torch"].DTYPE
    inputs = reference.make_inputs(spec, 1, T, dtype=dtype, device=dev, generator=gen)
    names = differentiable_inputs(spec)
    dout = torch.randn((1, T, spec.heads.q, spec.head_dim.v), generator=gen, device=dev, dtype=dtype)
    row, results = {"T": T, "list": "model"}, {}
    for form, mod in mods.items():
        fwd, attn = getattr(mod, f"{spec.family}_forward"), getattr(mod, f"{spec.family}_attention")
        leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in inputs.items()}

        def fwd_bwd():
            o = attn(**leaves)
            return torch.autograd.grad(o, [leaves[n] for n in names], dout)

        o = attn(**leaves)
        grads = torch.autograd.grad(o, [leaves[n] for n in names], dout)
        results[form] = {"out": o.detach(), "grads": grads}
        with torch.no_grad():
            row[f"{form}_forward_ms"] = median_ms(lambda: fwd(**inputs), reps, dev)
        row[f"{form}_fwd_bwd_ms"] = median_ms(fwd_bwd, reps, dev)
    row["out_equal"] = torch.equal(results["torch"]["out"], results["triton"]["out"])
    row["grads_equal"] = all(torch.equal(a, b) for a, b in zip(results["torch"]["grads"], results["triton"]["grads"]))
    print(f"T={T:6d} model forward torch {row['torch_forward_ms']:.2f} ms triton {row['triton_forward_ms']:.2f} ms; "
          f"fwd+bwd {row['torch_fwd_bwd_ms']:.2f} / {row['triton_fwd_bwd_ms']:.2f} ms; out equal {row['out_equal']}, "
          f"grads equal {row['grads_equal']}", flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--forced", action="store_true", help="also the list with the forced slots left out")
    ap.add_argument("--packed", action="store_true", help="also a packed batch of the same total")
    ap.add_argument("--sweep", action="store_true", help="the triton form's chunk and tile sizes")
    ap.add_argument("--model", action="store_true", help="model_llama3_8b's forward and fwd+bwd under both forms")
    ap.add_argument("--json", help="append one jsonl record here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of this script")
    args = ap.parse_args()
    spec = load_spec(LLAMA)
    if args.device == "cpu":   # the interpreter: fp32 dots (docs/testing.md), sorts it runs in seconds
        spec = replace(spec, name="model_llama3_8b_cpu", dtype="fp32")
        worklist.CHUNK_ENTRIES = 64
    sel = spec.selection
    rows = []
    for T in args.T:
        rows += worklist_rows(T, spec, args)
        if args.model:
            rows += model_rows(T, spec, max(1, args.reps // 4), args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in rows if r.get("differ") or r.get("out_equal") is False or r.get("grads_equal") is False
           or r.get("triton_repeatable") is False]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    record = {"kind": "worklist_forms", "device": device, "date": time.strftime("%Y-%m-%d"),
              "commit": _commit(), "torch": torch.__version__, "triton": __import__("triton").__version__,
              "spec": spec.name,
              "timing": "median of CUDA events, ms" if args.device == "cuda" else "median wall clock, ms",
              "shapes": {"B": 1, "T": args.T, "heads_kv": spec.heads.kv, "top_k": sel.top_k, "unit": sel.block,
                         "initial": sel.initial, "local": sel.local},
              "defaults": {"chunk_entries": worklist.CHUNK_ENTRIES, "tile_programs": worklist.TILE_PROGRAMS},
              "all_equal": not bad, "rows": rows}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    print("all equal" if not bad else f"DIFFER: {bad}", flush=True)


if __name__ == "__main__":
    main()
