"""Offline compile report (sm_90, no GPU) of the selection forward's forms (`tuning.selection_forward_variants`):
registers, spill bytes, shared memory, wgmma / mma.sync instructions and each matrix product's tile against the rows
its warps cover (bench/kernel_audit.py's `rep`: 2 = computed by both warpgroups), per named launch config, with the
operands aligned as Triton's JIT specialises them on the GPU. The table behind docs/tuning.md's "The selection
forward's forms"; bench/variants_bench.py --only dsa_fwd times the same configs on the GPU.

Usage: python bench/dsa_fwd_offline.py [SPEC ...] [--variants NAME ...] [--varlen] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import Rows, compile_report, dtype_of  # noqa: E402
from kernel_audit import dot_report, fmt_dots  # noqa: E402

import specgen  # noqa: E402
from specgen.compile.plan import make_plan  # noqa: E402
from specgen.compile.tuning import selection_forward_variants  # noqa: E402
from specgen.model.spec import load_spec  # noqa: E402

SPECS = ["specs/dsa_v32.yaml", "specs/dsa_block.yaml"]
# The runtime's argument types (runtime.launches.Forward.attention) where compile_offline's defaults differ.
SIG = dict(ACC="*fp32", LSE="*fp32", IDX="*i32", CU_SEQLENS="*i32", CU_BLOCKS="*i32", TILES="*i32", NKEYS="i32",
           branch_stride="i32")
META = {"bt": "BT", "block_n": "BLOCK_N", "key_split": "KEY_SPLIT", "prefetch": "PREFETCH"}


def report(mod, cfg: dict, varlen: bool = False) -> dict:
    fn = mod._selection_attention_kernel
    ov = dict(SIG)
    flags = dict(HAS_PREV=0, LAST=1, SAVE_BRANCH=0, WIDEN=0, VARLEN=int(varlen), PREFILL=int(varlen))
    ov.update({k: f"constexpr={v}" for k, v in flags.items()})
    ov.update({META[k]: f"constexpr={v}" for k, v in cfg.items() if k in META})
    return compile_report(fn, dtype_of(mod), ov, cfg["num_warps"], cfg["num_stages"], error_chars=160,
                          extra=dot_report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--variants", nargs="*", default=None, help="only these variant names")
    ap.add_argument("--varlen", action="store_true", help="the packed (VARLEN, PREFILL) specialisation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    for path in args.specs:
        spec = load_spec(path)
        mod = specgen.load(spec)
        for name, cfg in selection_forward_variants(make_plan(spec)).items():
            if args.variants and name not in args.variants:
                continue
            r = report(mod, cfg, args.varlen)
            rows.add({"spec": spec.name, "variant": name, "varlen": args.varlen, **cfg, **r},
                     f"{spec.name:10s} {name:10s} {r['error']}" if "error" in r else
                     f"{spec.name:10s} {name:10s} keys {cfg['block_n']:3d} ks {cfg['key_split']} pf {cfg['prefetch']} "
                     f"w {cfg['num_warps']:2d} st {cfg['num_stages']}: {r['registers']:3d} regs {r['spill_bytes']:4d} "
                     f"spill {r['smem']:6d} B smem {r['wgmma']:3d} wgmma {r['mma_sync']:3d} mma.sync rep {r['rep']}  "
                     f"{fmt_dots(r['dots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
