"""Times the distillation loss's two paths (docs/distill.md, "Two paths") side by side on the GPU, at one spec's
shapes: the sparse stage (forward, forward+backward; lse_main given as a training step passes it, and not) and
the dense warm-up stage, against the sparse attention forward and dense cuDNN SDPA (forward and forward+backward)
of the unabsorbed MHA for an MLA spec (Hq heads, d 192/128, causal) measured in the same run. Each path's
gradients are compared with the fused path's (relative error) and the fused sparse backward is run twice (its
atomics: bit-for-bit or not is recorded). One JSON line per (stage, T, path).

Usage (GPU): python bench/distill_bench.py [SPEC] --sparse 16384 32768 65536 --dense 16384 32768 [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

import specgen
from specgen import reference
from specgen.model.spec import load_spec
from specgen.perf.bench import event_median_ms as _event_median_ms
from specgen.perf.bench_train import dense_baseline_shapes, differentiable_names

IDX = ("q_idx", "k_idx", "w_idx")
# (name, path, backward warps, sparse forward form): the legacy kernels, the fused ones, the fused backward on two
# warpgroups, the fused sparse forward's forms (docs/distill.md, "The sparse forward's forms").
VARIANTS = (("legacy", "legacy", None, "base"), ("fused", "fused", None, "base"), ("fused_bw8", "fused", 8, "base"),
            ("fused_pf", "fused", None, "pf"), ("fused_km", "fused", None, "km"), ("fused_km_pf", "fused", None, "km_pf"))
DEFAULT_VARIANTS = ("legacy", "fused", "fused_bw8")


def commit() -> str:
    if os.environ.get("SPECGEN_COMMIT"):
        return os.environ["SPECGEN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def cudnn_ms(spec, T: int, reps: int) -> dict:
    """Dense causal cuDNN SDPA of the dense baseline's shapes (bench_train.dense_baseline_shapes): fwd, fwd+bwd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    s = dense_baseline_shapes(spec)
    (hq, hkv), (dqk, dv) = s["heads"], s["head_dim"]
    g = torch.Generator("cuda").manual_seed(1)
    q = torch.randn(1, hq, T, dqk, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k = torch.randn(1, hkv, T, dqk, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    v = torch.randn(1, hkv, T, dv, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    do = torch.randn(1, hq, T, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {"shapes": s["what"] if "what" in s else [hq, hkv, dqk, dv]}
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            with torch.no_grad():
                out["fwd_ms"] = event_median_ms(lambda: sdpa(q, k, v, is_causal=True, scale=s["scale"]), reps)

            def fb():
                o = sdpa(q, k, v, is_causal=True, scale=s["scale"])
                torch.autograd.grad(o, (q, k, v), do)
            out["fwd_bwd_ms"] = event_median_ms(fb, reps)
    except RuntimeError as exc:  # a refusal is a result
        out["error"] = str(exc).splitlines()[0][:160]
    return out


DEVICE = "cuda"


def event_median_ms(fn, reps: int) -> float:
    if DEVICE == "cuda":
        return _event_median_ms(fn, reps)
    t0 = time.perf_counter()  # the CPU interpreter: a smoke test of this script, not a timing
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(mod, spec, stage: str, T: int, reps: int, out, base: dict, variants=DEFAULT_VARIANTS,
        lse_only: bool = False) -> None:
    gen = torch.Generator(DEVICE).manual_seed(T)
    x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device=DEVICE, generator=gen)
    attention = getattr(mod, f"{spec.family}_attention")
    row0 = dict(base, stage=stage, T=T)
    indices = lse_main = None
    if stage == "sparse":
        fixed = {n: x[n] for n in IDX}
        with torch.no_grad():
            indices = mod.index_topk(*fixed.values())
            main = {n: x[n] for n in differentiable_names(spec)}
            fwd = lambda: attention(**main, **fixed, indices=indices, return_lse=True)  # noqa: E731
            _, lse = fwd()
            lse_main = lse[..., 0].contiguous()
            row0["attention_fwd_ms"] = event_median_ms(fwd, reps)
        del _
    launches = mod._DISTILL_LAUNCHES
    default_path, default_bwd, default_form = launches.path, dict(launches.bwd_options), launches.fwd_form
    ref_grads = ref_loss = None
    for name, path, bwd_warps, form in VARIANTS:
        if name not in variants or (stage == "dense" and (bwd_warps or form != "base")):
            continue
        launches.path, launches.fwd_form = path, form
        launches.bwd_options = {"num_warps": bwd_warps} if bwd_warps else default_bwd
        row = dict(row0, path=name)
        trained = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
        try:
            for given in (((True,) if lse_only else (True, False)) if stage == "sparse" else (False,)):
                lse_arg = lse_main if given else None
                tag = "lse" if given else "no_lse"
                loss_fn = lambda: mod.distill_loss(x["q"], x["k"], **trained, indices=indices,  # noqa: E731
                                                   lse_main=lse_arg, stage=stage)
                with torch.no_grad():
                    row[f"fwd_ms_{tag}"] = event_median_ms(loss_fn, reps)
                row[f"fwd_bwd_ms_{tag}"] = event_median_ms(
                    lambda: torch.autograd.grad(loss_fn(), tuple(trained.values())), reps)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, tuple(trained.values()))
                row[f"loss_{tag}"] = float(loss.detach())
                if given or stage == "dense":
                    if stage == "sparse" and path == "fused":
                        again = torch.autograd.grad(loss_fn(), tuple(trained.values()))
                        row["repeat_bitwise"] = all(torch.equal(a, b) for a, b in zip(grads, again))
                    if ref_grads is None:
                        ref_grads, ref_loss = grads, float(loss.detach())
                    else:
                        row["grad_rel_err_vs_first"] = {n: rel_err(a, b) for n, a, b in zip(IDX, grads, ref_grads)}
                        row["loss_rel_err_vs_first"] = abs(float(loss.detach()) - ref_loss) / max(abs(ref_loss), 1e-30)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                torch.autograd.grad(mod.distill_loss(x["q"], x["k"], **trained, indices=indices, lse_main=lse_main,
                                                     stage=stage), tuple(trained.values()))
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        except torch.cuda.OutOfMemoryError as exc:
            row["out_of_memory"] = str(exc).splitlines()[0][:160]
        finally:
            launches.path, launches.bwd_options, launches.fwd_form = default_path, default_bwd, default_form
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()


def check(mod, spec, T: int, variants, out, base: dict) -> None:
    """Each variant's sparse-stage loss and gradients (lse_main given) against the float64 reference
    (specgen.reference.distill_loss) at a short T: one JSON line per variant, `ok` when within bf16 tolerances."""
    gen = torch.Generator(DEVICE).manual_seed(T + 1)
    x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device=DEVICE, generator=gen)
    with torch.no_grad():
        indices = mod.index_topk(*(x[n] for n in IDX))
    x64 = {n: x[n].detach().cpu().double().requires_grad_(n in IDX) for n in ("q", "k") + IDX}
    ind = indices.cpu()
    ref = reference.distill_loss(spec, **x64, indices=ind)
    ref.backward()
    lse = reference.main_lse(spec, x64["q"], x64["k"], indices=ind).float().to(DEVICE)
    launches = mod._DISTILL_LAUNCHES
    saved = launches.path, dict(launches.bwd_options), launches.fwd_form
    for name, path, bwd_warps, form in VARIANTS:
        if name not in variants:
            continue
        launches.path, launches.fwd_form = path, form
        launches.bwd_options = {"num_warps": bwd_warps} if bwd_warps else saved[1]
        try:
            xk = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
            loss = mod.distill_loss(x["q"], x["k"], **xk, indices=indices, lse_main=lse)
            loss.backward()
            row = dict(base, stage="check", T=T, path=name, loss=loss.item(), loss_ref=ref.item(),
                       loss_rel_err=abs(loss.item() - ref.item()) / abs(ref.item()),
                       grad_rel_err={n: rel_err(xk[n].grad.cpu(), x64[n].grad) for n in IDX})
        finally:
            launches.path, launches.bwd_options, launches.fwd_form = saved
        row["ok"] = row["loss_rel_err"] < 1e-3 and all(e < 2e-2 for e in row["grad_rel_err"].values())
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--sparse", type=int, nargs="*", default=[16384, 32768, 65536])
    ap.add_argument("--dense", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under the interpreter (no timings)")
    ap.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), choices=[v[0] for v in VARIANTS],
                    help="the first is the one the others' gradients are compared with")
    ap.add_argument("--lse-only", action="store_true", help="sparse stage: only with lse_main given")
    ap.add_argument("--no-cudnn", action="store_true")
    ap.add_argument("--check", type=int, default=0,
                    help="T: first each variant's sparse loss and gradients against the float64 reference at T")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    base = {"spec": spec.name, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "date": datetime.date.today().isoformat(),
            "commit": commit(), "torch": torch.__version__}
    out = open(args.json, "a") if args.json else None
    if args.check:
        check(mod, spec, args.check, args.variants, out, base)
    for stage, seqlens in (("sparse", args.sparse), ("dense", args.dense)):
        for T in seqlens:
            t0 = time.time()
            run(mod, spec, stage, T, args.reps, out, base, args.variants, args.lse_only)
            if DEVICE != "cuda" or args.no_cudnn:
                continue
            dense = dict(base, stage="cudnn_mha", T=T, **cudnn_ms(spec, T, args.reps))
            print(json.dumps(dense), f"# {stage} T={T}: {time.time() - t0:.0f} s", flush=True)
            if out:
                out.write(json.dumps(dense) + "\n")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
