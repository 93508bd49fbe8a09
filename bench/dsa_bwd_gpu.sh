#!/usr/bin/env bash
# One device-tool call for DSA's sparse backward (docs/backward.md, the scatter path): the generated dsa_v32 GPU
# tests of the backward (scatter path vs float64 at 8k and 4999, scatter vs deterministic at 8k, deterministic bit
# for bit), the scatter kernel's compile report, then the timing of the backward at 16k and 32k, scatter vs
# deterministic in the same run, and the forward for reference (bench/dsa_bwd.py). Logs under $OUT.
# Usage on the GPU machine: bash bench/dsa_bwd_gpu.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
gpu_smi name,memory.total noheader | tee "$OUT/dsa_bwd.log"
timeout ${TEST_TIMEOUT:-300} python -m pytest -v -rfE --tb=short generated/test_dsa_v32.py \
    -k "backward_realistic or backward_deterministic or scatter_matches" 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tee -a "$OUT/dsa_bwd.log"
python bench/compile_offline.py specs/dsa_v32.yaml _selection_bwd_scatter_kernel --warps 8 --stages 1 \
    --sig NKEYS=i32 BLOCK_N=constexpr=32 LSE=*fp32 DG=*fp32 DQ=*fp32 DK=*fp32 DVAL=*fp32 IDX=*i32 2>&1 \
    | tail -1 | tee -a "$OUT/dsa_bwd.log"
timeout ${BENCH_TIMEOUT:-240} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 32768 \
    --json "$OUT/${day}_dsa_bwd.jsonl" 2>&1 | tail -8 | tee -a "$OUT/dsa_bwd.log"
