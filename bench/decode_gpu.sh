#!/usr/bin/env bash
# NSA decoding at the byte floor (issue 19) on a CUDA machine, one call: the decode GPU tests of nsa_paper (CPU-sized
# cases on the GPU, 64k-context bf16 cases, CUDA graph replay equal to eager) and the selection kernels' tests of
# tests/test_decode.py (both scoring paths, exact ties), then the decode benchmark of nsa_paper at batch 1 and 64,
# contexts 64k and 128k, for the partials path AND the logits path on the same caches (one row each,
# `--decode-scoring partials logits`; the dense baselines are timed once per cache).
#   bash bench/decode_gpu.sh                 # both phases; PHASE=tests or PHASE=bench runs one
# Each phase has its own timeout (TEST_TIMEOUT 270 s, BENCH_TIMEOUT 300 s): a cold Triton cache compiles every
# kernel first; if one call must stay under 10 minutes and the first run times out, run the phases separately.
# Install on the GPU machine (no network): PYTHONPATH=$PWD (set below). Set SPECGEN_COMMIT (the device copy may have
# no .git). Written to $OUT: decode_tests_<commit>.log, decode_bench_<commit>.log, results/<date>_nsa_paper_decode.jsonl.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/results"
PHASE=${PHASE:-all}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device: this script times and checks the GPU paths" | tee "$OUT/decode_tests_${COMMIT}.log"; exit 2; }
header() {
  echo "# $1, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python -c "import torch, triton, sys; print(f'# python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"
}
rc=0
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  LOG="$OUT/decode_tests_${COMMIT}.log"
  header "decode GPU tests (nsa_paper, selection kernels)" | tee "$LOG"
  timeout ${TEST_TIMEOUT:-270} python -m pytest -v -rfEs --tb=short -p no:cacheprovider \
      generated/test_nsa_paper.py -k decode \
      "tests/test_decode.py::test_partials_selection_kernel_matches_the_reference_exactly_with_ties" \
      "tests/test_decode.py::test_partials_and_logits_paths_select_alike_over_many_tiles" \
      "tests/test_decode.py::test_block_selection_kernel_matches_the_reference_exactly_with_ties" \
      2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -40
  rc=${PIPESTATUS[0]}
  echo "# tests exit status $rc" | tee -a "$LOG"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  LOG="$OUT/decode_bench_${COMMIT}.log"
  header "decode bench nsa_paper, partials and logits paths" | tee "$LOG"
  timeout ${BENCH_TIMEOUT:-300} python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches 1 64 \
      --seqlens 65536 131072 --decode-scoring partials logits --out "$OUT/results" 2>&1 | tee -a "$LOG" | tail -40
  brc=${PIPESTATUS[0]}
  echo "# bench exit status $brc" | tee -a "$LOG"
  [ $rc -eq 0 ] && rc=$brc
fi
exit $rc
