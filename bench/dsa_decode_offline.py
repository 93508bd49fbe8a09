"""Offline compile report (sm_90, no GPU) of dsa_v32's decode kernels in their forms: the MLA selection kernel
(`_decode_selection_kernel`, DecodePlan.selection_form), the index-score kernel (`_decode_index_scores_kernel`,
DecodePlan.index_form; `+fold`: with the top-k's first pass, topk_form "fold") and the top-k's kernels
(`_decode_topk_hist_kernel` per pass, `_decode_topk_write_kernel`; DecodePlan.topk_form): registers, spill bytes, shared memory, wgmma instructions and each product's replication
(bench/kernel_audit.py's `rep`), with the operands aligned as the JIT specialises them on the GPU and the launch
configs runtime.decode_step uses. The table behind docs/decode.md's "Forms of the DSA step"; `specgen bench SPEC
--decode --decode-forms ...` times the same forms on the GPU.

Usage: python bench/dsa_decode_offline.py [SPEC] [--kernels selection index topk] [--only FORM ...] [--paged 0|1]
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
from specgen.runtime.decode_step import INDEX_FORMS, PAGED_INDEX_STAGES, SELECTION_FORMS, TOPK_FORMS  # noqa: E402

SEL_SIG = dict(BLOCK_TABLE="*i32:16", SEQLENS="*i32:16", O_PART="*fp32:16", LSE_PART="*fp32:16", IDX="*i32:16",
               B="i32", QL="i32", TCAP="i32", NSPLIT="i32", sm_scale="fp32")
IDX_SIG = dict(QI="*fp8e4nv:16", KI="*fp8e4nv:16", WI="*fp32:16", CHUNK="i32:16", BLOCK_TABLE="*i32:16", SEQLENS="*i32:16",
               WS="*fp32:16", H0="*i32:16", KS="*fp32:16", QL="i32", TCAP="i32", WS_ROW="i32", idx_scale="fp32")
TOPK_SIG = dict(WS="*fp32:16", SEQLENS="*i32:16", IDX="*i32:16", PART="*i32:16", ABOVE="*i32:16", STATE="*i64:16",
                H0="*i32:16", LST="*i32:16", CNT="*i32:16", QL="i32", WS_ROW="i32:16", ROWS="i32", NSEG="i32", SEG="i32:16")


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
        for fold in (0, 1):
            tag = "+fold" if fold else ""
            out[f"tile_q{ql}{tag}"] = ("_decode_index_scores_kernel",
                                       dict(PAGED=paged, QLP=qlp, BS=d.index_bs, WIDEN=0, FOLD=fold),
                                       8 if qlp * d.index_hp >= 256 else 4, 1)
            for name, form in INDEX_FORMS.items():
                if form is not None:
                    bs, stages, warps, _ = form
                    warps = max(warps, min(8, bs * qlp * d.index_hp // 4096))  # runtime.decode_step.index_scores
                    stages += PAGED_INDEX_STAGES if paged else 0
                    out[f"{name}_q{ql}{tag}"] = ("_decode_index_wide_kernel",
                                                 dict(PAGED=paged, QLP=qlp, BS=bs, WIDEN=0, FOLD=fold), warps, stages)
    return out


def topk_forms(d, paged: int) -> dict:
    """name -> (kernel, constexprs, warps, stages) of the top-k's kernels in each TOPK_FORMS form (1024 units a trip,
    16 partial histograms summed at once: the step's at 64k)."""
    out = {}
    for name, (k32, fold, listed, _segments) in TOPK_FORMS.items():  # segments: a host-side cap, not a constexpr
        flags = dict(BS=1024, SC=16, K32=int(k32), LIST=int(listed))
        for p in range(1 if fold else 0, 4):
            out[f"{name}_p{p}"] = ("_decode_topk_hist_kernel", dict(flags, P=p, FOLD=int(fold)), 4, 1)
        out[f"{name}_write"] = ("_decode_topk_write_kernel", flags, 4, 1)
    return out


def report(k) -> dict:
    """dot_report's fields and the number of PTX instructions (lines ending in ';' outside directives): the top-k's
    kernels are compares, shifts and histograms, so this is their size."""
    ptx = [x.strip() for x in k.asm["ptx"].splitlines()]
    return {**dot_report(k), "ptx_instr": sum(1 for x in ptx if x.endswith(";") and not x.startswith((".", "//")))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--kernels", nargs="*", default=["selection", "index", "topk"])
    ap.add_argument("--only", nargs="*", default=None, help="only these form names")
    ap.add_argument("--paged", type=int, default=1, choices=[0, 1], help="the paged (1) or contiguous (0) cache's kernel")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    d = mod._DECODE
    for kernel in args.kernels:
        sig, forms = {"selection": (SEL_SIG, selection_forms), "index": (IDX_SIG, index_forms),
                      "topk": (TOPK_SIG, topk_forms)}[kernel]
        forms = forms(d, args.paged)
        for name, (fn_name, consts, warps, stages) in forms.items():
            if args.only and name not in args.only:
                continue
            fn = getattr(mod, fn_name)
            params = fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount]
            ov = {k: v for k, v in sig.items() if k in params}
            ov.update({k: f"constexpr={v}" for k, v in consts.items() if k in params})
            r = compile_report(fn, dtype_of(mod), ov, warps, stages, error_chars=200, extra=report)
            rows.add({"spec": spec.name, "kernel": kernel, "form": name, "paged": args.paged, "warps": warps, "stages": stages, **r},
                     f"{kernel:9s} {name:16s} {r['error']}" if "error" in r else
                     f"{kernel:9s} {name:16s} w {warps:2d} st {stages}: {r['registers']:3d} regs "
                     f"{r['spill_bytes']:4d} spill {r['smem']:6d} B smem {r['wgmma']:3d} wgmma rep {r['rep']}  "
                     f"{fmt_dots(r['dots'])} ptx {r['ptx_instr']} instr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
