"""GPU benchmarks of generated kernels against dense causal attention measured in the same run.

Times are medians of `triton.testing.do_bench`; TFLOP/s come from the analysis' FLOP count (specgen.compile.analysis), so
the kernel and its roofline share one model. Each run appends a JSON record to bench/results/ with the device, date,
commit, spec hash, shapes and input regime.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import reference
from ..compile.branches import kernel_names
from ..compile.analysis import BACKWARD_FLOP_FACTOR, analyse, backward_bytes, evaluate, flops, forward_bytes
from ..compile.jit import load
from ..model.signature import differentiable_names
from ..model.spec import Spec

RESULTS = Path("bench/results")


def _median_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def event_median_ms(fn, reps: int) -> float:
    """Median of `reps` CUDA-event timings of `fn` after one warm-up call: for steps too slow for do_bench's
    estimate-then-repeat (a DSA backward of seconds) or where the caller fixes the repetitions."""
    import statistics

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_gib(fn) -> float:
    """Peak memory allocated while `fn` runs, beyond what was allocated before it (GiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _commit() -> str:
    # The device machine gets a copy of the working tree without .git: the caller passes the commit in.
    if os.environ.get("SPECGEN_COMMIT"):
        return os.environ["SPECGEN_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def dense_forward_ms(spec: Spec, T: int, device: str = "cuda", backends=("cudnn", "flash")) -> dict:
    """Dense causal SDPA on the same shapes: cuDNN (GQA native) and flash (v zero-padded when d_qk != d_v), or the
    named `backends` alone."""
    return dense_shapes_forward_ms(spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v, T, spec.dtype,
                                   spec.softmax_scale, device, backends)


def dense_shapes_forward_ms(hq: int, hkv: int, dqk: int, dv: int, T: int, dtype: str, scale: float,
                            device: str = "cuda", backends=("cudnn", "flash")) -> dict:
    """Dense causal SDPA forward medians (ms) per backend at the given shapes; a refusal is reported as a string."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    q = torch.randn(1, hq, T, dqk, device=device, dtype=dt)
    k = torch.randn(1, hkv, T, dqk, device=device, dtype=dt)
    v = torch.randn(1, hkv, T, dv, device=device, dtype=dt)
    padded = v if dv == dqk else torch.nn.functional.pad(v, (0, dqk - dv))
    choices = {"cudnn": (SDPBackend.CUDNN_ATTENTION, v), "flash": (SDPBackend.FLASH_ATTENTION, padded),
               "efficient": (SDPBackend.EFFICIENT_ATTENTION, v)}
    results = {}
    for name in backends:
        backend, vv = choices[name]
        try:
            with sdpa_kernel(backend):
                def run():
                    return sdpa(q, k, vv, is_causal=True, scale=scale, enable_gqa=hkv != hq)
                run()
                results[name] = _median_ms(run)
        except Exception as exc:  # a backend refusing these shapes is a result to report, not a failure
            results[name] = f"unsupported: {str(exc).splitlines()[0][:120]}"
    return results


def dense_training_ms(spec: Spec, T: int, device: str = "cuda") -> dict:
    """Dense causal SDPA forward+backward on the same shapes (cuDNN; flash with v zero-padded)."""
    return dense_shapes_training_ms(spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v, T, spec.dtype,
                                    spec.softmax_scale, device)


def dense_shapes_training_ms(hq: int, hkv: int, dqk: int, dv: int, T: int, dtype: str, scale: float,
                             device: str = "cuda") -> dict:
    """Dense causal SDPA forward+backward medians (ms) at the given shapes: cuDNN, and flash with v zero-padded to
    d_qk; a refusal is reported as a string."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    results = {}
    for name, backend, vdim in (("cudnn", SDPBackend.CUDNN_ATTENTION, dv), ("flash", SDPBackend.FLASH_ATTENTION, dqk)):
        q = torch.randn(1, hq, T, dqk, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(1, hkv, T, dqk, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(1, hkv, T, vdim, device=device, dtype=dt, requires_grad=True)
        try:
            with sdpa_kernel(backend):
                def run():
                    out = sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=hkv != hq)
                    out.backward(torch.ones_like(out))
                run()
                results[name] = _median_ms(run)
        except Exception as exc:
            results[name] = f"unsupported: {str(exc).splitlines()[0][:120]}"
        del q, k, v
        torch.cuda.empty_cache()
    return results


def copy_bandwidth_gbps(nbytes: int = 2**30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s) of a `nbytes` buffer."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x))
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def machine_peaks(device: str = "cuda") -> dict:
    """The two ceilings measured on this machine in this run: the dense bf16 matrix peak (TFLOP/s, an 8192^3
    matmul) and the device-to-device copy bandwidth (GB/s, bytes read + written)."""

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    del a, b
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": copy_bandwidth_gbps(device=device)}


def _leaves(spec: Spec, inputs: dict) -> list[str]:

    return differentiable_names(spec)  # the indexer's inputs get no gradient


# Kernels whose time the per-kernel profile reports against the analysis branch whose FLOPs they do (the backward's
# kernels of a branch share its backward FLOPs): the branch registry's names (specgen.compile.branches).
ATTENTION_KERNELS = kernel_names()


def kernel_times(fn, calls: int = 3, names=None, warmup: bool = True) -> dict[str, float]:
    """Per-kernel GPU time (ms per call, all launches of a kernel summed) of `fn` from torch.profiler, averaged over
    `calls` calls, for the kernels in `names` (default: the attention kernels; "all": every GPU kernel), after one
    warm-up call unless `warmup` is False (a step of seconds that is already warm)."""
    names = ATTENTION_KERNELS if names is None else names
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if total and (names == "all" and evt.device_type == torch.autograd.DeviceType.CUDA or evt.key in names):
            out[evt.key] = total / 1000.0 / calls
    return out


def compiler_report(module) -> dict[str, list[dict]]:
    """What the compiler made of each kernel the module ran (attention, scoring, pooling, merges): registers per
    thread, spills, shared memory (bytes), warps and stages of every compiled variant (Triton's loaded binaries; GPU
    only)."""
    out: dict[str, list[dict]] = {}
    for name in sorted(n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")):
        fn = getattr(module, name, None)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        for cache in caches.values():
            for compiled in cache[0].values():
                compiled = compiled.result() if hasattr(compiled, "result") else compiled
                if getattr(compiled, "n_regs", None) is None:
                    continue
                meta = compiled.metadata
                out.setdefault(name, []).append({"registers": compiled.n_regs, "spills": compiled.n_spills,
                                                 "shared_bytes": meta.shared, "num_warps": meta.num_warps,
                                                 "num_stages": meta.num_stages})
    return out


def _per_kernel(spec: Spec, T: int, times: dict, peak_tflops: float) -> dict:
    out = {}
    branch_flops = {b.name: evaluate(b.flops, T) for b in analyse(spec).branches}
    for name, ms in sorted(times.items()):
        if name not in ATTENTION_KERNELS:  # scoring, pooling, merges, sorts, copies: time only
            out[name] = {"ms": ms, "branch": None, "pass": None}
            continue
        branch, pass_ = ATTENTION_KERNELS[name]
        f = branch_flops.get(branch, 0.0) * (1.0 if pass_ == "forward" else BACKWARD_FLOP_FACTOR)
        entry = {"ms": ms, "branch": branch, "pass": pass_}
        if pass_ == "forward":  # the backward's FLOPs are split between dq and dK/dV kernels: no per-kernel rate
            entry["tflops"] = f / ms / 1e9
            entry["fraction_of_peak"] = entry["tflops"] / peak_tflops
        out[name] = entry
    return out


def bench_passes(spec: Spec, seqlens: list[int], *, backward: bool = True, dense: bool = True,
                 per_kernel: bool = True, machine: dict | None = None,
                 spec_path: Path | None = None) -> tuple[dict, list[dict]]:
    """Forward, backward and forward+backward medians at B=1 with ms, TFLOP/s (analysis FLOPs; the backward at
    FlashAttention's 2.5x convention), achieved bandwidth (analysis bytes), the fraction of the matrix peak measured
    in the same run, per-kernel times, and dense causal SDPA (cuDNN and flash) on the same shapes in the same run.
    Returns (machine ceilings, rows)."""
    machine = machine or machine_peaks()
    peak = machine["matmul_tflops"]
    module = load(spec, spec_path)  # the path locates the spec's tuning record
    fwd = getattr(module, f"{spec.family}_forward")
    attn = getattr(module, f"{spec.family}_attention")
    rows = []
    for T in seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        inputs = reference.make_inputs(spec, 1, T, dtype=module.DTYPE, device="cuda", generator=gen)
        out = torch.full((1, T, spec.heads.q, spec.head_dim.v), float("nan"), dtype=module.DTYPE, device="cuda")
        fwd(**inputs, out=out)
        assert torch.isfinite(out).all(), f"{spec.name} T={T}: the forward left non-finite outputs"
        extra = peak_extra_gib(lambda: fwd(**inputs, out=out))
        ms = _median_ms(lambda: fwd(**inputs, out=out))
        f_flops, f_bytes = flops(spec, T), forward_bytes(spec, T)
        row = {"T": T, "forward_ms": ms, "forward_tflops": f_flops / ms / 1e9, "forward_gbps": f_bytes / ms / 1e6,
               "forward_fraction_of_peak": f_flops / ms / 1e9 / peak, "extra_peak_gib": extra}
        times = kernel_times(lambda: fwd(**inputs, out=out), names="all") if per_kernel else {}
        del out
        if backward:
            for n in _leaves(spec, inputs):
                inputs[n].requires_grad_(True)
            leaves = [inputs[n] for n in _leaves(spec, inputs)]
            result = attn(**inputs)
            grad = torch.randn_like(result)

            def bwd():
                return torch.autograd.grad(result, leaves, grad, retain_graph=True)

            def fwd_bwd():
                o = attn(**inputs)
                return torch.autograd.grad(o, leaves, grad)

            bwd()
            b_ms, fb_ms = _median_ms(bwd), _median_ms(fwd_bwd)
            b_flops = flops(spec, T, "backward")
            row.update(backward_ms=b_ms, backward_tflops=b_flops / b_ms / 1e9,
                       backward_gbps=backward_bytes(spec, T) / b_ms / 1e6,
                       backward_fraction_of_peak=b_flops / b_ms / 1e9 / peak, fwd_bwd_ms=fb_ms,
                       fwd_bwd_tflops=(f_flops + b_flops) / fb_ms / 1e9)
            if per_kernel:
                # Kernels that are not the backward's own (pooling, elementwise) are named apart from the forward's.
                times.update({k if k in ATTENTION_KERNELS else f"backward: {k}": v
                              for k, v in kernel_times(bwd, names="all").items()})
            del result, grad, leaves
        row["kernels"] = _per_kernel(spec, T, times, peak)
        row["tuned_for_this_gpu"] = torch.cuda.get_device_name() in module.CONFIGS
        del inputs
        torch.cuda.empty_cache()
        if dense:
            row["dense"] = dense_forward_ms(spec, T)
            row["speedup"] = {k: v / ms for k, v in row["dense"].items() if isinstance(v, float)}
            if backward:
                row["dense_fwd_bwd"] = dense_training_ms(spec, T)
                row["dense_backward"] = {k: v - row["dense"][k] for k, v in row["dense_fwd_bwd"].items()
                                         if isinstance(v, float) and isinstance(row["dense"].get(k), float)}
                row["speedup_backward"] = {k: v / row["backward_ms"] for k, v in row["dense_backward"].items()}
                row["speedup_fwd_bwd"] = {k: v / row["fwd_bwd_ms"] for k, v in row["dense_fwd_bwd"].items()
                                          if isinstance(v, float)}
            torch.cuda.empty_cache()
        rows.append(row)
    if rows and per_kernel:
        rows[-1]["compiler"] = compiler_report(module)
    return machine, rows


def record(spec: Spec, kind: str, rows: list, *, regime: str, out_dir: Path = RESULTS,
           machine: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    entry = {
        "kind": kind, "spec": spec.name, "spec_hash": spec.hash, "device": torch.cuda.get_device_name(),
        "date": stamp, "commit": _commit(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "batch": 1, "dtype": spec.dtype, "regime": regime,
        "shapes": {"heads": [spec.heads.q, spec.heads.kv], "head_dim": [spec.head_dim.qk, spec.head_dim.v]},
        "timing": "triton.testing.do_bench median, ms",
        **({"machine": machine} if machine else {}),
        "rows": [r if isinstance(r, dict) else asdict(r) for r in rows],
    }
    path = out_dir / f"{stamp}_{spec.name}_{kind}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


def _ratio(d: dict) -> str:
    return " / ".join(f"{v:.2f}x" for v in d.values()) or "n/a"


def table(spec: Spec, machine: dict, rows: list[dict]) -> str:
    lines = [f"{spec.name} ({spec.hash}), B=1, {spec.dtype}; measured ceilings: {machine['matmul_tflops']:.0f} "
             f"TFLOP/s bf16 matmul, {machine['copy_gbps']:.0f} GB/s copy",
             f"{'T':>7} {'pass':>8} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'GB/s':>7}  speedup vs cuDNN / flash"]
    for r in rows:
        passes = [("forward", r.get("speedup", {}))]
        if "backward_ms" in r:
            passes += [("backward", r.get("speedup_backward", {})), ("fwd_bwd", r.get("speedup_fwd_bwd", {}))]
        for name, speed in passes:
            tf = r.get(f"{name}_tflops")
            frac = r.get(f"{name}_fraction_of_peak")
            gbps = r.get(f"{name}_gbps")
            lines.append(f"{r['T']:>7} {name:>8} {r[f'{name}_ms']:>9.3f} {tf or 0:>8.1f} "
                         f"{'' if frac is None else f'{100 * frac:.1f}':>7} {'' if gbps is None else f'{gbps:.0f}':>7}"
                         f"  {_ratio(speed)}")
        for kname, k in r.get("kernels", {}).items():
            rate = f"{k['tflops']:.0f} TFLOP/s, {100 * k['fraction_of_peak']:.1f}% of peak" if "tflops" in k else ""
            built = "; ".join(f"{c['registers']} regs, {c['spills']} spills, {c['shared_bytes'] // 1024} KiB smem, "
                              f"{c['num_warps']}w{c['num_stages']}s" for c in r.get("compiler", {}).get(kname, []))
            lines.append(f"{'':>7}   {kname}: {k['ms']:.3f} ms {rate}{'  [' + built + ']' if built else ''}")
    return "\n".join(lines)


__all__ = ["bench_passes", "compiler_report", "event_median_ms", "dense_forward_ms", "dense_shapes_training_ms", "dense_training_ms", "kernel_times", "machine_peaks",
           "peak_extra_gib", "record", "table"]
