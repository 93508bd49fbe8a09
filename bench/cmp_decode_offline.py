"""Offline compile report (sm_90, no GPU) of the NSA decode's compression kernel (`_decode_compression_kernel`, the
partials path) in each compression form (runtime.decode_step.CMP_FORMS): registers, spill bytes, shared memory, how
many programs one SM holds (registers x threads and shared memory, 64K registers and 228 KiB an SM), and what the
software pipeline keeps in flight: the copy groups the loop's first wait leaves outstanding (0: the tile's copies
were issued after the previous tile's last product, so each tile waits a full memory round trip) and the key tiles
that makes per program and per SM. The table behind docs/decode.md's "Compression forms"; `specgen bench SPEC
--decode --decode-forms cmp_base cmp_s3 ...` times the same forms on the GPU.

The fused launch form's `_decode_cmp_win_kernel` (`--launch fused`: the compression and window branches in one
kernel, at the form's stages and warps, paged) must fit too: its shared memory is the larger branch's. So must the
whole launch form's `_decode_whole_kernel` (`--launch whole`: the whole step in one program, every branch and the
top-n at the form's stages and warps, paged; `--context` sets the top-n's row of selection blocks). So must the
persist launch form's `_decode_persist_kernel` (`--launch persist`: every phase of the split form in one kernel at
the compression's warps and stages, paged, its constexprs as at batch 1 on an H100: `--context` sets the top-n's
chunks, the compression's 64 splits and the epilogue's batch-1 tiles are the runtime's there).

Usage: python bench/cmp_decode_offline.py [SPEC] [--q-lens 1 2 4] [--only FORM ...]
       [--launch split fused whole whole_st persist]
       [--context 65536] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import Rows, compile_kernel, kernel_report  # noqa: E402

import specgen  # noqa: E402
from specgen.model.spec import load_spec  # noqa: E402
from specgen.runtime import decode_step, decode_whole  # noqa: E402

SIG = dict(BLOCK_TABLE="*i32:16", SEQLENS="*i32:16", O_PART="*fp32:16", LSE_PART="*fp32:16", LOGITS="*fp32:16",
           SC_SUM="*fp32:16", SC_REF="*fp32:16", B="i32", QL="i32", TCAP="i32", NSPLIT="i32", sm_scale="fp32",
           O_C="*fp32:16", L_C="*fp32:16", O_W="*fp32:16", L_W="*fp32:16", NCCAP="i32", NSPLIT_C="i32",
           NSPLIT_W="i32", O_S="*fp32:16", L_S="*fp32:16", IDX="*i32:16", LSE_OUT="*fp32:16", NSEL="i32",
           stride_gb="i32", stride_gt="i32", stride_gh="i32", CAND="*i64:16", TICKETS="*i32:16",
           COUNTERS="*i32:16", NCH="i32", NSPLIT_S="i32")
KERNELS = {"split": "_decode_compression_kernel", "fused": "_decode_cmp_win_kernel",
           "whole": "_decode_whole_kernel", "whole_st": "_decode_whole_kernel",
           "persist": "_decode_persist_kernel"}  # the launch forms' kernels
SM_REGS, SM_SMEM, CTA_RESERVED = 65536, 233472, 1024  # sm_90: registers and shared memory an SM, reserved a CTA


def rt_combine_tiles(rows: int, dv: int, splits: int, sb_cap: int) -> tuple:
    """runtime.decode_combine_tiles on an H100's 132 SMs (this machine has no GPU to ask)."""
    from unittest import mock

    from specgen import runtime
    with mock.patch.object(runtime, "_sm_count", lambda device: 132):
        return runtime.decode_combine_tiles(rows, dv, splits, "cuda", sb_cap)


