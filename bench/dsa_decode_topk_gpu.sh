#!/usr/bin/env bash
# The DSA decode step's indexer top-k forms (issue 19; docs/decode.md "Forms of the DSA step", top-k), one device call
# of at most 3 minutes:
#   1. tests (TEST_TIMEOUT 70 s) on CUDA: the top-k forms against the selection rule (ties, NaN, -inf, forced units,
#      segments), on tie-heavy step scores against the plan's top-k bit for bit with the fold's histogram checked bin
#      for bin, dsa_v32 near 64k in fold, fold_list and fold_list_s64 against the float64 reference (paged q_len 4,
#      contiguous q_len 1, the tile and wide index kernels) and a replayed CUDA graph of fold_list.
#   2. bench (BENCH_TIMEOUT 90 s): `specgen bench specs/dsa_v32.yaml --decode --batches 1 64 --seqlens 65536
#      --no-dense --decode-forms $FORMS` with FORMS (default) plan base+tile+fold_list ks_pf_k32+wide+fold_list
#      ks_pf_k32+wide ks_pf_k32+wide+fold_list_s64 base+tile+fold (`plan`: ks_pf_k32+wide_w8+radix since the H200
#      timing of 2026-12-07): one row per forms on each cache (eager and graph-replayed step, x floor),
#      then each row's per-kernel times (us): the index-score kernel, each top-k launch (`_decode_topk_hist_kernel`
#      once per pass, `_decode_topk_write_kernel`) and the fold's memset side by side. `ks_pf_k32+wide` is the faster
#      selection and index forms with the plan's top-k: against `ks_pf_k32+wide+fold_list` it isolates the top-k on
#      the wide index kernel; `fold_list_s64` is fold_list with up to 64 segments a row (batch 1: 64 of 1024 units).
#      radix32 (32-bit key arithmetic alone) is left out: its PTX is within 1 % of radix's (FORMS="... radix32").
#   bash bench/dsa_decode_topk_gpu.sh    # both phases; PHASE=tests or PHASE=bench runs one; FORMS="plan fold" overrides
# Files under $OUT (3): dsa_decode_topk_tests.log, dsa_decode_topk_bench.log, results/<day>_dsa_v32_decode.jsonl.
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/results"
PHASE=${PHASE:-all}
FORMS=${FORMS:-plan base+tile+fold_list ks_pf_k32+wide+fold_list ks_pf_k32+wide ks_pf_k32+wide+fold_list_s64 base+tile+fold}
header() {
  echo "# $1, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python -c "import torch, triton, sys; print(f'# python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"
  gpu_smi | sed 's/^/# /'
}
rc=0
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  LOG="$OUT/dsa_decode_topk_tests.log"
  header "dsa_v32 decode top-k forms on CUDA" | tee "$LOG"
  timeout ${TEST_TIMEOUT:-70} python -m pytest -v -rfEs --tb=short -p no:cacheprovider --durations=8 \
      tests/test_decode_forms.py tests/test_decode.py \
      -k "tied or (realistic and fold) or (cuda_graph and fold) or (selection_rule and fold) or (segments and fold)" \
      2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -30
  rc=${PIPESTATUS[0]}
  echo "# tests exit status $rc" | tee -a "$LOG"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  LOG="$OUT/dsa_decode_topk_bench.log"
  header "dsa_v32 decode bench, forms $FORMS" | tee "$LOG"
  timeout ${BENCH_TIMEOUT:-90} python -m specgen.cli bench specs/dsa_v32.yaml --decode --batches 1 64 \
      --seqlens 65536 --no-dense --decode-forms $FORMS --out "$OUT/results" 2>&1 | tee -a "$LOG" | tail -30
  brc=${PIPESTATUS[0]}
  echo "# bench exit status $brc" | tee -a "$LOG"
  python - "$OUT/results" <<'PY' 2>&1 | tee -a "$LOG"
# Per-kernel times (us) of each row: the index-score kernel and the top-k's launches side by side.
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*_dsa_v32_decode.jsonl")):
    for line in open(path):
        for r in json.loads(line)["rows"]:
            if "kernels" in r:
                ks = ", ".join(f"{k.strip('_')[:28]} {v * 1000:.1f}" for k, v in r["kernels"].items() if v * 1000 >= 0.5)
                topk = sum(v for k, v in r["kernels"].items() if "topk" in k or "fill" in k.lower() or "memset" in k.lower())
                g = r.get("graph_ms")
                print(f"B {r['batch']:>2} {r.get('forms', '-'):>26}: eager {r['step_ms'] * 1000:.0f} us, graph "
                      f"{g * 1000 if isinstance(g, float) else float('nan'):.0f} us, x floor "
                      f"{r.get('graph_x_floor', r['x_floor']):.2f}, top-k + memset {topk * 1000:.0f} us | {ks}")
PY
  [ "$brc" = 0 ] || rc=$brc
fi
exit $rc
