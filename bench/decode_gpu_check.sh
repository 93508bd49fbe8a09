#!/usr/bin/env bash
# Decoding on the GPU, one device-tool call per mode (each fits the 10-minute limit):
#   bash bench/decode_gpu_check.sh tests   # every decode test on CUDA: CPU-sized cases, 64k-context bf16 cases
#                                          # (gpu marker) and the CUDA-graph replay check; FILES= narrows them
#   bash bench/decode_gpu_check.sh bench   # specgen bench --decode (contexts 8k..128k, batch 1 and 64); SPECS=
# Set SPECGEN_COMMIT (the device copy has no .git). Records and logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case "${1:-tests}" in
  tests)
    timeout ${TEST_TIMEOUT:-570} python -m pytest -v -rfE --tb=short -p no:cacheprovider -k decode \
        ${FILES:-generated/ tests/test_decode.py} 2>&1 \
        | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tee "$OUT/decode_tests.log" ;;
  bench)
    timeout ${BENCH_TIMEOUT:-570} python -m specgen.cli bench ${SPECS:-specs/nsa_paper.yaml specs/dsa_v32.yaml} \
        --decode --out "$OUT" 2>&1 | tee "$OUT/decode_bench.log" | tail -40 ;;
  *) echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
