#!/usr/bin/env bash
# One device call of session 10 (2026-12-06), phases by value under one deadline (BUDGET s):
#   1. the compression/window backward variants timed at Llama-3 heads, 64k (bench/cmp_bwd.py)
#   2. their GPU tests (bf16 vs float64, bit for bit)
#   3. DSA's scatter backward: GPU tests, compile report, timing vs the deterministic path (bench/dsa_bwd_gpu.sh)
# Logs under $OUT. Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/session_a_gpu.sh
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
start=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
log="$OUT/cmp_bwd.log"
gpu_smi | tee "$log"
echo "commit ${SPECGEN_COMMIT:-unknown}" | tee -a "$log"
timeout 170 python bench/cmp_bwd.py specs/models/model_llama3_8b.yaml --window --seqlens 65536 --reps 10 \
    --json "$OUT/${day}_cmp_bwd.jsonl" 2>&1 | tee -a "$log"
echo "# $(left) s left" | tee -a "$log"
timeout 110 python -m pytest -v -rfE --tb=short -p no:cacheprovider tests/test_dense_backward_variants.py -m gpu 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|passed|failed|Error|assert" | tee -a "$log"
l=$(left); echo "# $l s left for the DSA backward" | tee -a "$log"
[ "$l" -gt 60 ] && TEST_TIMEOUT=$(( l * 45 / 100 )) BENCH_TIMEOUT=$(( l * 50 / 100 )) bash bench/dsa_bwd_gpu.sh
exit 0
