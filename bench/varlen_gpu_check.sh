#!/usr/bin/env bash
# One device-tool call for packed (varlen) batches (docs/varlen.md): every spec's varlen tests on CUDA (the CPU-sized
# ones, then the gpu-marked 64k ones in the spec's dtype), the tier-2 varlen file, and the padded path's cost against
# a batched call of the same tokens. Usage on the GPU machine: bash bench/varlen_gpu_check.sh [SPEC_TEST_FILES...]
# (default: all; on an H100 leave out test_dsa_v32/test_dsa_block, whose 64k MLA forward peaks near 67 GB: H200).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Specs without a tuning record would autotune on their first calls: tests use the defaults (docs/tuning.md).
export SPECGEN_AUTOTUNE=${SPECGEN_AUTOTUNE:-0}
export TRITON_CACHE_DIR=$PWD/.triton-cache PYTHONUNBUFFERED=1 SPECGEN_CACHE=$PWD/.specgen-cache PYTHONPATH=$PWD
day=$(date +%F)
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(generated/test_*.py tests/test_varlen.py)
timeout ${TEST_TIMEOUT:-480} python -m pytest -v -rfE --tb=short -k varlen "${files[@]}" --durations=15 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed|s call" | tee "$OUT/${day}_varlen_gpu_tests.log"
timeout ${BENCH_TIMEOUT:-100} python bench/varlen_cost.py specs/nsa_paper.yaml specs/nsa_config_a.yaml \
    --json "$OUT/${day}_varlen_cost.jsonl" 2>&1 | tail -3
