#!/usr/bin/env bash
# One device-tool call for the lightning indexer + exact top-k (issue 17, item 3; docs/decisions.md, indexer
# top-k): the indexer GPU tests (generated index_topk tests of the DSA specs and nsa_token, the variant tests of
# tests/test_indexer_topk.py: both score forms, every select variant, packed batches), the compile report of the
# default kernels, then the timing of dsa_v32's indexer + top-k at 16k, 32k and 64k: the first default (query-major
# score tile, five-pass select), the default before 2026-12-07 (key-major at 2 stages, select at 4 warps) and the
# default (3 stages, 8 warps) against the other variants in the same run (bench/indexer_bench.py). Logs under $OUT.
# Usage on the GPU machine: bash bench/indexer_gpu.sh   (SEQLENS="16384 32768" VARIANTS="..." narrow it)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/indexer.log"
gpu_smi name,memory.total noheader | tee "$log"
timeout ${TEST_TIMEOUT:-180} python -m pytest -v -rfE --tb=short tests/test_indexer_topk.py \
    generated/test_dsa_v32.py generated/test_dsa_block.py generated/test_dsa_small.py generated/test_nsa_token.py \
    -k "index or radix or score_forms or packed or varlen_forward_small" 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tee -a "$log"
SIG="QI=*fp8e4nv KI=*fp8e4nv WI=*fp32 WS=*fp32 KS=*fp32 CU_SEQLENS=*i32 TILES=*i32 q0=i32 QC=i32 WS_ROW=i32 WIDEN=constexpr=0"
python bench/compile_offline.py specs/dsa_v32.yaml _index_scores_kernel --warps 4 --stages 3 \
    --sig $SIG KEY_MAJOR=constexpr=1 BT=constexpr=64 KEYS=constexpr=128 2>&1 | tail -1 | tee -a "$log"
python bench/compile_offline.py specs/dsa_v32.yaml _radix_topk_kernel --warps 8 --stages 1 \
    --sig WS=*fp32 IDX=*i32 SC=*fp32 LIST=*i32 CU_SEQLENS=*i32 TILES=*i32 q0=i32 QC=i32 WS_ROW=i32 \
    COMPACT=constexpr=1 CHUNK=constexpr=2048 2>&1 | tail -1 | tee -a "$log"
variants=()
if [ -n "${VARIANTS:-}" ]; then IFS=',' read -ra variants <<< "$VARIANTS"; fi
timeout ${BENCH_TIMEOUT:-360} python bench/indexer_bench.py specs/dsa_v32.yaml --seqlens ${SEQLENS:-16384 32768 65536} \
    ${variants:+--variants "${variants[@]}"} --json "$OUT/${day}_indexer.jsonl" 2>&1 | tee -a "$log"
