#!/usr/bin/env bash
# One device-tool call (<= 8 min) for the dense fused distillation forward's forms (docs/distill.md, "The dense
# forward's forms"; launch configs dense_fwd_form base / qreg / qreg_k32 and dense_dq_form base / qreg: variant
# fused_qreg_dq), V3.2 (specs/dsa_v32.yaml), warm-up stage:
# (1) sm_90 compile report of each form (registers, spills, shared memory, each loop's wgmma and their waits),
# (2) each form's dense loss and gradients on CUDA against the float64 reference at T=512, lse_main given and not
#     (bench/distill_bench.py --check-dense: rows stage "check_dense", `ok`),
# (3) fwd and fwd+bwd at 16k and 32k with lse_main given (`*_lse`) and not (`*_no_lse`, the former record's
#     806.7 ms at 32k), each form's loss/gradients against the base form's, and cuDNN's dense MHA of the same run.
# Files under $OUT (4): distill_dense_forms.log, <day>_distill_dense_forms_<commit>.jsonl, compile.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/distill_dense_forms_gpu.sh   (CHECK_TIMEOUT / BENCH_TIMEOUT re-split the time;
# DENSE_T="16384" times one length)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/distill_dense_forms.log"
json="$OUT/${day}_distill_dense_forms_${COMMIT}.jsonl"
gpu_smi name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
for lse in 1 0; do
  python bench/distill_offline.py --kernel _distill_fwd_dense_fused_kernel --warps 8 --const HAS_LSE=$lse --loops \
      --json "$OUT/compile.jsonl" 2>&1 | tee -a "$log"
  for form in "BK=64 STAGES=2 QSMEM=8" "BK=32 STAGES=3 QSMEM=8"; do
    python bench/distill_offline.py --kernel _distill_fwd_dense_qreg_kernel --warps 8 --const HAS_LSE=$lse $form \
        --loops --json "$OUT/compile.jsonl" 2>&1 | tee -a "$log"
  done
done
python bench/distill_offline.py --kernel _distill_dq_dense_fused_kernel _distill_dq_dense_qreg_kernel --warps 8 \
    --const BK=64 STAGES=2 QSMEM=8 --loops --json "$OUT/compile.jsonl" 2>&1 | tee -a "$log"
timeout ${CHECK_TIMEOUT:-150} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused fused_qreg fused_qreg_k32 fused_qreg_dq \
    --check-dense 512 --sparse --dense --no-cudnn --json "$json" 2>&1 | tee -a "$log"
echo "check exit ${PIPESTATUS[0]}" | tee -a "$log"
timeout ${BENCH_TIMEOUT:-300} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused fused_qreg fused_qreg_k32 fused_qreg_dq \
    --sparse --dense ${DENSE_T:-16384 32768} --reps 3 --json "$json" 2>&1 | tee -a "$log"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$log"
