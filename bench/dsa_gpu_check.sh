#!/usr/bin/env bash
# One device-tool call for DSA: its generated tests on CUDA (bf16, realistic sizes; V3.2's fp8 indexer), then the
# memory/speed probe of indexer + top-k, sparse attention and the distillation loss at 16k/32k/64k, and the same
# probe with a bf16 indexer for the fp8 comparison. Usage on the GPU machine: bash bench/dsa_gpu_check.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${TEST_TIMEOUT:-330} python -m pytest -v -rfE --tb=short generated/test_dsa_v32.py generated/test_dsa_block.py \
    generated/test_dsa_small.py 2>&1 | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tee "$OUT/dsa_tests.log"
timeout ${BENCH_TIMEOUT:-200} python bench/dsa_memory.py specs/dsa_v32.yaml \
    --json "$OUT/${day}_dsa_v32_memory.jsonl" 2>&1 | tail -5
sed 's/dtype: fp8_e4m3/dtype: bf16/; s/^name: dsa_v32/name: dsa_v32_bf16_indexer/' specs/dsa_v32.yaml > /tmp/dsa_v32_bf16.yaml
timeout 90 python bench/dsa_memory.py /tmp/dsa_v32_bf16.yaml --no-distill \
    --json "$OUT/${day}_dsa_v32_memory.jsonl" 2>&1 | tail -4
