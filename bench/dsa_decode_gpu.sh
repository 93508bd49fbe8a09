#!/usr/bin/env bash
# DSA (dsa_v32) decoding toward its byte floor (issue 19), one device call of at most 4 minutes: the kernel forms
# of the step (docs/decode.md, "Forms of the DSA step") checked on CUDA, then timed against the plan's forms on the
# same caches.
#   1. tests (TEST_TIMEOUT 120 s): tests/test_decode_forms.py on CUDA (every form against the float64 reference near
#      64k of context, paged q_len 4 and contiguous q_len 1, a CUDA graph replay; the small cases in fp16 on the
#      GPU's matrix units), and generated/test_dsa_v32.py's realistic and graph decode tests (the plan's forms).
#   2. bench (BENCH_TIMEOUT 110 s): `specgen bench specs/dsa_v32.yaml --decode --batches 1 64 --seqlens 65536
#      --decode-forms plan base+tile ks_pf+wide ks_pf_s2+wide_k64`: one row per forms on each cache (eager and
#      graph-replayed step, x floor, per-kernel times in the record), every selection and index form once (`plan` is
#      ks_pf_k32+wide_w8 since the H200 timing of 2026-12-07; base+tile the forms before it).
#   bash bench/dsa_decode_gpu.sh        # both phases; PHASE=tests or PHASE=bench runs one; FORMS="plan ks_pf+wide"
# Files under $OUT (4): dsa_decode_tests.log, dsa_decode_bench.log, results/<day>_dsa_v32_decode.jsonl, nvidia-smi.txt.
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/results"
PHASE=${PHASE:-all}
gpu_smi > "$OUT/nvidia-smi.txt"
header() {
  echo "# $1, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python -c "import torch, triton, sys; print(f'# python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"
}
rc=0
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  LOG="$OUT/dsa_decode_tests.log"
  header "dsa_v32 decode forms on CUDA" | tee "$LOG"
  timeout ${TEST_TIMEOUT:-120} python -m pytest -v -rfEs --tb=short -p no:cacheprovider --durations=8 \
      tests/test_decode_forms.py generated/test_dsa_v32.py -k "forms or decode_realistic or decode_cuda_graph" \
      2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -30
  rc=${PIPESTATUS[0]}
  echo "# tests exit status $rc" | tee -a "$LOG"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  LOG="$OUT/dsa_decode_bench.log"
  header "dsa_v32 decode bench, forms ${FORMS:-plan base+tile ks_pf+wide ks_pf_s2+wide_k64}" | tee "$LOG"
  timeout ${BENCH_TIMEOUT:-110} python -m specgen.cli bench specs/dsa_v32.yaml --decode --batches 1 64 \
      --seqlens 65536 --no-dense --decode-forms ${FORMS:-plan base+tile ks_pf+wide ks_pf_s2+wide_k64} \
      --out "$OUT/results" 2>&1 | tee -a "$LOG" | tail -30
  brc=${PIPESTATUS[0]}
  echo "# bench exit status $brc" | tee -a "$LOG"
  python - "$OUT/results" <<'PY' 2>&1 | tee -a "$LOG"
# Per-kernel times (us) of each row: the selection, index-score and top-k kernels side by side.
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*_dsa_v32_decode.jsonl")):
    for line in open(path):
        for r in json.loads(line)["rows"]:
            if "kernels" in r:
                ks = ", ".join(f"{k.strip('_')[:28]} {v * 1000:.0f}" for k, v in r["kernels"].items() if v * 1000 >= 1)
                g = r.get("graph_ms")
                print(f"B {r['batch']:>2} {r.get('forms', '-'):>20}: eager {r['step_ms'] * 1000:.0f} us, graph "
                      f"{g * 1000 if isinstance(g, float) else float('nan'):.0f} us, x floor "
                      f"{r.get('graph_x_floor', r['x_floor']):.2f} | {ks}")
PY
  [ "$brc" = 0 ] || rc=$brc
fi
exit $rc
