"""Times every launch-config variant of the compression (and, with --window, window) backward kernels side by side
on the GPU: `tuning.dense_backward_variants` (the former default "rows64" first), median of CUDA events, with the
achieved TFLOP/s of the useful work (visible query-key pairs only), each variant's agreement with the first
(relative error: the variants differ only in fp32 accumulation order and where the gate is applied) and whether two
runs agree bit for bit. One JSON line per (spec, T, kernel, variant).

dQ is one launch; dK/dV is the whole `compression_dkdv` call (the split kernel and the torch.sum of its partials).
Usage (GPU): python bench/cmp_bwd.py SPEC... --seqlens 32768 65536 [--window] [--json FILE] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import specgen
from specgen import reference, runtime
from specgen.compile.plan import make_plan
from specgen.compile.tuning import dense_backward_default, dense_backward_variants
from specgen.model.spec import load_spec
from specgen.perf.bench import event_median_ms


def visible_pairs(spec, kind: str, T: int) -> int:
    """(query, key) pairs a query head attends to in branch `kind` over a sequence of T tokens."""
    t = torch.arange(T, dtype=torch.int64)
    if kind == "compression":
        c = spec.compression
        nc = (T - c.block) // c.stride + 1 if T >= c.block else 0
        n = torch.where(t >= c.block - 1, torch.div(t - c.block + 1, c.stride, rounding_mode="floor") + 1, 0)
        return int(n.clamp(max=nc).sum())
    return int(torch.clamp(t + 1, max=spec.window.size).sum())


def flops(spec, kernel: str, T: int) -> float:
    kind, part = kernel.rsplit("_", 1)
    pairs = visible_pairs(spec, kind, T) * spec.heads.q
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    # dQ: S, dP, dS K; dK/dV: S, dP, P^T dO, dS^T Q.
    return pairs * (2 * (2 * dqk + dv) if part == "dq" else 4 * (dqk + dv))


def median_ms(fn, reps: int, device: str) -> float:
    if device == "cuda":
        return event_median_ms(fn, reps)
    t0 = time.perf_counter()  # the CPU interpreter: a smoke test of this script, not a timing
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_spec(path: str, seqlens, kinds, reps: int, out, device: str = "cuda") -> None:
    spec = load_spec(path)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    gen = torch.Generator(device).manual_seed(0)
    for T in seqlens:
        x = reference.make_inputs(spec, 1, T, dtype=mod.DTYPE, device=device, generator=gen)
        names = [a.name for a in mod._DESC.args]
        with torch.no_grad():
            st = mod._forward(*[x[n] for n in names], save_branch_outputs=True)
            dout = torch.randn(st.out.shape, generator=gen, device=device).to(mod.DTYPE)
            configs = {"default": {k: dict(v) for k, v in mod.CONFIGS["default"].items()}}
            b = runtime.launches.Backward(mod._DESC, configs, mod.CANDIDATES, mod._bwd_preprocess_kernel, dout,
                                          x["q"], x.get("gates"), st.lse, st.branch_out, mod.WIDEN)
        k = x.get("k", x.get("k_win"))
        v = x.get("v", x.get("v_win"))
        NC = st.kc.shape[1] if st.kc is not None else 0
        for kind in kinds:
            for part in ("dq", "dkdv"):
                kernel = f"{kind}_{part}"
                fn = getattr(mod, f"_{kind}_bwd_{part}_kernel")

                def call():
                    b.launched, b.grads = 0, {}
                    if part == "dq":
                        b.dq(fn, kind, st.kc if kind == "compression" else k,
                             st.vc if kind == "compression" else v, NC if kind == "compression" else T)
                        return (b.dq_acc,)
                    if kind == "compression":
                        return b.compression_dkdv(fn, st.kc, st.vc, NC)
                    b.window_dkdv(fn, "k", "v", k, v)
                    return tuple(b.grads.values())

                first = None
                for name, cfg in dense_backward_variants(plan, kernel).items():
                    configs["default"][kernel] = cfg
                    rec = {"spec": spec.name, "T": T, "kernel": kernel, "variant": name, "config": cfg,
                           "default": name == dense_backward_default(spec)[part], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
                    try:
                        t0 = time.time()
                        with torch.no_grad():
                            a = [t.clone() for t in call()]
                            if device == "cuda":
                                torch.cuda.synchronize()
                            rec["first_call_s"] = round(time.time() - t0, 2)
                            c = call()
                            rec["bitwise_repeat"] = all(torch.equal(p, q) for p, q in zip(a, c))
                            if first is None:
                                first = a
                            rec["rel_err_vs_first"] = max(
                                (torch.linalg.vector_norm((p - q).double()) / torch.linalg.vector_norm(q.double())).item()
                                for p, q in zip(a, first))
                            rec["finite"] = all(bool(torch.isfinite(p).all()) for p in a)
                            ms = median_ms(call, reps, device)
                        rec["ms"] = round(ms, 3)
                        rec["tflops"] = round(flops(spec, kernel, T) / ms / 1e9, 1)
                    except Exception as e:  # noqa: BLE001 (a variant the GPU refuses is a result)
                        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(json.dumps(rec), file=out, flush=True)
                    tag = (f"{rec['ms']:8.2f} ms {rec['tflops']:6.1f} TFLOP/s err {rec['rel_err_vs_first']:.1e} "
                           f"bitwise {rec['bitwise_repeat']}") if "ms" in rec else rec["error"]
                    print(f"{spec.name:16s} T={T:6d} {kernel:17s} {name:10s}{'*' if rec['default'] else ' '} {tag}",
                          flush=True)
        del st, b, x
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--window", action="store_true", help="the window branch's kernels too")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: run once under the interpreter (a smoke test)")
    args = ap.parse_args(argv)
    out = open(args.json, "a") if args.json else sys.stdout
    for path in args.specs:
        spec = load_spec(path)
        kinds = [k for k in ("compression", "window") if k in spec.branches and (k == "compression" or args.window)]
        run_spec(path, args.seqlens, kinds, args.reps, out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
