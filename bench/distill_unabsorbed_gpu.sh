#!/usr/bin/env bash
# One device-tool call (<= 8 min) for the dense distillation stage from unabsorbed q and k (docs/distill.md, "The
# dense stage from the unabsorbed heads"; spec field `unabsorbed`, kernels _distill_*_dense_mha_kernel), V3.2
# (specs/dsa_v32.yaml), warm-up stage, beside the absorbed form's fastest (qreg forward and query side):
# (1) sm_90 compile report of the unabsorbed kernels (registers, spills, shared memory, each loop's wgmma and waits),
# (2) the unabsorbed loss and gradients on CUDA against the float64 reference at T=512, lse_main given and not
#     (bench/distill_bench.py --check-dense: rows stage "check_dense", `ok`), and the generated GPU tests of the form
#     (T=2048 batched, packed 1500 + 0 + 548),
# (3) fwd and fwd+bwd at 16k and 32k with lse_main given (`*_lse`) and not (`*_no_lse`), both forms, and cuDNN's
#     dense MHA of the unabsorbed heads in the same run (the target: the loss's forward <= 2x cuDNN's forward).
# Files under $OUT (4): distill_unabsorbed.log, <day>_distill_unabsorbed_<commit>.jsonl, compile.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/distill_unabsorbed_gpu.sh   (CHECK_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT
# re-split the time; DENSE_T="32768" times one length)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/distill_unabsorbed.log"
json="$OUT/${day}_distill_unabsorbed_${COMMIT}.jsonl"
gpu_smi name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
for lse in 1 0; do
  python bench/distill_offline.py --kernel _distill_fwd_dense_mha_kernel --warps 8 --const HAS_LSE=$lse --loops \
      --json "$OUT/compile.jsonl" 2>&1 | tee -a "$log"
done
python bench/distill_offline.py --kernel _distill_di_dense_mha_kernel --warps 8 --loops --json "$OUT/compile.jsonl" \
    2>&1 | tee -a "$log"
python bench/distill_offline.py --kernel _distill_dq_dense_mha_kernel _distill_dk_dense_mha_kernel --warps 4 \
    --stages 3 --loops --json "$OUT/compile.jsonl" 2>&1 | tee -a "$log"
timeout ${CHECK_TIMEOUT:-90} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused_qreg_dq fused_unabsorbed \
    --check-dense 512 --sparse --dense --no-cudnn --json "$json" 2>&1 | tee -a "$log"
echo "check exit ${PIPESTATUS[0]}" | tee -a "$log"
timeout ${TEST_TIMEOUT:-90} python -m pytest -q -x generated/test_dsa_v32.py -k "distillation_realistic and unabsorbed" \
    2>&1 | tail -5 | tee -a "$log"
echo "tests exit ${PIPESTATUS[0]}" | tee -a "$log"
timeout ${BENCH_TIMEOUT:-240} python bench/distill_bench.py specs/dsa_v32.yaml --variants fused_qreg_dq fused_unabsorbed \
    --sparse --dense ${DENSE_T:-16384 32768} --reps 3 --json "$json" 2>&1 | tee -a "$log"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$log"
