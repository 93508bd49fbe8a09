"""What the first use of a built spec costs: import, then the first forward (and backward) call, with Triton's
cache cold (compilation) and warm (a second process: what a user pays on every start once kernels are built).

Usage: python bench/first_use.py SPEC [--T 4096] [--json out.jsonl] [--profile stats.txt]
Target (issue 6): with the cache warm, the first call costs < 1 s beyond a steady-state call (no tuning at import or
first call: launch configs are baked in by `specgen build` from the spec's tuning record).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch, triton
import specgen
from specgen import reference
from specgen.testing import spec_of
t_imports = time.perf_counter()
mod = specgen.load(sys.argv[1])
t_import = time.perf_counter()
spec = spec_of(mod)
T = int(sys.argv[2])
dt = mod.DTYPE
x = reference.make_inputs(spec, 1, T, dtype=dt, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
fwd = getattr(mod, spec.family + "_forward")
torch.cuda.synchronize()
t1 = time.perf_counter(); fwd(**x); torch.cuda.synchronize(); t2 = time.perf_counter()
steady = triton.testing.do_bench(lambda: fwd(**x), warmup=3, rep=20, return_mode="median") / 1e3
attn = getattr(mod, spec.family + "_attention")
names = [n for n in x if n not in ("q_idx", "k_idx", "w_idx")]
leaf = {n: (v.detach().clone().requires_grad_(True) if n in names else v) for n, v in x.items()}
torch.cuda.synchronize()
profile_to = os.environ.get("FIRST_USE_PROFILE")
if profile_to:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
t3 = time.perf_counter(); attn(**leaf).float().sum().backward(); torch.cuda.synchronize(); t4 = time.perf_counter()
if profile_to:
    import io, pstats
    prof.disable()
    with open(profile_to, "w") as f:
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=f).sort_stats(key).print_stats(40)
def step():
    attn(**leaf).float().sum().backward()
steady_train = triton.testing.do_bench(step, warmup=2, rep=20, return_mode="median") / 1e3
print(json.dumps({"python_imports_s": t_imports - t0, "specgen_load_s": t_import - t_imports,
                  "first_forward_s": t2 - t1, "steady_forward_s": steady,
                  "first_fwd_bwd_s": t4 - t3, "steady_fwd_bwd_s": steady_train}))
"""


def run_child(spec: str, T: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, spec, str(T)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("--profile", help="also write a cProfile of a warm first forward+backward to this file")
    args = ap.parse_args()
    import torch
    import triton

    with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as specgen_cache, \
            tempfile.TemporaryDirectory() as pycache:
        # Bytecode caches as on any machine where Python may write them: without them (a read-only environment)
        # the warm process recompiles every module torch imports lazily on the first backward (1.3 s measured).
        env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "SPECGEN_CACHE": specgen_cache,
               "PYTHONPYCACHEPREFIX": pycache}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cold = run_child(args.spec, args.T, env)
        warm = run_child(args.spec, args.T, env)
        if args.profile:
            # A third warm process, its first forward+backward under cProfile (not the timed one: cProfile slows it).
            run_child(args.spec, args.T, {**env, "FIRST_USE_PROFILE": args.profile})
    over = {k: warm[f"first_{k}_s"] - warm[f"steady_{k}_s"] for k in ("forward", "fwd_bwd")}
    rec = {"kind": "first_use", "spec": os.path.basename(args.spec).removesuffix(".yaml"),
           "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "commit": os.environ.get("SPECGEN_COMMIT", "unknown"), "torch": torch.__version__,
           "triton": triton.__version__, "T": args.T, "batch": 1, "regime": "random",
           "cold_cache": cold, "warm_cache": warm, "warm_first_call_overhead_s": over,
           "meaning": "cold: empty Triton, specgen and Python bytecode caches (render + compile); warm: a second "
                      "process, caches kept; overhead = first call - steady-state call"}
    print(json.dumps(rec))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
