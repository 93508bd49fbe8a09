"""GPU benchmarks of generated kernels against dense causal attention measured in the same run.

Times are medians of `triton.testing.do_bench`; TFLOP/s come from the analysis' FLOP count (specgen.analysis), so
the kernel and its roofline share one model. Each run appends a JSON record to bench/results/ with the device, date,
commit, spec hash, shapes and input regime.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import reference
from .analysis import flops
from .jit import load
from .spec import Spec

RESULTS = Path("bench/results")


@dataclass
class Row:
    T: int
    forward_ms: float
    forward_tflops: float
    extra_peak_gib: float
    dense: dict = field(default_factory=dict)   # backend -> forward ms, or the reason it could not run
    speedup: dict = field(default_factory=dict)  # backend -> dense ms / sparse ms


def _median_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


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


def dense_forward_ms(spec: Spec, T: int, device: str = "cuda") -> dict:
    """Dense causal SDPA on the same shapes: cuDNN (GQA native) and flash (v zero-padded when d_qk != d_v)."""
    return dense_shapes_forward_ms(spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v, T, spec.dtype,
                                   spec.softmax_scale, device)


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
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.dtype]
    hq, hkv, dqk, dv = spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v
    results = {}
    for name, backend, vdim in (("cudnn", SDPBackend.CUDNN_ATTENTION, dv), ("flash", SDPBackend.FLASH_ATTENTION, dqk)):
        q = torch.randn(1, hq, T, dqk, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(1, hkv, T, dqk, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(1, hkv, T, vdim, device=device, dtype=dt, requires_grad=True)
        try:
            with sdpa_kernel(backend):
                def run():
                    out = sdpa(q, k, v, is_causal=True, scale=spec.softmax_scale, enable_gqa=hkv != hq)
                    out.backward(torch.ones_like(out))
                run()
                results[name] = _median_ms(run)
        except Exception as exc:
            results[name] = f"unsupported: {str(exc).splitlines()[0][:120]}"
        del q, k, v
        torch.cuda.empty_cache()
    return results


def bench_training(spec: Spec, seqlens: list[int], *, dense: bool = True) -> list[dict]:
    """Forward+backward through the differentiable entry point: median ms, peak memory, dense in the same run."""
    module = load(spec)
    fn = getattr(module, f"{spec.family}_attention")
    rows = []
    for T in seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        inputs = reference.make_inputs(spec, 1, T, dtype=module.DTYPE, device="cuda", generator=gen)
        for name in ("q", "k", "v", "gates") + tuple(n for n in inputs if n.startswith(("k_", "v_"))):
            if name in inputs:
                inputs[name].requires_grad_(True)

        def run():
            out = fn(**inputs)
            out.backward(torch.ones_like(out))

        run()
        extra = peak_extra_gib(run)
        row = {"T": T, "fwd_bwd_ms": _median_ms(run), "extra_peak_gib": extra}
        del inputs
        torch.cuda.empty_cache()
        if dense:
            row["dense"] = dense_training_ms(spec, T)
            row["speedup"] = {k: v / row["fwd_bwd_ms"] for k, v in row["dense"].items() if isinstance(v, float)}
        rows.append(row)
    return rows


def bench_forward(spec: Spec, seqlens: list[int], *, regime: str = "random", dense: bool = True) -> list[Row]:
    module = load(spec)
    fn = getattr(module, f"{spec.family}_forward")
    rows = []
    for T in seqlens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        inputs = reference.make_inputs(spec, 1, T, dtype=module.DTYPE, device="cuda", generator=gen)
        out = torch.empty((1, T, spec.heads.q, spec.head_dim.v), dtype=module.DTYPE, device="cuda")
        fn(**inputs, out=out)
        extra = peak_extra_gib(lambda: fn(**inputs, out=out))
        ms = _median_ms(lambda: fn(**inputs, out=out))
        row = Row(T=T, forward_ms=ms, forward_tflops=flops(spec, T) / ms / 1e9, extra_peak_gib=extra)
        del inputs, out
        torch.cuda.empty_cache()
        if dense:
            row.dense = dense_forward_ms(spec, T)
            row.speedup = {k: v / ms for k, v in row.dense.items() if isinstance(v, float)}
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def record(spec: Spec, kind: str, rows: list[Row], *, regime: str, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    entry = {
        "kind": kind, "spec": spec.name, "spec_hash": spec.hash, "device": torch.cuda.get_device_name(),
        "date": stamp, "commit": _commit(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "batch": 1, "dtype": spec.dtype, "regime": regime,
        "shapes": {"heads": [spec.heads.q, spec.heads.kv], "head_dim": [spec.head_dim.qk, spec.head_dim.v]},
        "timing": "triton.testing.do_bench median, ms",
        "rows": [r if isinstance(r, dict) else asdict(r) for r in rows],
    }
    path = out_dir / f"{stamp}_{spec.name}_{kind}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


def table(spec: Spec, rows: list[Row]) -> str:
    lines = [f"{spec.name} ({spec.hash}) forward, B=1, {spec.dtype}",
             f"{'T':>7} {'ms':>9} {'TFLOP/s':>8} {'peak+GiB':>9}  dense cudnn / flash ms   speedup"]
    for r in rows:
        d = " / ".join(f"{v:.2f}" if isinstance(v, float) else "n/a" for v in r.dense.values())
        s = " / ".join(f"{v:.2f}x" for v in r.speedup.values())
        lines.append(f"{r.T:>7} {r.forward_ms:>9.3f} {r.forward_tflops:>8.1f} {r.extra_peak_gib:>9.3f}  {d:<22} {s}")
    return "\n".join(lines)


__all__ = ["Row", "bench_forward", "bench_training", "dense_forward_ms", "dense_training_ms", "peak_extra_gib",
           "record", "table"]
