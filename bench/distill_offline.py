"""Offline compile report (sm_90, no GPU) of the distillation kernels (docs/distill.md): registers, spill bytes,
shared memory and matrix instructions (wgmma / mma.sync in the PTX) of each kernel at each launch config, with the
operands aligned as Triton's JIT specialises them on the GPU (`compile_offline.py --aligned`).

Usage: python bench/distill_offline.py [SPEC] [--kernel _distill_dq_sparse_kernel ...] [--warps 4 8] [--stages 1]
       [--const NAME=VALUE ...] [--loops] [--json FILE]
`--loops` adds each loop's SASS counts (compile_offline.loop_report: wgmma and their waits, barriers, spills).
The dense forward's forms: --kernel _distill_fwd_dense_qreg_kernel --warps 8 --const HAS_LSE=1 BK=64 STAGES=2 QSMEM=8
The unabsorbed dense stage (plan MhaTiles; --const BQ= BK= STAGES= KB= compile other tiles):
       --kernel _distill_fwd_dense_mha_kernel _distill_di_dense_mha_kernel --warps 8 --const HAS_LSE=1 --loops
       --kernel _distill_dq_dense_mha_kernel _distill_dk_dense_mha_kernel --warps 4 --loops
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import Rows, compile_report, dtype_of, loop_report  # noqa: E402

import specgen  # noqa: E402
from specgen.model.spec import load_spec  # noqa: E402

# Argument types of the distillation kernels beyond compile_offline's defaults (pointers in the spec's dtype).
SIG = dict(IDX="*i32", LSE="*fp32", LSE_OUT="*fp32", ROW_KL="*fp32", STATS="*fp32", GSCALE="*fp32",
           DI_SEL="*fp32", PTR="*i64", POS="*i64", CU_SEQLENS="*i32", TILES="*i32", DK_ACC="*fp32", P_SEL="*fp32",
           # the unabsorbed dense stage's backward: its dI strip, the strip's query tiles, its sizes
           DI="*fp32", QTILES="*i32", TILE0="i32", NTS="i32", LD="i32", NKB="i32", NT="i32")
KERNELS = ("_distill_fwd_sparse_kernel", "_distill_dq_sparse_kernel", "_distill_dk_sparse_kernel",
           "_distill_fwd_dense_kernel", "_distill_dq_dense_kernel", "_distill_dk_dense_kernel")


def report(mod, kernel: str, warps: int, stages: int, consts: dict, loops: bool = False) -> dict:
    ov = dict(SIG, **{k: f"constexpr={v}" for k, v in consts.items()})   # names the kernel lacks are left out
    extra = (lambda k: {"loops": loop_report(k)}) if loops else None
    return compile_report(getattr(mod, kernel), dtype_of(mod), ov, warps, stages, extra=extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--kernel", nargs="*", default=list(KERNELS))
    ap.add_argument("--warps", type=int, nargs="*", default=[4])
    ap.add_argument("--stages", type=int, nargs="*", default=[1])
    ap.add_argument("--const", nargs="*", default=[], help="constexpr NAME=VALUE (e.g. VARIANT=1)")
    ap.add_argument("--loops", action="store_true", help="each loop's SASS counts (wgmma, their waits, spills)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    consts = {k: int(v) for k, v in (c.split("=", 1) for c in args.const)}
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    rows = Rows(args.json)
    for kernel in args.kernel:
        for w in args.warps:
            for st in args.stages:
                r = report(mod, kernel, w, st, consts, args.loops)
                head = f"{kernel:30s} w{w} s{st} {consts}:"
                rows.add({"spec": spec.name, "kernel": kernel, "warps": w, "stages": st, **consts, **r},
                         f"{head} {r['error']}" if "error" in r else
                         f"{head} {r['registers']:3d} regs {r['spill_bytes']:5d} spill {r['smem']:6d} B smem "
                         f"{r['wgmma']:4d} wgmma {r['mma_sync']:3d} mma.sync ({r['compile_s']} s)"
                         + "".join(f"\n    loop {lp}" for lp in r.get("loops", ())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
