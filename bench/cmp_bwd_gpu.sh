#!/usr/bin/env bash
# One device-tool call (<= 10 min) for the compression/window backward variants (docs/backward.md, "Launch configs
# of the compression and window backward"): (1) the GPU tests of every variant at Llama-3-8B heads and of the
# defaults at Qwen2.5-7B / Gemma-2-9B heads (bf16 vs float64 at T = 4999, bit for bit at 8192), (2) the timing of
# every variant of the compression dQ and dK/dV kernels (the window's too for Llama) at T = 32768 and 65536 for
# model_llama3_8b, model_qwen25_7b, model_gemma2_9b and nsa_config_a (bench/cmp_bwd.py: median of CUDA events,
# TFLOP/s, agreement with the former default, bit-for-bit repeat). Files under $OUT: cmp_bwd.log,
# <day>_cmp_bwd.jsonl, cmp_bwd_tests.log, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/cmp_bwd_gpu.sh   (TEST_TIMEOUT / BENCH_TIMEOUT to re-split the 10 minutes)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/cmp_bwd.log"
gpu_smi | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${BENCH_TIMEOUT:-380} python bench/cmp_bwd.py specs/models/model_llama3_8b.yaml --window \
    specs/models/model_qwen25_7b.yaml specs/models/model_gemma2_9b.yaml specs/nsa_config_a.yaml \
    --seqlens 32768 65536 --reps 10 --json "$OUT/${day}_cmp_bwd.jsonl" 2>&1 | tee -a "$log"
timeout ${TEST_TIMEOUT:-180} python -m pytest -v -rfE --tb=short -p no:cacheprovider \
    tests/test_dense_backward_variants.py -m gpu 2>&1 | tee "$OUT/cmp_bwd_tests.log" \
    | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee -a "$log"
