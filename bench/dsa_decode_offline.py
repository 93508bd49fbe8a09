"""Offline compile report (sm_90, no GPU) of dsa_v32's decode kernels in their forms: the MLA selection kernel
(`_decode_selection_kernel`, DecodePlan.selection_form) and the index-score kernel (`_decode_index_scores_kernel`,
DecodePlan.index_form): registers, spill bytes, shared memory, wgmma instructions and each product's replication
(bench/kernel_audit.py's `rep`), with the operands aligned as the JIT specialises them on the GPU and the launch
configs runtime.decode_step uses. The table behind docs/decode.md's "Forms of the DSA step"; `specgen bench SPEC
--decode --decode-forms ...` times the same forms on the GPU.

Usage: python bench/dsa_decode_offline.py [SPEC] [--kernels selection index] [--only FORM ...] [--paged 0|1]
       [--json FILE]
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
from specgen.model.spec import load_spec  # noqa: E402
from specgen.runtime.decode_step import INDEX_FORMS, SELECTION_FORMS  # noqa: E402

SEL_SIG = dict(BLOCK_TABLE="*i32:16", SEQLENS="*i32:16", O_PART="*fp32:16", LSE_PART="*fp32:16", IDX="*i32:16",
               B="i32", QL="i32", TCAP="i32", NSPLIT="i32", sm_scale="fp32")
IDX_SIG = dict(QI="*fp8e4nv:16", KI="*fp8e4nv:16", WI="*fp32:16", CHUNK="i32:16", BLOCK_TABLE="*i32:16", SEQLENS="*i32:16",
               WS="*fp32:16", KS="*fp32:16", QL="i32", TCAP="i32", WS_ROW="i32", idx_scale="fp32")


def selection_forms(d, paged: int) -> dict:
    """name -> (kernel, constexprs, warps, stages) of the MLA selection kernel's forms at one query per program
    (runtime.decode_step.SELECTION_FORMS; 8 warps: 64 head rows x 512 value columns)."""
    base = dict(PAGED=paged, QLP=1, GP=64, HEAD_CHUNKS=2, WIDEN=0)
    out = {}
    for name, (form, tile, stages) in SELECTION_FORMS.items():
        out[name] = ("_decode_selection_kernel", dict(base, FORM=form, BLOCK_N=tile or d.split_tiles["selection"]), 8,
                     stages or d.num_stages)
    return out


def index_forms(d, paged: int) -> dict:
    """name -> (kernel, constexprs, warps, stages) of the index-score kernel's forms at q_len 1 and 4."""
    out = {}
    for ql in (1, 4):
        qlp = max(ql, -(-16 // d.index_hp))
        out[f"tile_q{ql}"] = ("_decode_index_scores_kernel", dict(PAGED=paged, QLP=qlp, BS=d.index_bs, WIDEN=0),
                              8 if qlp * d.index_hp >= 256 else 4, 1)
        for name, form in INDEX_FORMS.items():
            if form is not None:
                bs, stages, warps, _ = form
                out[f"{name}_q{ql}"] = ("_decode_index_wide_kernel", dict(PAGED=paged, QLP=qlp, BS=bs, WIDEN=0), warps,
                                        stages)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--kernels", nargs="*", default=["selection", "index"])
    ap.add_argument("--only", nargs="*", default=None, help="only these form names")
    ap.add_argument("--paged", type=int, default=1, choices=[0, 1], help="the paged (1) or contiguous (0) cache's kernel")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    d = mod._DECODE
    for kernel in args.kernels:
        sig, forms = (SEL_SIG, selection_forms(d, args.paged)) if kernel == "selection" else (IDX_SIG, index_forms(d, args.paged))
        for name, (fn_name, consts, warps, stages) in forms.items():
            if args.only and name not in args.only:
                continue
            fn = getattr(mod, fn_name)
            params = fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount]
            ov = {k: v for k, v in sig.items() if k in params}
            ov.update({k: f"constexpr={v}" for k, v in consts.items() if k in params})
            r = compile_report(fn, dtype_of(mod), ov, warps, stages, error_chars=200, extra=dot_report)
            rows.add({"spec": spec.name, "kernel": kernel, "form": name, "paged": args.paged, "warps": warps, "stages": stages, **r},
                     f"{kernel:9s} {name:16s} {r['error']}" if "error" in r else
                     f"{kernel:9s} {name:16s} w {warps:2d} st {stages}: {r['registers']:3d} regs "
                     f"{r['spill_bytes']:4d} spill {r['smem']:6d} B smem {r['wgmma']:3d} wgmma rep {r['rep']}  "
                     f"{fmt_dots(r['dots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
