"""`specgen tune`: measure launch configs on the GPU and record the winners beside the spec.

Candidates come from `tuning.candidates` (key tiles, warps, pipeline stages around the plan's row packing), pruned
by the footprint model (`footprint.launch_model`, shared memory and accumulator registers against Hopper's limits)
before anything is compiled. The search is coordinate descent over kernels, in two phases: the forward kernels
timed inside the whole forward, then the backward kernels timed inside forward+backward through the autograd entry
(so interactions through L2 are seen), each kernel's candidates with the others at their current best; medians of
`triton.testing.do_bench`. A candidate the compiler rejects is skipped and said.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import reference
from .plan import make_plan, next_pow2
from .render import render_module
from .spec import Spec
from .tuning import candidates, configs_for, default_configs, save_entry, tunable_kernels

# Below this, a difference between two medians is noise.
IMPROVEMENT = 0.98


def _module_with(spec: Spec, configs: dict, folder: Path):
    from .jit import import_path

    gpu = torch.cuda.get_device_name()
    text = render_module(spec, [{"spec_hash": spec.hash, "gpu": gpu, "triton": "", "date": "", "configs": configs}])
    path = folder / f"{spec.name}_tuning.py"
    path.write_text(text)
    return import_path(path, f"specgen_tuning.{spec.name}_{time.monotonic_ns()}")


def _inputs(spec: Spec, seqlen: int, grad: bool) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.dtype]
    inputs = reference.make_inputs(spec, 1, seqlen, dtype=dtype, device="cuda",
                                   generator=torch.Generator(device="cuda").manual_seed(seqlen))
    if grad:
        for name in ("q", "k", "v", "gates") + tuple(n for n in inputs if n.startswith(("k_", "v_"))):
            if name in inputs:
                inputs[name].requires_grad_(True)
    return inputs


def _descend(kernels: list[str], plan, best: dict, measure, log) -> tuple[dict, float, float]:
    base = current = measure(best)
    for kind in kernels:
        pool = [{"num_warps": w} for w in (4, 8)] if kind == "select" else candidates(plan, kind)
        for cfg in pool:
            if cfg == best[kind]:
                continue
            trial = {**best, kind: cfg}
            try:
                ms = measure(trial)
            except Exception as exc:  # a config the compiler rejects (resources) is skipped, and said
                log(f"  {kind} {cfg}: failed ({str(exc).splitlines()[0][:80]})")
                continue
            better = ms < IMPROVEMENT * current
            log(f"  {kind} {cfg}: {ms:.3f} ms{' (better)' if better else ''}")
            if better:
                best, current = trial, ms
    return best, base, current


def tune(spec: Spec, spec_path: Path, seqlen: int, folder: Path, log=print, backward: bool = True) -> dict:
    import triton

    folder.mkdir(parents=True, exist_ok=True)
    plan = make_plan(spec)
    best = default_configs(plan)
    tunable = tunable_kernels(spec)
    forward_kernels = [k for k in ("select",) + tunable if k in best and not k.endswith(("_dq", "_dkdv"))]
    backward_kernels = [k for k in tunable if k.endswith(("_dq", "_dkdv"))]

    inputs = _inputs(spec, seqlen, grad=False)

    def measure_forward(configs) -> float:
        fn = getattr(_module_with(spec, configs, folder), f"{spec.family}_forward")
        fn(**inputs)
        return triton.testing.do_bench(lambda: fn(**inputs), warmup=5, rep=30, return_mode="median")

    best, fwd_base, fwd_tuned = _descend(forward_kernels, plan, best, measure_forward, log)
    log(f"{spec.name} T={seqlen}: forward {fwd_base:.3f} -> {fwd_tuned:.3f} ms")
    measured = {"default": fwd_base, "tuned": fwd_tuned}
    del inputs
    if backward and backward_kernels:
        inputs = _inputs(spec, seqlen, grad=True)

        def measure_training(configs) -> float:
            fn = getattr(_module_with(spec, configs, folder), f"{spec.family}_attention")

            def run():
                out = fn(**inputs)
                out.backward(torch.ones_like(out))
            run()
            return triton.testing.do_bench(run, warmup=5, rep=30, return_mode="median")

        best, bwd_base, bwd_tuned = _descend(backward_kernels, plan, best, measure_training, log)
        log(f"{spec.name} T={seqlen}: forward+backward {bwd_base:.3f} -> {bwd_tuned:.3f} ms")
        measured.update(fwd_bwd_default=bwd_base, fwd_bwd_tuned=bwd_tuned)
        del inputs
    entry = {"spec_hash": spec.hash, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
             "date": time.strftime("%Y-%m-%d"), "seqlen": seqlen, "configs": best, "measured_ms": measured}
    path = save_entry(spec_path, entry)
    log(f"  {spec.name}: record {path}")
    return entry


__all__ = ["candidates", "configs_for", "next_pow2", "tune"]
