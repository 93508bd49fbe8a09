"""Offline compile report (sm_90, no GPU) of the compression/window backward variants: registers, spill bytes,
shared memory and the matrix instructions of each (kernel, launch config) at each spec, with the operands aligned
as Triton's JIT specialises them on the GPU (`compile_offline.py --aligned`). The table behind the plan's choice of
the backward's default launch configs (`tuning.dense_backward_configs`, docs/backward.md).

Usage: python bench/cmp_bwd_offline.py [SPEC ...] [--kernel compression_dkdv ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import Rows, compile_report, dtype_of  # noqa: E402

import specgen  # noqa: E402
from specgen.compile.plan import make_plan  # noqa: E402
from specgen.compile.tuning import dense_backward_variants  # noqa: E402
from specgen.model.spec import load_spec  # noqa: E402

SPECS = ["specs/models/model_llama3_8b.yaml", "specs/models/model_qwen25_7b.yaml",
         "specs/models/model_gemma2_9b.yaml", "specs/nsa_config_a.yaml", "specs/models/model_mha32_d128.yaml",
         "specs/models/model_mha16_d64.yaml"]
SIG = dict(NKEYS="i32", LSE="*fp32", DG="*fp32", DK="*fp32", DVAL="*fp32", DQ="*fp32", q_split="i32",
           split_stride_k="i32", split_stride_v="i32")


def report(mod, kernel: str, cfg: dict) -> dict:
    fn = getattr(mod, f"_{kernel.rsplit('_', 1)[0]}_bwd_{kernel.rsplit('_', 1)[1]}_kernel")
    ov = dict(SIG, BT=f"constexpr={cfg['bt']}", BLOCK_N=f"constexpr={cfg['block_n']}")
    if "key_major" in cfg:
        ov["KEY_MAJOR"] = f"constexpr={cfg['key_major']}"
    return compile_report(fn, dtype_of(mod), ov, cfg["num_warps"], cfg["num_stages"], error_chars=160)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--kernel", nargs="*", default=["compression_dkdv", "compression_dq"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    for path in args.specs:
        spec = load_spec(path)
        mod = specgen.load(spec)
        plan = make_plan(spec)
        for kernel in args.kernel:
            if kernel.rsplit("_", 1)[0] not in spec.branches:
                continue
            for name, cfg in dense_backward_variants(plan, kernel).items():
                r = report(mod, kernel, cfg)
                n = cfg["bt"] * plan.backward.gp
                head = f"{spec.name:16s} {kernel:17s} {name:10s} rows {n:3d}"
                rows.add({"spec": spec.name, "kernel": kernel, "variant": name, "rows": n, **cfg, **r},
                         f"{head} {r['error']}" if "error" in r else
                         f"{head} keys {cfg['block_n']:3d} km {cfg.get('key_major', '-')} w {cfg['num_warps']} "
                         f"st {cfg['num_stages']}: {r['registers']:3d} regs {r['spill_bytes']:4d} spill "
                         f"{r['smem']:6d} B smem {r['wgmma']:3d} wgmma {r['mma_sync']:3d} mma.sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
