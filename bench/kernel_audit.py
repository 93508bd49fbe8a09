"""Offline audit (sm_90, no GPU) of every Triton kernel a generated module launches, at the launch configs the
module uses: registers, spill bytes, shared memory, wgmma / mma.sync instructions in the PTX, and each matrix
product's tile shape against the rows its layout covers (replicated products: Triton 3.6 lays a wgmma tile's rows
over all warps, 64 rows per warpgroup, so a tile of fewer rows than 64 x warpgroups is computed once per
warpgroup; docs/backward.md, "Launch configs of the compression and window backward").

Usage: python bench/kernel_audit.py [SPEC ...] [--out DIR] [--jobs 2] [--kernel SUBSTR ...] [--configs default record]

How: a capture process (Triton's CPU interpreter) runs each spec's module at a tiny shape through the forward
(block-granularity selection in both loop orders: the spec with selection.loop_order query, then kv), backward
(and, with the scatter path, the deterministic inverse-index kernels), a decode step, `index_topk` and the
distillation loss of both stages, recording every launch: the kernel, the types of its arguments, its
constexprs and num_warps / num_stages. With `--configs record` the module's tuning-record configs (the H100's
entry of CONFIGS, from specs/<name>.tune.json) replace the defaults for a second capture. Each distinct launch is
then compiled for sm_90 with its operands aligned as the JIT specialises them on the GPU (every pointer, the
strides and sizes bench/compile_offline.py's --aligned names), and its TTGIR read for the products' layouts.
Writes DIR/kernel_audit.jsonl (one row per distinct launch) and prints the table; DIR defaults to a temporary
folder (nothing is cached in the repo).

Columns: rows x cols x k of each product (`dots`), `cover` = rows the layout's warps span (16 per warp along M,
so 64 per warpgroup for wgmma), `rep` = the worst product's replication (cover / rows; 1 = none), `wg`/`mma` =
wgmma / mma.sync instructions in the PTX.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SPECS = ["specs/models/model_llama3_8b.yaml", "specs/models/model_qwen25_7b.yaml",
         "specs/models/model_gemma2_9b.yaml", "specs/models/model_mha16_d64.yaml", "specs/nsa_paper.yaml",
         "specs/nsa_config_a.yaml", "specs/dsa_v32.yaml", "specs/models/dsa_gqa16_4.yaml"]
RECORD_GPU = "NVIDIA H100 80GB HBM3"
# Integer arguments the JIT sees divisible by 16 at realistic shapes (contiguous operands whose head dims are
# multiples of 8, T a multiple of 16): bench/compile_offline.py's --aligned set plus the runtime's other names.
ALIGNED_INT_PREFIX = ("stride_q", "stride_k", "stride_v", "stride_o", "stride_do", "T", "q_split", "split_stride")


# ---------------------------------------------------------------------------------------------------------------
# Capture (runs under TRITON_INTERPRET=1 in a child process)

EXECUTE = re.compile(r"pool|select|index|topk")

def _arg_type(v):
    import torch
    if isinstance(v, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                      torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8",
                      torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if abs(v) >= 2 ** 31 else "i32"
    if isinstance(v, float):
        return "fp32"
    if v is None:
        return "none"
    return type(v).__name__


def _install_recorder(log: list, phase: list):
    import inspect

    import torch

    from triton.runtime.interpreter import InterpretedFunction
    orig = InterpretedFunction.run
    memo: dict = {}
    seen: dict = {}  # launches of one key so far in this pass (reset per pass)
    phase.append(seen)

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        launch = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        sig, const = {}, {}
        for n in names:
            if n not in bound:
                d = params[n].default
                if d is inspect.Parameter.empty:
                    continue
                bound[n] = d
            v = bound[n]
            if "constexpr" in str(params[n].annotation):
                const[n] = v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
            else:
                sig[n] = _arg_type(v)
        name = self.fn.__name__
        log.append({"kernel": name, "phase": phase[0], "sig": sig, "constexprs": const,
                    "num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 3)})
        # Only the kernels whose outputs steer the host (pooled keys feeding the scorer, the selection, the
        # top-k) run: the rest is recorded, not interpreted (their values feed no host decision).
        # A repeated launch on the same inputs (the backward's forward, the record configs' pass) copies the
        # first one's results instead of interpreting again.
        if EXECUTE.search(name) and "bwd" not in name:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            key = (name, tuple((tuple(t.shape), t.dtype) for t in tensors),
                   tuple(a for a in args if isinstance(a, (int, float))))
            seen[key] = seen.get(key, 0) + 1
            key = (*key, seen[key])
            if key in memo:
                for t, saved in zip(tensors, memo[key]):
                    t.copy_(saved)
                return None
            r = orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            memo[key] = [t.clone() for t in tensors]
            return r

    InterpretedFunction.run = run


def _phases(module, spec, B: int, T: int):
    """(name, thunk) of each pass the audit runs at a tiny shape."""
    import torch

    from specgen import reference
    from specgen.testing import differentiable_inputs, deterministic_algorithms, scatters

    gen = torch.Generator().manual_seed(0)
    inputs = {k: v.to(module.DTYPE) for k, v in reference.make_inputs(spec, B, T, generator=gen,
                                                                          dtype=torch.float32).items()}
    fam = spec.family

    def forward():
        module.__dict__[f"{fam}_forward"](**inputs, return_lse=True)

    def backward(deterministic=False):
        x = {k: (v.detach().clone().requires_grad_(k in differentiable_inputs(spec)) if torch.is_tensor(v) else v)
             for k, v in inputs.items()}
        with deterministic_algorithms(deterministic):
            out = module.__dict__[f"{fam}_attention"](**x)
            out.backward(torch.randn_like(out))

    def decode():
        from specgen.testing.decode import check_decode
        check_decode(module, spec, [T - 2], steps=1, compare_prefill=False)

    phases = [("forward", forward), ("backward", backward)]
    if scatters(module):
        phases.append(("backward_deterministic", lambda: backward(True)))
    if getattr(spec, "decode", None) is not None:
        phases.append(("decode", decode))
    if hasattr(module, "index_topk"):
        # With scores: a tiny T has fewer candidates than top_k, and only then does every row run the scorer.
        phases.append(("index_topk", lambda: module.index_topk(inputs["q_idx"], inputs["k_idx"], inputs["w_idx"],
                                                               return_scores=True)))
    if hasattr(module, "distill_loss"):
        for stage in ("dense", "sparse"):
            def distill(stage=stage):
                tr = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q_idx", "k_idx", "w_idx")}
                module.distill_loss(inputs["q"], inputs["k"], **tr, stage=stage).backward()
            phases.append((f"distill_{stage}", distill))
    return phases


def capture(path: str, order: str | None, configs: list, T: int) -> list[dict]:
    """Every launch of the spec's module (selection.loop_order = `order` when given) at B = 1, T tokens, under
    each of `configs` ("default": the plan's launch configs; "record": the tuning record's H100 entry)."""
    import warnings

    spec, module = _spec_and_module(path, order)
    default = dict(module.CONFIGS["default"])
    log, phase = [], [""]
    _install_recorder(log, phase)
    for which in configs:
        entry = module.CONFIGS.get(RECORD_GPU) if which == "record" else {}
        if which == "record" and not entry:
            continue
        # Per kernel, the record's fields over the default's (as runtime.indexer.configs reads a record tuned
        # before a field existed; elsewhere a missing field is the kernel's own default, the same value).
        module.CONFIGS["default"] = {k: {**default.get(k, {}), **entry.get(k, {})} for k in {*default, *entry}}
        for name, thunk in _phases(module, spec, 1, T):
            phase[0] = f"{name}@{which}"
            phase[1].clear()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    thunk()
            except Exception as e:  # noqa: BLE001 (values are garbage or wrong under the interpreter: checks fail)
                log.append({"phase": phase[0], "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return log


# ---------------------------------------------------------------------------------------------------------------
# Compile (TRITON_INTERPRET=0)

DOT_RE = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) .*?-> tensor<(\d+)x(\d+)x\w+, (#[\w]+)>")
A_RE = re.compile(r"(?:tensor|memdesc)<(\d+)x(\d+)x")
LAYOUT_RE = re.compile(r"^(#[\w]+) = #ttg\.nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, "
                       r"warpsPerCTA = \[(\d+), (\d+)\].*?instrShape = \[(\d+), (\d+)", re.M)


def dots_of(ttgir: str) -> list[dict]:
    """Each matrix product of the TTGIR: rows, cols, k, MMA version, warps along rows/cols, and the rows and
    columns its warps cover (16 rows a warp; a wgmma's columns per warpgroup are its instruction's N)."""
    layouts = {m[0]: (int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in LAYOUT_RE.findall(ttgir)}
    out = []
    for line in ttgir.splitlines():
        m = DOT_RE.search(line)
        if not m:
            continue
        rows, cols, lay = int(m.group(1)), int(m.group(2)), m.group(3)
        a = A_RE.search(line.split(":", 1)[1]) if ":" in line else None
        k = int(a.group(2)) if a else 0
        ver, wm, wn, _, instr_n = layouts.get(lay, (0, 1, 1, 16, 8))
        cover_r = 16 * wm
        cover_c = (instr_n if ver == 3 else 8) * wn
        out.append({"m": rows, "n": cols, "k": k, "v": ver, "warps": [wm, wn],
                    "rep": max(1, cover_r // rows) * max(1, cover_c // cols)})
    return out


def dot_report(k) -> dict:
    """A compiled kernel's matrix products (dots_of its TTGIR) and the worst one's replication (`rep`)."""
    dots = dots_of(k.asm["ttgir"])
    return {"dots": dots, "rep": max([d["rep"] for d in dots], default=1)}


def compile_launch(task: dict) -> dict:
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, HERE)
    from compile_offline import kernel_report
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    _, module = _spec_and_module(task["path"], task["order"])
    fn = getattr(module, task["kernel"])
    sig, attrs = {}, {}
    import inspect
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    # Constexprs the launch left at their defaults (or that a newer kernel added) take the signature's default.
    constexprs = {n: p.default for n, p in params.items()
                  if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}
    constexprs.update(task["constexprs"])
    if "WIDEN" in constexprs:  # the interpreter's fp32 dots: on the GPU the spec's dtype goes to the matrix unit
        constexprs["WIDEN"] = False
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        t = task["sig"].get(n, "i32")
        if t == "none":
            sig[n], constexprs[n] = "constexpr", None
            continue
        sig[n] = t
        if t.startswith("*") or (t in ("i32", "i64") and n.startswith(ALIGNED_INT_PREFIX)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    row = {k: task[k] for k in ("spec", "kernel", "phases", "num_warps", "num_stages", "configs")}
    row["constexprs"] = {k: v for k, v in task["constexprs"].items() if k != "WIDEN"}
    try:
        k = triton_compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": task["num_warps"], "num_stages": task["num_stages"]})
    except Exception as e:  # noqa: BLE001 (a launch the compiler rejects is a finding too)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row.update(kernel_report(k), **dot_report(k), compile_s=round(time.time() - t0, 1))
    return row


def _capture_child(args) -> list[dict]:
    path, order, configs, T, reuse = args
    if reuse and os.path.exists(reuse):
        with open(reuse) as f:
            return json.load(f)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--capture", path, "--order", order or "-", "--configs", *configs, "-T", str(T)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return [{"spec": path, "error": r.stderr[-800:]}]
    log = json.loads(r.stdout.strip().splitlines()[-1])
    if reuse:
        with open(reuse, "w") as f:
            json.dump(log, f)
    return log


def _spec_and_module(path: str, order: str | None):
    """The spec as written (None: its module carries its tuning record's configs), or with selection.loop_order
    forced to `order` (another spec hash: no record applies)."""
    import specgen
    from specgen.model.spec import load_spec, replace

    if order is None:
        return load_spec(path), specgen.load(path)
    spec = load_spec(path)
    spec = replace(spec, name=f"{spec.name}_{order}", **{"selection.loop_order": order})
    return spec, specgen.load(spec)


def orders_for(path: str) -> list:
    """The spec as written, and for block selection the loop order its forward does not take (forced, both passes),
    so that both orders' kernels are audited."""
    from specgen.compile.loop_order import orders
    from specgen.model.spec import KV_ORDER_MIN_BLOCK, load_spec
    spec = load_spec(path)
    sel = spec.selection
    if sel is not None and sel.granularity == "block" and sel.block >= KV_ORDER_MIN_BLOCK:
        return [None, "query" if orders(spec)[0] == "kv" else "kv"]
    return [None]


def fmt_dots(dots: list[dict]) -> str:
    seen = []
    for d in dots:
        s = f"{d['m']}x{d['n']}x{d['k']}" + (f"/r{d['rep']}" if d["rep"] > 1 else "")
        if s not in seen:
            seen.append(s)
    return " ".join(seen)


PASS_TAGS = {"forward": "f", "backward": "b", "backward_deterministic": "bd", "decode": "dec", "index_topk": "idx",
             "distill_dense": "dd", "distill_sparse": "ds"}


def table(rows: list[dict]) -> str:
    lines = [f"{'spec':22s} {'kernel':36s} {'configs':7s} {'passes':10s} {'w':>2s} {'st':>2s} {'regs':>4s} "
             f"{'spill':>5s} {'smem':>6s} {'wg':>4s} {'mma':>4s} {'rep':>3s}  dots (rows x cols x k, /rN: replicated "
             f"N times)"]
    for r in rows:
        cfg = "+".join(c[:3] for c in r["configs"].split("+"))
        passes = ",".join(PASS_TAGS.get(p, p) for p in r["phases"])
        head = (f"{r['spec'][:22]:22s} {r['kernel'][:36]:36s} {cfg:7s} {passes[:10]:10s} {r['num_warps']:2d} "
                f"{r['num_stages']:2d}")
        if "error" in r:
            lines.append(f"{head} ERROR {r['error'][:120]}")
            continue
        flag = " <<" if r["rep"] > 1 or r["spill_bytes"] > 0 else ""
        lines.append(f"{head} {r['registers']:4d} {r['spill_bytes']:5d} {r['smem']:6d} {r['wgmma']:4d} "
                     f"{r['mma_sync']:4d} {r['rep']:3d}  {fmt_dots(r['dots'])}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--out", default=None, help="folder for kernel_audit.jsonl and kernel_audit.txt")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--kernel", nargs="*", default=None, help="only kernels whose name contains one of these")
    ap.add_argument("--configs", nargs="*", default=["default", "record"])
    ap.add_argument("--reuse-captures", action="store_true",
                    help="keep each capture's launches in DIR/captures/ and reuse them when present (recompile only)")
    ap.add_argument("-T", type=int, default=96, help="tokens of the capture run (tiny: the interpreter runs it)")
    ap.add_argument("--capture", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--order", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture:
        log = capture(args.capture, None if args.order == "-" else args.order, args.configs, args.T)
        print(json.dumps(log))
        return 0

    t0 = time.time()
    out = args.out or tempfile.mkdtemp(prefix="kernel_audit_")
    os.makedirs(os.path.join(out, "captures"), exist_ok=True)

    def saved(p, o):
        if not args.reuse_captures:
            return None
        return os.path.join(out, "captures", os.path.basename(p).rsplit(".", 1)[0] + f"_{o}_{'_'.join(args.configs)}.json")
    jobs = [(p, o, args.configs, args.T, saved(p, o)) for p in args.specs for o in orders_for(p)]
    tasks: dict = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for (path, order, _, _, _), log in zip(jobs, pool.map(_capture_child, jobs)):
            name = os.path.basename(path).rsplit(".", 1)[0] + (f"_{order}" if order else "")  # forced order
            for entry in log:
                configs = entry.get("phase", "@").split("@")[1]
                if "error" in entry:
                    if entry["error"].startswith("AssertionError"):
                        continue  # a check on values (garbage: most kernels are recorded, not run)
                    print(f"capture {name} {configs} {entry.get('phase', '')}: {entry['error'][:300]}", file=sys.stderr)
                    continue
                if args.kernel and not any(s in entry["kernel"] for s in args.kernel):
                    continue
                key = json.dumps([path, order, entry["kernel"], entry["sig"], entry["constexprs"],
                                  entry["num_warps"], entry["num_stages"]], sort_keys=True)
                if key in tasks:
                    t = tasks[key]
                    if entry["phase"].split("@")[0] not in t["phases"]:
                        t["phases"].append(entry["phase"].split("@")[0])
                    if configs not in t["configs"]:
                        t["configs"] += "+" + configs
                    continue
                tasks[key] = {"path": path, "order": order, "spec": name, "configs": configs,
                              "phases": [entry["phase"].split("@")[0]], **{k: entry[k] for k in ("kernel", "sig", "constexprs",
                                                                                    "num_warps", "num_stages")}}
        print(f"captured {len(tasks)} distinct launches in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        rows = list(pool.map(compile_launch, tasks.values()))
    with open(os.path.join(out, "kernel_audit.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    text = table(rows)
    with open(os.path.join(out, "kernel_audit.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"{len(rows)} launches, {time.time() - t0:.0f} s; {out}/kernel_audit.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
