"""Compile a generated module's kernel for the H100 (sm_90) on a machine without a GPU and print what the
compiler made of it: registers per thread, spills, shared memory. Triton's bundled ptxas does the work, so a
register or spill regression shows before any device time is spent.

Usage: python bench/compile_offline.py SPEC KERNEL [--warps 4] [--stages 1] [--sig NAME=TYPE ...] [--aligned]
Pointer arguments default to the spec's dtype (*bf16), integers to i32, floats to fp32; constexprs (WIDEN) to
their default. A type `TYPE:16` (`*bf16:16`, `i32:16`) tells the compiler the argument is divisible by 16, as
Triton's JIT specialises it on the GPU (16-byte-aligned tensors, sizes and strides that are multiples of 16);
`--aligned` says so of every pointer and of the Q/K/V strides, T and the split sizes (contiguous operands whose
head dims are multiples of 8): without it the compiler cannot vectorise or pipeline the tile loads (cp.async needs
aligned addresses) and reports a kernel unlike the one the GPU runs. An experiment tool: the record of truth is the device's compiler report (`specgen bench`).

Also the library of the other offline reports (bench/cmp_bwd_offline.py, bench/distill_offline.py,
bench/dsa_fwd_offline.py, bench/kernel_audit.py): `compile_kernel`, `resource_usage`, `dtype_of` (a module's pointer type), `kernel_report`
(what a compiled kernel uses) and `compile_report` (compile one launch config and report it, a rejected config
being a result too), and `Rows` (rows printed as they come and appended to a JSON-lines file).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # compile, do not interpret (specgen turns it on without a GPU)
import triton  # noqa: E402

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

import specgen
from specgen.model.spec import load_spec

H100 = GPUTarget("cuda", 90, 32)
INTS = {"T", "NC", "TC", "NCV", "QL", "N_UNITS"}  # upper-case scalar arguments (sizes)


ALIGNED_INTS = ("stride_q", "stride_k", "stride_v", "T", "q_split", "split_stride")


def compile_kernel(fn, dtype: str, overrides: dict, num_warps: int, num_stages: int, aligned: bool = False):
    sig, constexprs = {}, {}
    params = inspect.signature(fn.fn).parameters
    for name, p in params.items():
        if name in overrides:
            if overrides[name].startswith("constexpr="):
                constexprs[name] = int(overrides[name].split("=", 1)[1])
                sig[name] = "constexpr"
            else:
                sig[name] = overrides[name]
        elif "constexpr" in str(p.annotation):
            constexprs[name] = p.default if p.default is not inspect.Parameter.empty else 0
            sig[name] = "constexpr"
        elif name in INTS or name.startswith(("stride", "n_")) or name == "t0":
            sig[name] = "i32"
        elif name.isupper():
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32"
        if aligned and sig[name] != "constexpr" and (sig[name].startswith("*") or name.startswith(ALIGNED_INTS)):
            sig[name] = sig[name].split(":")[0] + ":16"
    attrs = {}
    for i, name in enumerate(params):
        if sig[name].endswith(":16"):
            sig[name] = sig[name][:-3]
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton_compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from cuobjdump's resource report of the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"),
                               "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    spills = re.search(r"STACK:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def dtype_of(mod) -> str:
    """The pointer type of a generated module's tensors (its DTYPE): compile_kernel's `dtype`."""
    return DTYPES[str(mod.DTYPE)]


def kernel_report(k) -> dict:
    """What a compiled kernel uses: registers per thread, spill-store bytes, shared memory, and the matrix
    instructions of its PTX (wgmma, mma.sync)."""
    regs, spill = resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    return {"registers": regs, "spill_bytes": spill, "smem": k.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")}


def compile_report(fn, dtype: str, overrides: dict, num_warps: int, num_stages: int, *, aligned: bool = True,
                   error_chars: int = 300, extra=None) -> dict:
    """compile_kernel with the operands aligned (by default) and its kernel_report, `extra(kernel)`'s fields if
    given (kernel_audit.dot_report: the matrix products), and `compile_s`; a config the compiler rejects is a
    result too: {"error": "<exception>: <its first error_chars characters>"}."""
    t0 = time.time()
    try:
        k = compile_kernel(fn, dtype, overrides, num_warps, num_stages, aligned=aligned)
    except Exception as e:  # noqa: BLE001 (a config the compiler rejects is a result too)
        return {"error": f"{type(e).__name__}: {str(e)[:error_chars]}"}
    return {**kernel_report(k), **(extra(k) if extra else {}), "compile_s": round(time.time() - t0, 1)}


def loop_report(k) -> list[dict]:
    """Per loop of the compiled kernel's SASS (a backward branch: body from its target to the branch): instructions,
    wgmma (HGMMA), wgmma waits (WARPGROUP.DEPBAR), barriers, shuffles, special-function ops, local-memory spill
    traffic (STL, LDL) and asynchronous copies (LDGSTS). As many waits as HGMMA means ptxas serialised the
    products (it does so for a whole kernel when it runs short of registers), not just Triton's one wait a dot."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    pats = {"instr": r"", "hgmma": r"HGMMA", "waits": r"WARPGROUP\.DEPBAR", "bar": r"BAR\.SYNC", "shfl": r"SHFL",
            "mufu": r"MUFU", "stl": r"\bSTL", "ldl": r"\bLDL", "ldgsts": r"LDGSTS"}
    out = []
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            out.append({k: sum(1 for t in body if re.search(v, t)) for k, v in pats.items()})
    return out


class Rows:
    """A report's rows: each printed as it comes (flushed), and appended as one JSON line to `path` if given."""

    def __init__(self, path: str | None):
        self.out = open(path, "a") if path else None

    def add(self, row: dict, text: str) -> None:
        print(text, flush=True)
        if self.out:
            self.out.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("kernel")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--sig", nargs="*", default=[], help="NAME=TYPE overrides, e.g. LSE=*fp32 IDX=*i32")
    ap.add_argument("--aligned", action="store_true", help="pointers, Q/K/V strides, T and split sizes divisible by 16")
    args = ap.parse_args(argv)
    mod = specgen.load(load_spec(args.spec))
    overrides = dict(s.split("=", 1) for s in args.sig)
    k = compile_kernel(getattr(mod, args.kernel), dtype_of(mod), overrides, args.warps, args.stages, args.aligned)
    r = kernel_report(k)
    print(f"{args.kernel}: {r['registers']} registers, {r['spill_bytes']} spill bytes (stores), {r['smem']} B shared "
          f"({args.warps} warps, {args.stages} stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
