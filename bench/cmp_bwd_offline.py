"""Offline compile report (sm_90, no GPU) of the compression/window backward variants: registers, spill bytes,
shared memory and the matrix instructions of each (kernel, launch config) at each spec, with the operands aligned
as Triton's JIT specialises them on the GPU (`compile_offline.py --aligned`). The table behind the plan's choice of
the backward's default launch configs (`tuning.dense_backward_configs`, docs/backward.md).

Usage: python bench/cmp_bwd_offline.py [SPEC ...] [--kernel compression_dkdv ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import compile_kernel, resource_usage  # noqa: E402

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
    params = fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount]
    ov = {k: v for k, v in SIG.items() if k in params}
    ov.update(BT=f"constexpr={cfg['bt']}", BLOCK_N=f"constexpr={cfg['block_n']}")
    if "key_major" in cfg:
        ov["KEY_MAJOR"] = f"constexpr={cfg['key_major']}"
    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(mod.DTYPE)]
    t0 = time.time()
    try:
        k = compile_kernel(fn, dtype, ov, cfg["num_warps"], cfg["num_stages"], aligned=True)
    except Exception as e:  # noqa: BLE001 (a config the compiler rejects is a result too)
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    regs, spill = resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    return {"registers": regs, "spill_bytes": spill, "smem": k.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "compile_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--kernel", nargs="*", default=["compression_dkdv", "compression_dq"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = open(args.json, "a") if args.json else None
    for path in args.specs:
        spec = load_spec(path)
        mod = specgen.load(spec)
        plan = make_plan(spec)
        for kernel in args.kernel:
            if kernel.rsplit("_", 1)[0] not in spec.branches:
                continue
            for name, cfg in dense_backward_variants(plan, kernel).items():
                r = report(mod, kernel, cfg)
                rows = cfg["bt"] * plan.backward.gp
                line = {"spec": spec.name, "kernel": kernel, "variant": name, "rows": rows, **cfg, **r}
                if "error" in r:
                    print(f"{spec.name:16s} {kernel:17s} {name:10s} rows {rows:3d} {r['error']}", flush=True)
                else:
                    print(f"{spec.name:16s} {kernel:17s} {name:10s} rows {rows:3d} keys {cfg['block_n']:3d} "
                          f"km {cfg.get('key_major', '-')} w {cfg['num_warps']} st {cfg['num_stages']}: "
                          f"{r['registers']:3d} regs {r['spill_bytes']:4d} spill {r['smem']:6d} B smem "
                          f"{r['wgmma']:3d} wgmma {r['mma_sync']:3d} mma.sync", flush=True)
                if out:
                    out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
