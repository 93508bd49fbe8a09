"""Offline compile report (sm_90, no GPU) of DeepSeek-V3.2's backward kernels: the scatter kernel's forms
(`tuning.scatter_variants`: launch configs of `_selection_bwd_scatter_kernel`; a split form's two kernels, the
scatter kernel without dK/dV and `_selection_bwd_scatter_dkdv_kernel`, on a row each), the deterministic pair (the dq
kernel and the inverse-index dK/dV kernel) and the preprocess, at the module's default configs. Per row: registers,
spill bytes, shared memory, wgmma / mma.sync instructions in the PTX, the atomic instructions (`atom`/`red`, and
their vector width), each matrix product's tile against the rows its warps cover (bench/kernel_audit.py's `rep`:
2 = computed by both warpgroups), with the operands aligned as Triton's JIT specialises them on the GPU. The table
behind docs/backward.md's "The scatter kernel's forms"; bench/dsa_bwd.py --forms times the same configs on the GPU.

Usage: python bench/dsa_bwd_offline.py [SPEC] [--variants NAME ...] [--others] [--varlen] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import Rows, compile_report, dtype_of  # noqa: E402
from kernel_audit import dot_report, fmt_dots  # noqa: E402

import specgen  # noqa: E402
from specgen.compile.plan import make_plan  # noqa: E402
from specgen.compile.tuning import scatter_variants, split_form  # noqa: E402
from specgen.model.spec import load_spec  # noqa: E402
from specgen.runtime import META_NAMES  # noqa: E402

# The runtime's argument types (runtime.launches.Backward) where compile_offline's defaults differ: fp32 log-sum-exp,
# dgate, dK/dV accumulators; dQ in the spec's dtype (one branch, schema 14); int32 indices and tables.
SIG = dict(LSE="*fp32", DG="*fp32", DK="*fp32", DVAL="*fp32", IDX="*i32", CU_SEQLENS="*i32", CU_BLOCKS="*i32",
           TILES="*i32", NKEYS="i32", OFFSETS="*i64", QPOS="*i32", BITS="*i64", DGATES="*bf16", n_rows="i32")
ATOM_RE = re.compile(r"\b(atom|red)\.global[.\w]*")


def atomics(k) -> dict:
    """Atomic instructions of the PTX by opcode (e.g. {'red.global.gpu.relaxed.add.f32': 72})."""
    out: dict = {}
    for m in ATOM_RE.finditer(k.asm["ptx"]):
        out[m.group(0)] = out.get(m.group(0), 0) + 1
    return out


def extra(k) -> dict:
    """dot_report's products, the atomics, and cp.async copies in the PTX (the pipelined tile loads: 0 when no
    load goes through the pipeliner's shared-memory buffers)."""
    return {**dot_report(k), "atomics": atomics(k), "cp_async": k.asm["ptx"].count("cp.async.c")}


def report(mod, kernel: str, cfg: dict, flags: dict) -> dict:
    fn = getattr(mod, kernel)
    ov = dict(SIG)
    ov.update({k: f"constexpr={int(v)}" for k, v in flags.items()})
    ov.update({META_NAMES[k]: f"constexpr={v}" for k, v in cfg.items() if k in META_NAMES})
    return compile_report(fn, dtype_of(mod), ov, cfg.get("num_warps", 4), cfg.get("num_stages", 1),
                          error_chars=200, extra=extra)


def line(label: str, cfg: dict, r: dict) -> str:
    if "error" in r:
        return f"{label:34s} {r['error']}"
    fields = " ".join(f"{k} {v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages"))
    atoms = " ".join(f"{n}:{c}" for n, c in r["atomics"].items()) or "-"
    return (f"{label:34s} {fields} w {cfg.get('num_warps')} st {cfg.get('num_stages')}: {r['registers']:3d} regs "
            f"{r['spill_bytes']:4d} spill {r['smem']:6d} B smem {r['wgmma']:3d} wgmma {r['mma_sync']:3d} mma.sync "
            f"rep {r['rep']} cp.async {r['cp_async']}  {fmt_dots(r['dots'])}  atomics {atoms}  [{r['compile_s']} s]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--variants", nargs="*", default=None, help="only these scatter forms (none: no scatter form)")
    ap.add_argument("--others", action="store_true", help="also the dq, inverse-index dK/dV and preprocess kernels")
    ap.add_argument("--varlen", action="store_true", help="the packed (VARLEN) specialisation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    plan = make_plan(spec)
    varlen = dict(VARLEN=args.varlen)
    for name, cfg in scatter_variants(plan).items():
        if args.variants is not None and name not in args.variants:
            continue
        if split_form(cfg):
            # Two kernels: the scatter kernel without its dK/dV (DKDV 0), and the dK/dV kernel in its own tile.
            tile = {k: v for k, v in cfg.items() if not k.startswith("dkdv")}
            r = report(mod, "_selection_bwd_scatter_kernel", tile, dict(HAS_PREV=0, WIDEN=0, DKDV=0, **varlen))
            rows.add({"spec": spec.name, "kernel": "selection_scatter", "variant": name, "varlen": args.varlen,
                      **cfg, **r}, line(f"{spec.name} scatter {name} (dQ)", tile, r))
            once = {"block_n": cfg["dkdv_block_n"], "num_warps": cfg["dkdv_warps"], "num_stages": cfg["dkdv_stages"]}
            r = report(mod, "_selection_bwd_scatter_dkdv_kernel", once, dict(WIDEN=0, **varlen))
            rows.add({"spec": spec.name, "kernel": "selection_scatter_dkdv", "variant": name, "varlen": args.varlen,
                      **once, **r}, line(f"{spec.name} scatter {name} (dK/dV)", once, r))
            continue
        r = report(mod, "_selection_bwd_scatter_kernel", cfg, dict(HAS_PREV=0, WIDEN=0, **varlen))
        rows.add({"spec": spec.name, "kernel": "selection_scatter", "variant": name, "varlen": args.varlen, **cfg, **r},
                 line(f"{spec.name} scatter {name}", cfg, r))
    if args.others:
        default = mod.CONFIGS["default"]
        others = [("_selection_bwd_dq_kernel", "selection_dq", dict(HAS_PREV=0, WIDEN=0, **varlen)),
                  ("_selection_bwd_dkdv_kernel", "selection_dkdv", dict(ACCUMULATE=0, WIDEN=0, **varlen)),
                  ("_bwd_preprocess_kernel", "preprocess", {})]
        for kernel, name, flags in others:
            cfg = dict(default[name])
            if name == "preprocess":
                cfg = {"num_warps": cfg["num_warps"], "num_stages": 1}
                flags = dict(BR=default["preprocess"]["rows"])
            r = report(mod, kernel, cfg, flags)
            rows.add({"spec": spec.name, "kernel": name, "variant": "default", "varlen": args.varlen, **cfg, **r},
                     line(f"{spec.name} {name}", cfg, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
