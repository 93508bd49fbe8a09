#!/usr/bin/env bash
# One device-tool call for packed (varlen) batches (docs/varlen.md), forward and training natively on the packed rows:
#   1. every spec's varlen tests on CUDA (the CPU-sized ones, then the gpu-marked 64k ones in the spec's dtype:
#      forward, and forward + backward through <family>_attention with every gradient against the per-sequence
#      reference), the tier-2 files tests/test_varlen.py and tests/test_varlen_backward.py (padding trapped, buffers
#      bounded by a multiple of the packed tokens);
#   2. bench/varlen_cost.py, forward and --training, for nsa_paper, nsa_config_a, model_llama3_8b and dsa_v32, two batches: 40000 + 20000 + 5536 + 0 tokens, and one
#      32768-token sequence with 256 of 128 tokens, each against its sequences run one by one and against one
#      batched sequence of the same tokens.
# Logs and JSON rows go under $OUT. Usage on the GPU machine: bash bench/varlen_gpu_check.sh [SPEC_TEST_FILES...]
# (default: all; on an H100 leave out test_dsa_v32/test_dsa_block, whose 64k MLA forward peaks near 67 GB: H200).
# PHASES=tests or PHASES=cost runs one phase (the device tool allows 10 minutes per command).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
phases=${PHASES:-"tests cost"}
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(generated/test_*.py tests/test_varlen.py tests/test_varlen_backward.py)
if [[ $phases == *tests* ]]; then
    timeout ${TEST_TIMEOUT:-420} python -m pytest -v -rfE --tb=short -k "varlen or never_pads or inverse_index" \
        "${files[@]}" --durations=20 2>&1 \
        | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed|s call" | tee "$OUT/${day}_varlen_gpu_tests.log"
fi
if [[ $phases == *cost* ]]; then
    # Issue 18's four specs (two NSA configurations, a model-shape NSA spec, dsa_v32), one process per spec and batch
    # so a slow one loses only its own rows (COST_SPECS / BENCH_TIMEOUT re-split it).
    short=$(printf '128 %.0s' $(seq 256))
    for spec in ${COST_SPECS:-specs/nsa_paper.yaml specs/nsa_config_a.yaml specs/models/model_llama3_8b.yaml specs/dsa_v32.yaml}; do
        for training in "" "--training"; do
            timeout ${BENCH_TIMEOUT:-80} python bench/varlen_cost.py "$spec" $training \
                --label 40000+20000+5536+0 --json "$OUT/${day}_varlen_cost.jsonl" 2>&1 | tail -2
            timeout ${BENCH_TIMEOUT:-80} python bench/varlen_cost.py "$spec" $training \
                --lengths 32768 $short --label 32768+256x128 --json "$OUT/${day}_varlen_cost.jsonl" 2>&1 | tail -2
        done
    done 2>&1 | tee "$OUT/${day}_varlen_cost.log"
fi
