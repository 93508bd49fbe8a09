#!/usr/bin/env bash
# One device-tool call (<= 10 minutes) for chunked prefill into a cache (issue 18, item 2; docs/varlen.md):
#   1. tests/test_prefill.py on CUDA: the CPU-sized cases (every chunk schedule, contiguous and paged, the argument
#      errors, the layer) and the gpu-marked ones (nsa_paper and dsa_v32, 4096-token prompts in ragged chunks into a
#      paged cache in bf16, dsa_v32 with its fp8 index keys; a small DSA with fp8 index keys): outputs against the
#      float64 reference and the single prefill, the cache bit for bit, decoding afterwards;
#   2. bench/prefill_cost.py: a 64k prompt in 8k chunks into a paged cache against one 64k prefill (forward plus
#      cache.prefill), nsa_paper and dsa_v32 (keys read in place: the default table's pages are in pool order),
#      then nsa_paper with --gather (the paged keys gathered, as for any other table; the window's from its first
#      visible page). Each row has chunk_host_ms beside chunk_ms: the host time of each chunk's call.
# Logs and JSON rows go under $OUT (3 files). Usage on the GPU machine: bash bench/prefill_gpu.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
gpu_smi name,memory.total noheader > "$OUT/${day}_prefill_gpu_tests.log" 2>&1
# The gpu-marked cases and the timing first (the budget's point), then the CPU-sized cases on CUDA.
timeout ${TEST_TIMEOUT:-200} python -m pytest -v -rfE --tb=short tests/test_prefill.py -k realistic --durations=5 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed|s call" | tee -a "$OUT/${day}_prefill_gpu_tests.log"
timeout ${BENCH_TIMEOUT:-240} python bench/prefill_cost.py specs/nsa_paper.yaml specs/dsa_v32.yaml \
    --json "$OUT/${day}_prefill_cost.jsonl" 2>&1 | tail -20 | tee "$OUT/${day}_prefill_cost.log"
timeout ${GATHER_TIMEOUT:-60} python bench/prefill_cost.py specs/nsa_paper.yaml --gather \
    --json "$OUT/${day}_prefill_cost.jsonl" 2>&1 | tail -10 | tee -a "$OUT/${day}_prefill_cost.log"
timeout ${SMALL_TIMEOUT:-100} python -m pytest -v -rfE --tb=short tests/test_prefill.py -k "not realistic" 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tee -a "$OUT/${day}_prefill_gpu_tests.log"
