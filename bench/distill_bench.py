"""Times the distillation loss's two paths (docs/distill.md, "Two paths") side by side on the GPU, at one spec's
shapes: the sparse stage (forward, forward+backward; lse_main given as a training step passes it, and not) and
the dense warm-up stage, against the sparse attention forward and dense cuDNN SDPA (forward and forward+backward)
of the unabsorbed MHA for an MLA spec (Hq heads, d 192/128, causal) measured in the same run. Each path's
gradients are compared with the fused path's (relative error) and the fused sparse backward is run twice (its
atomics: bit-for-bit or not is recorded). One JSON line per (stage, T, path).

The dense stage is timed without lse_main (the forward's own lse pass: `*_no_lse`) and, unless --no-dense-lse, with
it (`*_lse`: the main attention's lse, as a training step's dense attention returns it; taken from a forward
without it). The dense forward's forms (docs/distill.md, "The dense forward's forms") are the variants
fused_qreg / fused_qreg_k32 (fused_qreg_dq: qreg's query-side backward too); `--check-dense T` checks each variant's dense loss and gradients against the float64
reference first. `fused_unabsorbed` (dense stage only, specs with `unabsorbed`): the dense stage from q and k in the
unabsorbed form (random [1, T, Hq, unabsorbed.qk] each, a key per query head; docs/distill.md, "The dense stage from
the unabsorbed heads"), its lse_main from its own lse pass; its gradients are not compared with the absorbed
variants' (other inputs).

Usage (GPU): python bench/distill_bench.py [SPEC] --sparse 16384 32768 65536 --dense 16384 32768 [--json FILE]
             python bench/distill_bench.py --variants fused fused_qreg fused_qreg_k32 --check-dense 512 --sparse \
                 --dense 16384 32768
             python bench/distill_bench.py --variants fused_qreg_dq fused_unabsorbed --check-dense 512 --sparse \
                 --dense 16384 32768
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
from specgen.perf import bench_train
from specgen.perf.bench_train import dense_baseline_shapes, differentiable_names

IDX = ("q_idx", "k_idx", "w_idx")
# (name, path, backward warps, sparse forward form, dense forward form, dense query-side backward form): the legacy
# kernels, the fused ones, the fused backward on two warpgroups, the fused sparse forward's forms (docs/distill.md,
# "The sparse forward's forms"), the fused dense forward's forms and its query-side backward's ("The dense
# forward's forms").
VARIANTS = (("legacy", "legacy", None, "base", "base", "base"), ("fused", "fused", None, "base", "base", "base"),
            ("fused_bw8", "fused", 8, "base", "base", "base"), ("fused_pf", "fused", None, "pf", "base", "base"),
            ("fused_km", "fused", None, "km", "base", "base"), ("fused_km_pf", "fused", None, "km_pf", "base", "base"),
            ("fused_qreg", "fused", None, "base", "qreg", "base"),
            ("fused_qreg_k32", "fused", None, "base", "qreg_k32", "base"),
            ("fused_qreg_dq", "fused", None, "base", "qreg", "qreg"),
            ("fused_unabsorbed", "fused", None, "base", "base", "base"),
            ("fused_unabsorbed_w16", "fused", None, "base", "base", "base"),
            ("fused_unabsorbed_k128_w16", "fused", None, "base", "base", "base"))
DEFAULT_VARIANTS = ("legacy", "fused", "fused_bw8")
# Variants whose q and k are the unabsorbed form (a key per query head): the dense stage only.
UNABSORBED = ("fused_unabsorbed", "fused_unabsorbed_w16", "fused_unabsorbed_k128_w16")
# The unabsorbed forward's other tiles (its launch's `mha` entries; docs/distill.md "The dense stage from the
# unabsorbed heads"): 16 warps at the plan's 64 keys a trip (no spill in the head loop, sm_90), and 128 keys a trip
# at 16 warps (2/3 of the L2 reloads a FLOP; 17 spill loads a head trip).
MHA_TILES = {"fused_unabsorbed_w16": {"warps": 16}, "fused_unabsorbed_k128_w16": {"warps": 16, "bk": 128}}


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


class _Forms:
    """Sets a module's launch configs for one variant (path, backward warps, the sparse and dense forms) and
    restores its own on exit."""

    def __init__(self, mod, variant):
        self.launches, self.variant = mod._DISTILL_LAUNCHES, variant

    def __enter__(self):
        lc = self.launches
        self.saved = lc.path, dict(lc.bwd_options), lc.fwd_form, lc.dense_fwd_form, lc.dense_dq_form, lc.mha
        _, path, bwd_warps, form, dense_form, dense_dq_form = self.variant
        lc.path, lc.fwd_form, lc.dense_fwd_form, lc.dense_dq_form = path, form, dense_form, dense_dq_form
        lc.bwd_options = {"num_warps": bwd_warps} if bwd_warps else self.saved[1]
        if self.variant[0] in MHA_TILES and lc.mha:
            lc.mha = {**lc.mha, **MHA_TILES[self.variant[0]]}
        return self

    def __exit__(self, *exc):
        lc = self.launches
        lc.path, lc.bwd_options, lc.fwd_form, lc.dense_fwd_form, lc.dense_dq_form, lc.mha = self.saved
        return False


def _applies(variant, stage: str) -> bool:
    """A sparse forward form or the 8-warp sparse backward changes nothing in the dense stage; a dense form
    nothing in the sparse one."""
    _, _, bwd_warps, form, dense_form, dense_dq_form = variant
    if stage != "dense" and variant[0] in UNABSORBED:
        return False
    return not (bwd_warps or form != "base") if stage == "dense" else dense_form == dense_dq_form == "base"


def unabsorbed_main(mod, spec, T: int, x: dict, lse: bool = True) -> dict:
    """The unabsorbed variants' main inputs (perf.bench_train.unabsorbed_main, seeded by T + 2)."""
    if spec.unabsorbed is None:
        raise SystemExit(f"variant fused_unabsorbed: spec {spec.name} has no `unabsorbed` head dims")
    return bench_train.unabsorbed_main(spec, mod, tuple(x[n] for n in IDX), T, DEVICE, seed=T + 2, lse=lse)


