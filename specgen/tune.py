"""`specgen tune`: measure launch configs on the GPU and record the winners beside the spec.

Candidates come from the plan (row packing, key-tile width, warps, pipeline stages) and are pruned by their
shared-memory and register footprint against Hopper's limits before anything is compiled. The search is coordinate
descent over kernels: each kernel's candidates are timed inside the whole forward (so interactions through L2 are
seen) with the other kernels at their current best; medians of `triton.testing.do_bench`.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from . import reference
from .plan import MIN_DOT, make_plan, next_pow2
from .render import render_module
from .spec import Spec
from .tuning import configs_for, default_configs, save_entry

# Hopper (sm_90) per-SM limits the pruning checks against.
SMEM_BYTES = 227 * 1024
REGS_PER_THREAD = 255


def footprint(spec: Spec, kind: str, cfg: dict, gp: int) -> tuple[int, int]:
    """(shared-memory bytes, accumulator registers per thread) of one attention program."""
    esize = 4 if spec.dtype == "fp32" else 2
    rows = cfg["bt"] * gp
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    smem = (rows * dqk + cfg["block_n"] * (dqk + dv) * max(1, cfg["num_stages"])) * esize
    # fp32 accumulator and score tile spread over the program's threads.
    regs = (rows * dv + rows * cfg["block_n"]) // (cfg["num_warps"] * 32)
    return smem, regs


def candidates(spec: Spec, kind: str) -> list[dict]:
    plan = make_plan(spec)
    if kind == "select":
        return [{"num_warps": w} for w in (4, 8)]
    tile = getattr(plan, kind)
    gp = tile.gp
    out = []
    if kind == "selection":
        unit = spec.selection.block
        widths = sorted({max(MIN_DOT, unit, 64 if unit == 1 else unit), max(MIN_DOT, 2 * unit, 32 if unit == 1 else 0),
                         128 if unit == 1 else max(MIN_DOT, unit)})
        grid = itertools.product([1], [w for w in widths if w % unit == 0 and w <= 128], (4, 8), (1, 2, 3))
    else:
        bts = sorted({max(1, r // gp) for r in (64, 128) if max(1, r // gp) * gp >= MIN_DOT})
        grid = itertools.product(bts, (32, 64, 128), (4, 8), (2, 3))
    for bt, block_n, warps, stages in grid:
        cfg = {"bt": bt, "block_n": block_n, "num_warps": warps, "num_stages": stages}
        smem, regs = footprint(spec, kind, cfg, gp)
        if smem <= SMEM_BYTES and regs <= REGS_PER_THREAD // 2:
            out.append(cfg)
    return out


def _module_with(spec: Spec, configs: dict, folder: Path):
    from .jit import import_path

    gpu = torch.cuda.get_device_name()
    text = render_module(spec, [{"spec_hash": spec.hash, "gpu": gpu, "triton": "", "date": "", "configs": configs}])
    path = folder / f"{spec.name}_tuning.py"
    path.write_text(text)
    return import_path(path, f"specgen_tuning.{spec.name}_{time.monotonic_ns()}")


def tune(spec: Spec, spec_path: Path, seqlen: int, folder: Path, log=print) -> dict:
    import triton

    folder.mkdir(parents=True, exist_ok=True)
    plan = make_plan(spec)
    best = default_configs(plan)
    inputs = reference.make_inputs(spec, 1, seqlen, dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                                            "fp32": torch.float32}[spec.dtype], device="cuda",
                                   generator=torch.Generator(device="cuda").manual_seed(seqlen))

    def measure(configs) -> float:
        module = _module_with(spec, configs, folder)
        fn = getattr(module, f"{spec.family}_forward")
        fn(**inputs)
        return triton.testing.do_bench(lambda: fn(**inputs), warmup=5, rep=30, return_mode="median")

    base = measure(best)
    log(f"{spec.name} T={seqlen}: default configs {base:.3f} ms")
    current = base
    for kind in [k for k in ("select", "selection", "compression", "window") if k in best]:
        for cfg in candidates(spec, kind):
            if cfg == best[kind]:
                continue
            trial = {**best, kind: cfg}
            try:
                ms = measure(trial)
            except Exception as exc:  # a config the compiler rejects (resources) is skipped, and said
                log(f"  {kind} {cfg}: failed ({str(exc).splitlines()[0][:80]})")
                continue
            if ms < 0.98 * current:  # below 2%, a difference is noise
                log(f"  {kind} {cfg}: {ms:.3f} ms (better)")
                best, current = trial, ms
    entry = {"spec_hash": spec.hash, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
             "date": time.strftime("%Y-%m-%d"), "seqlen": seqlen, "configs": best,
             "measured_ms": {"default": base, "tuned": current}}
    path = save_entry(spec_path, entry)
    log(f"  {spec.name}: {base:.3f} -> {current:.3f} ms; record {path}")
    return entry


__all__ = ["candidates", "configs_for", "footprint", "next_pow2", "tune"]
