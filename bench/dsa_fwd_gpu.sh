#!/usr/bin/env bash
# One device-tool call (about 1.5 minutes, capped at 200 s) timing the selection forward's forms at DeepSeek-V3.2
# (tuning.selection_forward_variants: w8 = the default, ks, ks_pf, ks_k32_s3, ks_k32_s4, pf_k32_s4, ks_w16;
# docs/tuning.md, "The selection forward's forms") at T = 16384 and 65536 on one selection from the module's
# indexer per length: the forward kernel's GPU time (torch.profiler), TFLOP/s (2 (d_qk + d_v) per query, head and
# attended key), agreement with the default's output and log-sum-exp, and the compiled registers, spills and shared
# memory.
# Files under $OUT (3): dsa_fwd.log, <day>_dsa_fwd_variants.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/dsa_fwd_gpu.sh   (FWD_TIMEOUT caps the bench; VARIANTS="ks ks_pf" a subset)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/dsa_fwd.log"
gpu_smi | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${FWD_TIMEOUT:-190} python bench/variants_bench.py --only dsa_fwd --calls 2 ${VARIANTS:+--variants $VARIANTS} \
    --json "$OUT/${day}_dsa_fwd_variants.jsonl" 2>&1 | tee -a "$log"
