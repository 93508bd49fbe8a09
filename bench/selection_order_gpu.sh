#!/usr/bin/env bash
# One device-tool call for the selection loop orders (issue 16): the CPU tests on the GPU, real-size bf16 checks of
# both orders against float64, then both orders timed in one process. Logs land in $OUT.
# Usage: SPECGEN_COMMIT=<sha> bash bench/selection_order_gpu.sh "SEQLENS" SPEC...
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
c=${SPECGEN_COMMIT:-unknown}
seqlens=$1; shift
python -m pytest -q tests/test_selection_order.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_selection_order_$c.log"
python - "$@" <<'PY' 2>&1 | tee -a "$OUT/gpu_tests_selection_order_$c.log"
import sys, torch, specgen
from specgen import testing
from specgen.model.spec import load_spec, replace
for path in sys.argv[1:2]:
    base = load_spec(path)
    for order in ("query", "kv"):
        spec = replace(base, name=f"{base.name}_{order}", **{"selection.loop_order": order})
        mod = specgen.load(spec)
        r = testing.check_forward(mod, spec, 1, 4099)
        print(spec.name, "forward T=4099 bf16 vs float64:", "out_err", r.out_err, "lse_err", r.lse_err, flush=True)
        testing.check_backward(mod, spec, 1, 2051)
        print(spec.name, "backward T=2051 bf16 vs float64: ok", flush=True)
PY
python bench/selection_order.py --seqlens $seqlens --out "$OUT" "$@" 2>&1 | grep -v Warn | tee "$OUT/bench_selection_order_$c.log"
