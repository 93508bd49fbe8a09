#!/usr/bin/env bash
# Issue 19, NSA decode at batch 1 near the latency floor: the "fused" launch form (docs/decode.md "Launch forms") on
# a CUDA machine, in one call of at most ~5 minutes:
#   1. tests: the fused-form tests of tests/test_decode.py on CUDA (CPU-sized cases against the split form and the
#      float64 reference; nsa_paper at 64k, q_len 1 and 4, against the split form and replayed three times from a
#      CUDA graph, bit for bit the eager step, tickets back at 0; nsa_paper's fused step against the reference),
#      and the split form's CUDA-graph test of nsa_paper (its cache now also holds the tickets); the chunked top-n
#      forms' tests (`topn`: CPU-sized kernel and step cases, nsa_paper at 64k against the row form in both launch
#      forms with CUDA-graph replays, chunked_ticket against the reference);
#   2. bench: `specgen bench --decode` of nsa_paper, the split AND fused forms and the chunked top-n forms
#      (chunked, chunked_ticket, fused+chunked_ticket; NSA_FORMS overrides the list) on the same caches (one row
#      each, per-kernel times in the record): batch 1 at 64k and 128k, then batch 64 at 64k.
#   SPECGEN_COMMIT=<commit> bash bench/decode_fused_gpu.sh      # PHASE=tests or PHASE=bench runs one phase
# Timeouts: TEST_TIMEOUT 150 s, BENCH1_TIMEOUT 90 s, BENCH64_TIMEOUT 60 s (a cold Triton cache compiles first).
# Written to $OUT (3 files): decode_fused_tests_<commit>.log, decode_fused_bench_<commit>.log,
# results/<date>_nsa_paper_decode.jsonl (both bench runs append to it).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/results"
PHASE=${PHASE:-all}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device: this script times and checks the GPU paths" | tee "$OUT/decode_fused_tests_${COMMIT}.log"; exit 2; }
header() {
  echo "# $1, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python -c "import torch, triton, sys; print(f'# python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"
  gpu_smi "" noheader | sed 's/^/# /'
}
rc=0
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  LOG="$OUT/decode_fused_tests_${COMMIT}.log"
  header "fused decode form, GPU tests" | tee "$LOG"
  timeout ${TEST_TIMEOUT:-150} python -m pytest -v -rfEs --tb=short -p no:cacheprovider \
      tests/test_decode.py -k "fused or topn or bench_scoring_path or decode_cuda_graph" \
      "generated/test_nsa_paper.py::test_decode_cuda_graph" \
      2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -30
  rc=${PIPESTATUS[0]}
  echo "# tests exit status $rc" | tee -a "$LOG"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  LOG="$OUT/decode_fused_bench_${COMMIT}.log"
  header "decode bench nsa_paper, split and fused forms" | tee "$LOG"
  brc=0
  for run in "1 ${BENCH1_TIMEOUT:-90} 65536 131072" "64 ${BENCH64_TIMEOUT:-60} 65536"; do
    set -- $run
    b=$1 t=$2; shift 2
    echo "## batch $b, contexts $*" | tee -a "$LOG"
    timeout "$t" python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches "$b" --seqlens "$@" \
        --decode-forms ${NSA_FORMS:-split fused chunked chunked_ticket fused+chunked_ticket} --out "$OUT/results" \
        2>&1 | tee -a "$LOG" | tail -24
    s=${PIPESTATUS[0]}
    echo "# bench batch $b exit status $s" | tee -a "$LOG"
    [ $brc -eq 0 ] && brc=$s
  done
  [ $rc -eq 0 ] && rc=$brc
fi
exit $rc
