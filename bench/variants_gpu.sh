#!/usr/bin/env bash
# One device-tool call (<= 10 min) timing the launch-config variants bench/kernel_audit.py's findings added, each
# beside the current default (bench/variants_bench.py: the kernel's own GPU time from torch.profiler, the whole
# forward + backward as a median of CUDA events, agreement with the default's gradients):
#   (1) the block-outer selection backward (`selection_kv_bwd`: w8 = the former launch, w4, km2_w4, km2_w4_s2, wg,
#       km2_wg) at Llama-3-8B heads, T = 65536;
#   (2) the scatter backward (`selection_scatter`: w8 = the default, w4, k64_w8, and the key-major km_k64_w8,
#       km_k64_w4, km_k128_w8) at DeepSeek-V3.2's, T = 16384;
#   (3) tests/test_kernel_variants.py on the GPU (fp32, tiny shapes: every variant against the float64 reference).
# Files under $OUT (4): variants.log, <day>_variants.jsonl, variants_tests.log, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/variants_gpu.sh   (LLAMA_TIMEOUT / DSA_TIMEOUT / TEST_TIMEOUT re-split it)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/variants.log"
gpu_smi | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${LLAMA_TIMEOUT:-240} python bench/variants_bench.py --only llama --reps 5 \
    --json "$OUT/${day}_variants.jsonl" 2>&1 | tee -a "$log"
timeout ${DSA_TIMEOUT:-240} python bench/variants_bench.py --only dsa --reps 3 \
    --variants w4 k64_w8 km_k64_w8 km_k64_w4 km_k128_w8 \
    --json "$OUT/${day}_variants.jsonl" 2>&1 | tee -a "$log"
timeout ${TEST_TIMEOUT:-90} python -m pytest -q -rfE --tb=short -p no:cacheprovider \
    tests/test_kernel_variants.py 2>&1 | tee "$OUT/variants_tests.log" | tail -3 | tee -a "$log"
