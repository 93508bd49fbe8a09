#!/usr/bin/env bash
# One device-tool call (<= 240 s on an H100) timing the forward's plan variants (specgen.compile.variants) beside the
# plan's default at T = 65536 (bench/nsa_forward_variants.py: per-kernel GPU time from torch.profiler, the whole
# forward as a median of CUDA events, agreement with the default's output / log-sum-exps / selection, registers and
# spills, cuDNN's dense forward of the same shapes):
#   Llama-3-8B heads (32/8, d 128): score_masked (the scorer before this branch: every trip masked), score_key32,
#     score_km+score_key32, sel_forced, and all three together with the scorer on 2 pipeline stages;
#   Qwen2.5-7B heads (28/4, group 7): score_masked, score_km+score_key32, sel_forced, all three;
#   Gemma-2-9B heads (16/8, d 256): score_masked, the scorer on 2 stages (select.num_stages=2: 3 stages take 133 KB
#     of shared memory, one program an SM), score_key32 on 2 stages, sel_w4 (the block-outer forward on one
#     warpgroup), all of them with sel_forced;
# then the GPU run of tests/test_forward_variants.py's quick cases (the variants against the float64 reference).
# Files under $OUT (3): nsa_fwd_variants.log, <day>_nsa_fwd_variants.jsonl, nsa_fwd_variants_tests.log.
# Usage on the GPU machine: bash bench/nsa_forward_variants_gpu.sh   (LLAMA_/QWEN_/GEMMA_/TEST_TIMEOUT re-split it;
# 0 skips a piece)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/nsa_fwd_variants.log"
json="$OUT/${day}_nsa_fwd_variants.jsonl"
{ echo "commit $COMMIT";
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } | tee "$log"
bench() {  # bench SECONDS ARGS...: one spec's variants, killed at SECONDS (its records so far are kept)
    local limit=$1; shift
    [ "$limit" = 0 ] && return 0  # a timeout of 0 skips the piece (timeout(1) would read it as no limit)
    timeout -k 5 "$limit" python bench/nsa_forward_variants.py --T 65536 --reps 7 --calls 2 --json "$json" "$@" 2>&1 \
        | tee -a "$log"
}
bench ${LLAMA_TIMEOUT:-70} --specs llama --variants score_masked score_key32 score_km,score_key32 sel_forced \
    score_km,score_key32,sel_forced,select.num_stages=2
bench ${QWEN_TIMEOUT:-50} --specs qwen --variants score_masked score_km,score_key32 sel_forced score_km,score_key32,sel_forced
bench ${GEMMA_TIMEOUT:-70} --specs gemma --variants score_masked select.num_stages=2 score_key32,select.num_stages=2 \
    sel_w4 score_key32,sel_forced,sel_w4,select.num_stages=2
[ "${TEST_TIMEOUT:-30}" = 0 ] || timeout ${TEST_TIMEOUT:-30} python -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_forward_variants.py \
    -k "apply or in_the_merge or given" 2>&1 | tee "$OUT/nsa_fwd_variants_tests.log" | tail -3 | tee -a "$log"