def loop_in_flight(ttgir: str) -> tuple[int, int]:
    """(copy groups the first key loop's first wait leaves outstanding, copy groups the loop issues a trip: one a
    tile's key or value part) of the compiled TTGIR (ttg.async_wait {num = N}; in the fused kernel the first loop
    is the compression branch's)."""
    loop = ttgir[ttgir.index("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    return (int(re.search(r"ttg\.async_wait[^\n]*\{num = (\d+)", loop).group(1)),
            loop.count("ttg.async_copy_global_to_local"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/nsa_paper.yaml")
    ap.add_argument("--q-lens", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--only", nargs="*", default=None, help="only these form names")
    ap.add_argument("--launch", nargs="*", default=["split"], choices=list(KERNELS))
    ap.add_argument("--context", type=int, default=65536, help="the cache's tokens (the whole form's top-n row)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = Rows(args.json)
    spec = load_spec(args.spec)
    mod = specgen.load(spec)
    d = mod._DECODE
    n_sel = -(-args.context // d.sel_block)
    for launch, name, ql in [(launch, name, ql) for launch in args.launch for name in decode_step.CMP_FORMS
                             for ql in args.q_lens if not args.only or name in args.only]:
        fn = getattr(mod, KERNELS[launch])
        params = fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount]
        dd = dataclasses.replace(d, cmp_form=name)
        tile, stages, warps, resident = decode_step.cmp_launch(dd, 2, ql)
        if launch in decode_step.WHOLE_FORMS:  # the whole kernel's own launch (3 stages at least on cmp_base)
            tile, stages, warps = decode_whole.launch(dd, (tile, stages, warps))
        qlp, gp, chunks = decode_step.split_rows(dd, "compression", ql)
        _, sc_cols, back = decode_step.score_tiles(dd)
        consts = dict(PAGED=int(launch != "split"), QLP=qlp, GP=gp, HEAD_CHUNKS=chunks, BLOCK_N=tile,
                      BLOCK_C=tile, BLOCK_W=d.split_tiles["window"], WIDEN=0, SCORES=2, SC_COLS=sc_cols)
        if launch in decode_step.WHOLE_FORMS:  # decode_whole.step's constexprs
            consts.update(GP_S=decode_step.split_rows(dd, "selection", ql)[1], BLOCK_S=d.split_tiles["selection"],
                          GP_T=1 << (d.group - 1).bit_length(), NSEL_PAD=1 << (n_sel - 1).bit_length(), BACK=back,
                          BD=decode_whole.epilogue_cols(d, qlp * gp), STAGGER=int(launch == "whole_st"))
        if launch == "persist":  # decode_persist.step's constexprs at batch 1 on an H100 (runtime.decode_splits: 64)
            cb, _, nch_pad, _ = decode_step.topn_chunks(dd, n_sel, "chunked_ticket")
            br, bd, sb, _ = rt_combine_tiles(ql * d.hq, d.dv, 64, d.combine_sb)
            s_rows = decode_step.split_rows(dd, "selection", ql)
            consts.update(GP_S=s_rows[1], HEAD_CHUNKS_S=s_rows[2], BLOCK_S=d.split_tiles["selection"],
                          GP_T=1 << (d.group - 1).bit_length(), NSPLIT_PAD=64, BACK=back, CB=cb, NCH_PAD=nch_pad,
                          BR=br, BD=bd, SB=sb)
        ov = {k: v for k, v in SIG.items() if k in params}
        ov.update({k: f"constexpr={v}" for k, v in consts.items() if k in params})
        row = {"spec": spec.name, "launch": launch, "form": name, "q_len": ql, "tile": tile, "stages": stages,
               "warps": warps, "resident": resident}
        if launch in decode_step.WHOLE_FORMS:
            row["context"] = args.context
        try:
            k = compile_kernel(fn, "bf16", ov, warps, stages, aligned=True)
        except Exception as e:  # noqa: BLE001 (a config the compiler rejects is a result too)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.add(row, f"{launch:5s} {name:12s} q_len {ql}: {row['error']}")
            continue
        r = kernel_report(k)
        per_warp = -(-r["registers"] * 32 // 256) * 256  # registers are allocated 256 a warp at a time
        by_regs = SM_REGS // (per_warp * warps) if r["registers"] > 0 else 0
        by_smem = SM_SMEM // (r["smem"] + CTA_RESERVED)
        held = min(by_regs, by_smem)
        outstanding, per_trip = loop_in_flight(k.asm["ttgir"])
        tiles_ahead = outstanding // max(per_trip, 1)
        tile_kb = tile * (d.dqk + d.dv) * 2 / 1024
        row.update(r, held_per_sm=held, by_regs=by_regs, by_smem=by_smem, wait_leaves=outstanding,
                   tiles_in_flight_while_computing=tiles_ahead,
                   kb_in_flight_per_sm=round(held * tiles_ahead * tile_kb, 1))
        rows.add(row, f"{launch:5s} {name:12s} q_len {ql}: {tile:3d} keys x {stages} stages, {warps} warps: "
                      f"{r['registers']:3d} regs {r['spill_bytes']:4d} spill {r['smem']:6d} B smem -> {held} "
                      f"an SM (regs {by_regs}, smem {by_smem}); loop wait leaves {outstanding} copy groups: "
                      f"{tiles_ahead} tile(s) of {tile_kb:.0f} KB in flight while a tile computes, "
                      f"{row['kb_in_flight_per_sm']:.0f} KB an SM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
