#!/usr/bin/env bash
# One device-tool call (at most ~4 minutes: tests capped at 70 s, the bench at 165 s) for the scatter backward's
# forms (issue 17; docs/backward.md, "The scatter kernel's forms"; tuning.scatter_variants):
#  1. the changed tests on CUDA: tests/test_scatter_forms.py (every new form against the float64 reference and
#     against the former form within fp32 rounding, batched and packed, with a spy on the launches) and the
#     key-major form of tests/test_kernel_variants.py;
#  2. bench/dsa_bwd.py at DeepSeek-V3.2: the backward with 10 named forms at T = 16384 (median of 3,
#     per-kernel GPU times of one call, TFLOP/s at 2.5x the forward's FLOPs, gradients against the former default
#     "w8"'s), then w8 and the two fastest at 32768 (median of 3) and 65536 (median of 1 after a warm-up); the
#     atomic adds alone (the floor of any form with 1/2/4/8 head chunks a query), and the forward for reference.
# Files under $OUT (3): dsa_bwd_forms.log, <day>_dsa_bwd_forms.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/dsa_bwd_forms_gpu.sh   (TEST_TIMEOUT / BENCH_TIMEOUT cap the two pieces;
# FORMS="w8 km_ks_k64" a subset; SEQLENS="16384 32768" other lengths)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/dsa_bwd_forms.log"
gpu_smi | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${TEST_TIMEOUT:-70} python -m pytest -q -rfE --tb=short tests/test_scatter_forms.py \
    "tests/test_kernel_variants.py::test_scatter_key_major_matches_the_reference" 2>&1 | tail -15 | tee -a "$log"
timeout ${BENCH_TIMEOUT:-165} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens ${SEQLENS:-16384 32768 65536} \
    --forms ${FORMS:-all} --top 2 --reps 3 --form-reps 3 3 1 --no-det --atomics-floor \
    --json "$OUT/${day}_dsa_bwd_forms.jsonl" 2>&1 | tee -a "$log"
gpu_smi | tee -a "$OUT/nvidia-smi.txt"
