#!/usr/bin/env bash
# One device-tool call (<= 10 min) for the distillation loss's two paths (docs/distill.md, "Two paths"): (1) the
# generated dsa_v32 GPU tests of the loss (batched and packed, dense and sparse stage, float64 reference, default =
# fused path), (2) bench/distill_bench.py: legacy vs fused (and the fused backward on 8 warps), forward and
# forward+backward, sparse stage at 16k/32k/64k (lse_main given and not) and dense stage at 16k/32k, against the
# sparse attention forward and dense cuDNN SDPA of the unabsorbed MHA (128 heads, d 192/128, causal) of the same
# run, with each path's gradients against the first's. Files under $OUT: distill_gpu.log, distill_tests.log,
# <day>_distill_paths.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/distill_gpu.sh   (TEST_TIMEOUT / BENCH_TIMEOUT re-split the 10 minutes)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/distill_gpu.log"
gpu_smi name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${TEST_TIMEOUT:-170} python -m pytest -v -rfE --tb=short -p no:cacheprovider generated/test_dsa_v32.py \
    -m gpu -k "distillation" 2>&1 | tee "$OUT/distill_tests.log" \
    | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee -a "$log"
timeout ${BENCH_TIMEOUT:-400} python bench/distill_bench.py specs/dsa_v32.yaml --sparse 16384 32768 65536 \
    --dense 16384 32768 --reps 5 --json "$OUT/${day}_distill_paths.jsonl" 2>&1 | tee -a "$log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
