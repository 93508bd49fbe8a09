"""Peak memory of the DSA training step, piece by piece (docs/backward.md, "Memory"), with today's buffers and with
the former ones (runtime.launches.DQ_IN_DTYPE and OUT_IS_BRANCH_OUTPUT off: the fp32 dQ accumulator and its cast,
the saved copy of the output), optionally in torch's deterministic mode, and whether the step fits the GPU.

The step is `specgen bench --training-step`'s (specgen/perf/bench_train.py), run once per mode and length:
indexer + top-k, sparse attention forward, its backward, the sparse-stage distillation forward + backward. For
each piece: the peak allocated while it runs beyond what was allocated before it, what it leaves allocated, and the
tensors autograd saved (saved_tensors_hooks). For the step: its peak beyond the inputs, the outputs and gradients
it returns, the difference (issue 17's "beyond inputs, outputs and gradients", target <= 8 GB), the absolute peak
(allocated and reserved) against the GPU's memory. At lengths up to --bitwise-max, the output and dQ of the two
modes now and former are compared bit for bit (dK: relative error, the scatter path's atomics sum in run-dependent
order), and the deterministic mode's by relative error.

Usage: python bench/dsa_step_memory.py SPEC [--seqlens 65536 32768] [--modes now former det] [--json out.jsonl]
Without a GPU (a smoke test under the interpreter, tiny T) the memory readings are zeros.
"""

import argparse
import json
import os
import time

import torch

import specgen
from specgen import runtime, testing
from specgen.perf.bench_train import step_inputs
from specgen.testing import spec_of

