#!/usr/bin/env bash
# One device-tool call (<= 4 min) for the sparse fused distillation forward's forms (docs/distill.md, "The sparse
# forward's forms"; launch config fwd_form base / pf / km / km_pf), V3.2 (specs/dsa_v32.yaml), lse_main given:
# (1) each form's loss and gradients on CUDA against the float64 reference at T=512 (bench/distill_bench.py --check:
#     rows stage "check", `ok`), (2) fwd and fwd+bwd at 16k and 64k of the fused path with each form, with the sparse
#     attention forward of the same run (attention_fwd_ms) and each form's loss/gradients against the base form's.
# Files under $OUT (3): distill_forms.log, <day>_distill_forms_<commit>.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/distill_forms_gpu.sh   (CHECK_TIMEOUT / BENCH_TIMEOUT re-split the time)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/distill_forms.log"
json="$OUT/${day}_distill_forms_${COMMIT}.jsonl"
gpu_smi name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${CHECK_TIMEOUT:-90} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused fused_pf fused_km fused_km_pf \
    --check 512 --sparse --dense --no-cudnn --json "$json" 2>&1 | tee -a "$log"
echo "check exit ${PIPESTATUS[0]}" | tee -a "$log"
timeout ${BENCH_TIMEOUT:-140} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused fused_pf fused_km fused_km_pf \
    --lse-only --sparse 16384 65536 --dense --no-cudnn --reps 5 --json "$json" 2>&1 | tee -a "$log"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$log"
