#!/usr/bin/env bash
# One device-tool call (<= 240 s on an H100) timing the forward's plan variants (specgen.compile.variants) beside the
# plan's default at T = 65536 (bench/nsa_forward_variants.py: per-kernel GPU time from torch.profiler, the whole
# forward as a median of CUDA events, agreement with the default's output / log-sum-exps / selection, registers and
# spills, cuDNN's dense forward of the same shapes). The defaults since the timing of commit dc0b177 (docs/forward.md,
# "The variants timed"): the forced merge, one warpgroup at 64 x 256, the scorer on 2 stages where 3 leave one
# program an SM; their baselines render the former defaults:
#   Llama-3-8B heads (32/8, d 128): sel_unforced (the plain merge), score_key32, score_km alone (untimed),
#     score_km+score_key32, and that with the scorer on 2 pipeline stages;
#   Qwen2.5-7B heads (28/4, group 7): sel_unforced, score_km alone, score_km+score_key32;
#   Gemma-2-9B heads (16/8, d 256): the former default (sel_unforced, sel_w8: two warpgroups, select.num_stages=3),
#     sel_unforced alone (the forced merge was timed there only within a combination), sel_w8, the scorer on
#     3 stages, score_key32;
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
bench ${LLAMA_TIMEOUT:-70} --specs llama --variants sel_unforced score_key32 score_km score_km,score_key32 \
    score_km,score_key32,select.num_stages=2
bench ${QWEN_TIMEOUT:-50} --specs qwen --variants sel_unforced score_km score_km,score_key32
bench ${GEMMA_TIMEOUT:-70} --specs gemma --variants sel_unforced,sel_w8,select.num_stages=3 sel_unforced sel_w8 \
    select.num_stages=3 score_key32
[ "${TEST_TIMEOUT:-40}" = 0 ] || timeout ${TEST_TIMEOUT:-40} python -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_forward_variants.py \
    -k "apply or plans or stages or in_the_merge or warpgroup or given" 2>&1 | tee "$OUT/nsa_fwd_variants_tests.log" | tail -3 | tee -a "$log"