GIB = 2**30
# mode -> (former buffers, deterministic algorithms)
MODES = {"now": (False, False), "former": (True, False), "det": (False, True)}


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Meter:
    """torch.cuda's allocator statistics (zeros on a CPU)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        self.sync()
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def reserved_peak(self) -> int:
        return torch.cuda.max_memory_reserved() if self.cuda else 0


def set_mode(former: bool) -> None:
    runtime.launches.DQ_IN_DTYPE = not former
    runtime.launches.OUT_IS_BRANCH_OUTPUT = not former


def run_step(mod, spec, T: int, device: str, meter: Meter, former: bool) -> tuple[dict, dict]:
    """One training step in pieces; (the row, {name: tensor} of what the bitwise comparison reads)."""
    set_mode(former)
    x, main, fixed, idx_in, dout = step_inputs(spec, mod, T, device)   # the same tensors as bench_train's step
    attention = getattr(mod, f"{spec.family}_attention")
    row = {"T": T, "mode": "former" if former else "now", "inputs_gib": _bytes(*x.values(), dout) / GIB}
    base = meter.allocated()
    meter.reset()
    peaks = []

    def piece(name, fn):
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), str(t.dtype).replace("torch.", ""), round(_bytes(t) / GIB, 4)))
            return t

        before = meter.allocated()
        meter.reset()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
        peak = meter.peak()
        peaks.append(peak)
        row[name] = {"peak_extra_gib": (peak - before) / GIB, "held_after_gib": (meter.allocated() - before) / GIB,
                     "peak_total_gib": peak / GIB}
        if saved:
            row[name]["autograd_saved"] = saved
        return result

    def topk():
        with torch.no_grad():
            return mod.index_topk(*fixed.values())

    sel = piece("indexer_topk", topk)
    o, lse = piece("attention_forward", lambda: attention(**main, **fixed, indices=sel, return_lse=True))
    grads = piece("attention_backward", lambda: torch.autograd.grad(o, tuple(main.values()), dout))

    def distill():
        loss = mod.distill_loss(main["q"].detach(), main["k"].detach(), *idx_in.values(), indices=sel,
                                lse_main=lse[..., 0].detach(), stage="sparse")
        return torch.autograd.grad(loss, tuple(idx_in.values()))

    idx_grads = piece("distill_sparse_fwd_bwd", distill) if hasattr(mod, "distill_loss") else ()
    outputs_and_grads = _bytes(o, lse, sel, *grads, *idx_grads)
    top = max(peaks)
    row["step"] = {
        "peak_total_gib": top / GIB,
        "peak_reserved_gib": meter.reserved_peak() / GIB,
        "peak_beyond_inputs_gib": (top - base) / GIB,
        "outputs_and_grads_gib": outputs_and_grads / GIB,
        "beyond_inputs_outputs_grads_gib": (top - base - outputs_and_grads) / GIB,
        # bench_train's count (dout, the inputs' sizes standing in for the output and gradients)
        "bench_train_beyond_gib": (top - base - _bytes(dout, *main.values(), *idx_in.values())) / GIB,
    }
    if meter.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        row["step"]["device_total_gib"] = total / GIB
        row["step"]["fits"] = meter.reserved_peak() <= total
        row["step"]["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    keep = {"out": o.detach(), "dq": grads[0], "dk": grads[1]}
    return row, keep


PIECES = ("indexer_topk", "attention_forward", "attention_backward", "distill_sparse_fwd_bwd")


def summary(row: dict) -> str:
    """One row as lines of text (GiB)."""
    head = f"T={row['T']} {row['mode']}"
    if "out_of_memory" in row:
        return f"{head}: out of memory ({row['max_allocated_gib']:.1f} GiB allocated at most)"
    st = row["step"]
    lines = [f"{head}: step peak {st['peak_total_gib']:.2f} allocated / {st['peak_reserved_gib']:.2f} reserved"
             + (f" of {st['device_total_gib']:.1f} (fits: {st['fits']})" if "fits" in st else "")
             + f"; beyond inputs ({row['inputs_gib']:.2f}) {st['peak_beyond_inputs_gib']:.2f}, outputs + gradients "
             f"{st['outputs_and_grads_gib']:.2f}, beyond all three {st['beyond_inputs_outputs_grads_gib']:.2f}"]
    for name in PIECES:
        if name in row:
            r = row[name]
            lines.append(f"    {name:<24} peak +{r['peak_extra_gib']:.2f}, holds +{r['held_after_gib']:.2f} after")
    for key in ("same_bits_as_now", "rel_err_vs_now"):
        if key in row:
            lines.append(f"    {key}: {row[key]}")
    return "\n".join(lines)


def compare(got: dict, ref: dict, chunk: int = 1 << 26) -> tuple[dict, dict]:
    """Bit-for-bit equality and relative error (Frobenius) of each tensor of `got` (on the device) against `ref`'s
    copy on the host, chunk by chunk on the device (a 32k dQ is 2.4 G elements)."""
    same, err = {}, {}
    for name, a in got.items():
        a, b = a.reshape(-1), ref[name].reshape(-1)
        equal, num, den = True, 0.0, 0.0
        for i in range(0, a.numel(), chunk):
            x, y = a[i:i + chunk], b[i:i + chunk].to(a.device)
            equal = equal and torch.equal(x, y)
            num += (x.double() - y.double()).square().sum().item()
            den += y.double().square().sum().item()
        same[name], err[name] = equal, (num / den) ** 0.5 if den > 0 else num ** 0.5
    return same, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[65536, 32768])
    ap.add_argument("--modes", nargs="+", default=["now", "former"], choices=list(MODES),
                    help="now: today's buffers; former: the fp32 dQ accumulator and the output's copy; det: today's "
                         "under torch.use_deterministic_algorithms (the inverse-index kernels, the legacy "
                         "distillation backward)")
    ap.add_argument("--warmup-T", type=int, default=4096, help="each mode compiles its kernels at this length first")
    ap.add_argument("--bitwise-max", type=int, default=32768,
                    help="longest T whose output and dQ are compared between the modes now and former")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mod = specgen.load(args.spec)
    spec = spec_of(mod)
    meter = Meter(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(json.dumps({"spec": spec.name, "device": name, "modes": args.modes, "seqlens": args.seqlens}), flush=True)
    rows, reference_run = [], {}
    for mode in args.modes:
        former, deterministic = MODES[mode]
        with testing.deterministic_algorithms(deterministic):
            t0 = time.time()
            run_step(mod, spec, args.warmup_T, device, Meter("cpu"), former)
            print(json.dumps({"mode": mode, "warmup_s": round(time.time() - t0, 1)}), flush=True)
            for T in args.seqlens:
                t1 = time.time()
                try:
                    row, keep = run_step(mod, spec, T, device, meter, former)
                except torch.cuda.OutOfMemoryError as exc:
                    row, keep = {"T": T, "mode": mode, "out_of_memory": str(exc).splitlines()[0][:200],
                                 "max_allocated_gib": meter.peak() / GIB}, None
                row["mode"], row["s"] = mode, round(time.time() - t1, 1)
                if keep is not None and T <= args.bitwise_max:
                    if mode == "now":
                        reference_run[T] = {k: v.cpu() for k, v in keep.items()}
                    elif T in reference_run:
                        same, err = compare(keep, reference_run[T])
                        if mode == "former":
                            row["same_bits_as_now"] = {k: same[k] for k in ("out", "dq")}
                        row["rel_err_vs_now"] = err
                del keep
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                print(summary(row), flush=True)
                rows.append(row)
    set_mode(False)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"kind": "dsa_step_memory", "spec": spec.name, "spec_hash": spec.hash,
                                "device": name, "date": time.strftime("%Y-%m-%d"), "batch": 1,
                                "commit": os.environ.get("SPECGEN_COMMIT", "unknown"), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