def run(mod, spec, stage: str, T: int, reps: int, out, base: dict, variants=DEFAULT_VARIANTS,
        lse_only: bool = False, dense_lse: bool = True) -> None:
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
    elif dense_lse:
        # The dense attention's lse over s <= t, as a training step has it: the loss's own lse pass computes it.
        with torch.no_grad():
            lse_main = mod._distill_fwd(x["q"], x["k"], *(x[n] for n in IDX), None, None, None, 0)[2]
    givens = (True,) if lse_only else (True, False)
    if stage == "dense" and not dense_lse:
        givens = (False,)
    ref_grads = ref_loss = None
    for variant in VARIANTS:
        name, path = variant[:2]
        if name not in variants or not _applies(variant, stage):
            continue
        row = dict(row0, path=name)
        trained = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
        # The main attention's q, k and lse: the unabsorbed variants' own (a key per query head).
        main = unabsorbed_main(mod, spec, T, x, dense_lse) if name in UNABSORBED else \
            {"q": x["q"], "k": x["k"], "lse_main": lse_main}
        if name in UNABSORBED:
            row["form"] = "unabsorbed"
        forms = _Forms(mod, variant)
        forms.__enter__()
        try:
            for given in givens:
                lse_arg = main["lse_main"] if given else None
                tag = "lse" if given else "no_lse"
                loss_fn = lambda: mod.distill_loss(main["q"], main["k"], **trained, indices=indices,  # noqa: E731
                                                   lse_main=lse_arg, stage=stage)
                with torch.no_grad():
                    row[f"fwd_ms_{tag}"] = event_median_ms(loss_fn, reps)
                row[f"fwd_bwd_ms_{tag}"] = event_median_ms(
                    lambda: torch.autograd.grad(loss_fn(), tuple(trained.values())), reps)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, tuple(trained.values()))
                row[f"loss_{tag}"] = float(loss.detach())
                if (given or givens == (False,)) and name not in UNABSORBED:
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
                torch.autograd.grad(mod.distill_loss(main["q"], main["k"], **trained, indices=indices,
                                                     lse_main=main["lse_main"], stage=stage), tuple(trained.values()))
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        except torch.cuda.OutOfMemoryError as exc:
            row["out_of_memory"] = str(exc).splitlines()[0][:160]
        finally:
            forms.__exit__()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()


def check(mod, spec, T: int, variants, out, base: dict, stage: str = "sparse") -> None:
    """Each variant's loss and gradients in `stage` against the float64 reference (specgen.reference.distill_loss)
    at a short T, lse_main given (and, dense stage, not: the forward's own lse pass): one JSON line per variant (and
    lse), `ok` when within bf16 tolerances."""
    gen = torch.Generator(DEVICE).manual_seed(T + 1)
    x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device=DEVICE, generator=gen)
    indices = ind = None
    if stage == "sparse":
        with torch.no_grad():
            indices = mod.index_topk(*(x[n] for n in IDX))
        ind = indices.cpu()
    refs = {}

    def ref_of(form: str):
        """The float64 reference's loss, gradients and lse_main for q and k in `form`, once."""
        if form not in refs:
            main = unabsorbed_main(mod, spec, T, x, False) if form == "unabsorbed" else x
            x64 = {n: (main if n in ("q", "k") else x)[n].detach().cpu().double().requires_grad_(n in IDX)
                   for n in ("q", "k") + IDX}
            loss = reference.distill_loss(spec, **x64, indices=ind)
            loss.backward()
            lse = reference.main_lse(spec, x64["q"], x64["k"], indices=ind).float().to(DEVICE)
            refs[form] = (main["q"], main["k"], loss, x64, lse)
        return refs[form]

    for variant in VARIANTS:
        name = variant[0]
        if name not in variants or not _applies(variant, stage):
            continue
        q, k, ref, x64, lse = ref_of("unabsorbed" if name in UNABSORBED else "absorbed")
        for lse_main in (lse,) if stage == "sparse" else (lse, None):
            with _Forms(mod, variant):
                xk = {n: x[n].detach().clone().requires_grad_(True) for n in IDX}
                loss = mod.distill_loss(q, k, **xk, indices=indices, lse_main=lse_main, stage=stage)
                loss.backward()
            row = dict(base, stage="check" if stage == "sparse" else "check_dense", T=T, path=name,
                       lse_given=lse_main is not None, loss=loss.item(), loss_ref=ref.item(),
                       loss_rel_err=abs(loss.item() - ref.item()) / abs(ref.item()),
                       grad_rel_err={n: rel_err(xk[n].grad.cpu(), x64[n].grad) for n in IDX})
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
    ap.add_argument("--check-dense", type=int, default=0,
                    help="T: first each variant's dense loss and gradients against the float64 reference at T")
    ap.add_argument("--no-dense-lse", action="store_true",
                    help="dense stage: only without lse_main (the forward's own lse pass), as before")
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
    if args.check_dense:
        check(mod, spec, args.check_dense, args.variants, out, base, stage="dense")
    for stage, seqlens in (("sparse", args.sparse), ("dense", args.dense)):
        for T in seqlens:
            t0 = time.time()
            run(mod, spec, stage, T, args.reps, out, base, args.variants, args.lse_only, not args.no_dense_lse)
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
