#!/usr/bin/env bash
# One device-tool call (about 2.5 minutes on an H100 with a cold Triton cache, capped at 200 s) for issue 17's
# memory target: DeepSeek-V3.2's training step at T = 65536 and 32768 (indexer + top-k, sparse attention forward and
# backward, sparse-stage distillation forward + backward), each piece's peak torch.cuda.max_memory_allocated and
# what autograd saved, the step's peak beyond its inputs, outputs and gradients (target <= 8 GB), and whether it
# fits the GPU; with today's buffers (now), the former ones (the fp32 dQ accumulator and its cast, the saved copy of
# the output: runtime.launches.DQ_IN_DTYPE / OUT_IS_BRANCH_OUTPUT off) and today's in deterministic mode (det: the
# inverse-index kernels and the legacy distillation backward), in that order; now and former compared bit for bit
# at 32k. All of it is bench/dsa_step_memory.py; docs/backward.md "Memory" has the accounting it checks.
# Two files under $OUT: dsa_mem.log and <date>_dsa_mem.jsonl (the jsonl is written at the end; the log has every
# row as it comes).
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/dsa_mem_gpu.sh   (MODES="now former" a subset)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/dsa_mem.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
echo "commit $COMMIT" | tee -a "$log"
timeout ${MEM_TIMEOUT:-190} python bench/dsa_step_memory.py specs/dsa_v32.yaml --seqlens 65536 32768 \
    --modes ${MODES:-now former det} --json "$OUT/${day}_dsa_mem.jsonl" 2>&1 | tee -a "$log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
