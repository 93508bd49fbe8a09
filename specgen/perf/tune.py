"""`specgen tune`: measure launch configs on the GPU and record the winners beside the spec.

Candidates come from `tuning.candidates` (key tiles, warps, pipeline stages around the plan's row packing), pruned
by the footprint model (`footprint.launch_model`, shared memory and accumulator registers against Hopper's limits)
before anything is compiled. The search is coordinate descent over kernels (forward ones, then the backward's
dQ and dK/dV kernels): each kernel's candidates, with the others at their current best, are timed by that kernel's
own GPU time inside the whole pass (torch.profiler over 5 calls; inside the pass so interactions through L2 are
seen, per kernel so a small kernel's gain is not lost in the pass's noise). A candidate the compiler rejects is
skipped and said. The record keeps the whole pass's medians (do_bench) with the defaults and with the winners.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import reference
from ..compile.plan import make_plan, next_pow2
from ..compile.render import render_module
from ..model.signature import differentiable_names
from ..model.spec import Spec
from ..compile.records import load_records
from ..compile.tuning import candidates, configs_for, default_configs, save_entry, tunable_kernels

# Below this, a difference between two medians is noise.
IMPROVEMENT = 0.98


def _module_with(spec: Spec, configs: dict, folder: Path):
    from ..compile.jit import import_path

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
        for name in differentiable_names(spec):  # the indexer's inputs get no gradient
            inputs[name].requires_grad_(True)
    return inputs


def kernel_name(kind: str, spec: Spec | None = None) -> str:
    """The Triton kernel a config entry launches (`select`: the indexer's score kernel for indexer specs)."""
    if kind == "select":
        indexer = spec is not None and spec.selection.scorer == "indexer"
        return "_index_scores_kernel" if indexer else "_select_blocks_kernel"
    if kind == "index_topk":
        return "_radix_topk_kernel"
    if kind == "selection_kv_bwd":
        return "_selection_kv_bwd_kernel"
    if kind == "selection_scatter":
        return "_selection_bwd_scatter_kernel"
    if kind.endswith(("_dq", "_dkdv")):
        branch, part = kind.rsplit("_", 1)
        return f"_{branch}_bwd_{part}_kernel"
    return f"_{kind}_attention_kernel"


def _descend(kernels: list[str], plan, best: dict, measure, log) -> dict:
    """Coordinate descent: each kernel's candidates, timed by that kernel's own GPU time inside the pass (others at
    their current best), replace the current config when faster by more than the noise margin."""
    for kind in kernels:
        current = measure(best, kind)
        if current is None:  # the kernel does not run for this spec (e.g. no compression scorer)
            continue
        log(f"  {kind} default {best[kind]}: {current:.3f} ms")
        indexer = kind in ("select", "index_topk") and plan.spec.selection.scorer == "indexer"
        # The block scorer: its warps, at the plan's pipeline stages.
        pool = ([{**plan.tuning.defaults["select"], "num_warps": w} for w in (4, 8)] if kind == "select" and not indexer
                else candidates(plan, kind))
        for cfg in pool:
            if cfg == best[kind]:
                continue
            trial = {**best, kind: cfg}
            try:
                ms = measure(trial, kind)
            except Exception as exc:  # a config the compiler rejects (resources) is skipped, and said
                log(f"  {kind} {cfg}: failed ({str(exc).splitlines()[0][:80]})")
                continue
            better = ms is not None and ms < IMPROVEMENT * current
            log(f"  {kind} {cfg}: {ms:.3f} ms{' (better)' if better else ''}")
            if better:
                best, current = trial, ms
    return best


def tune(spec: Spec, spec_path: Path, seqlen: int, folder: Path, log=print, backward: bool = True,
         kernels: list[str] | None = None) -> dict:
    """Tune every kernel (forward, then backward unless `backward` is false) from the plan's defaults; or, with
    `kernels`, only those, starting from this GPU's record where there is one (the rest keep their recorded
    configs), so one kernel can be retuned without the whole search."""
    import triton

    from .bench import kernel_times

    plan = make_plan(spec)
    default = default_configs(plan)
    tunable = tunable_kernels(spec)
    # (The block-outer and scatter selection kernels are backward kernels too: timed inside the backward pass.)
    all_backward = [k for k in tunable if k.endswith(("_dq", "_dkdv")) or k in ("selection_kv_bwd", "selection_scatter")]
    forward_kernels = [k for k in ("select", "index_topk") + tunable if k in default and k not in all_backward]
    backward_kernels = all_backward if backward else []
    start = default
    if kernels:
        known = forward_kernels + all_backward
        unknown = [k for k in kernels if k not in known]
        if unknown:
            raise ValueError(f"--kernels {' '.join(unknown)}: not a tunable kernel of spec {spec.name}; "
                             f"choose from {', '.join(known)}")
        forward_kernels = [k for k in forward_kernels if k in kernels]
        backward_kernels = [k for k in all_backward if k in kernels]
        recorded = configs_for(plan, load_records(spec, spec_path)).get(torch.cuda.get_device_name())
        if recorded:
            start = {**default, **recorded}
    grad = bool(backward_kernels)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = _inputs(spec, seqlen, grad=grad)
    leaves = [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]

    # One module for the whole search: a trial swaps its CONFIGS (read at every launch), so the forward and the
    # autograd op's backward both run the trial's configs (a second module of the same spec and record would share
    # the first one's registered ops, and so its configs).
    module = _module_with(spec, default, folder)
    gpu = torch.cuda.get_device_name()

    def pass_fn(configs, training: bool):
        module.CONFIGS = {"default": default, gpu: configs}
        if not training:
            fn = getattr(module, f"{spec.family}_forward")

            def forward():
                with torch.no_grad():
                    return fn(**inputs)
            return forward
        fn = getattr(module, f"{spec.family}_attention")

        def run():
            out = fn(**inputs)
            grad_out = torch.ones_like(out)
            return torch.autograd.grad(out, leaves, grad_out)
        return run

    def measure(configs, kind) -> float | None:
        run = pass_fn(configs, kind.endswith(("_dq", "_dkdv")))
        run()  # compile
        name = kernel_name(kind, spec)
        return kernel_times(run, calls=5, names={name}).get(name)

    best = _descend(forward_kernels + backward_kernels, plan, start, measure, log)

    def whole(configs, training) -> float:
        run = pass_fn(configs, training)
        run()
        return triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median")

    measured = {"default": whole(default, False), "tuned": whole(best, False)}
    if kernels and start is not default:
        measured["before"] = whole(start, False)
        if grad:
            measured["fwd_bwd_before"] = whole(start, True)
    if grad:
        measured.update(fwd_bwd_default=whole(default, True), fwd_bwd_tuned=whole(best, True))
    log(f"{spec.name} T={seqlen}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in measured.items()))
    del inputs, leaves
    entry = {"spec_hash": spec.hash, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
             "date": time.strftime("%Y-%m-%d"), "seqlen": seqlen, "configs": best, "measured_ms": measured,
             "method": "coordinate descent, each kernel timed by its own GPU time (torch.profiler, 5 calls)"
                       + (f"; kernels {', '.join(kernels)} retuned from the previous record" if kernels else "")}
    path = save_entry(spec_path, entry)
    log(f"  {spec.name}: record {path}")
    return entry


__all__ = ["candidates", "configs_for", "next_pow2", "tune"]
