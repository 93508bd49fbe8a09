#!/usr/bin/env bash
# The whole test suite on the GPU machine: kernels compiled for CUDA, the GPU-only tests (realistic bf16 sizes
# against float64, tens of GB each) one at a time, then the rest (small shapes) on pytest-xdist workers sharing the
# GPU where the device has xdist. Output is written to $OUT as it comes, so a call cut off by its time limit still
# brings back what ran. Phases: gpu (the tests marked skipif: GPU-only), rest, or both (default).
#   SPECGEN_COMMIT=<sha> [FILES="generated/test_a.py tests/test_b.py"] bash bench/gpu_suite.sh [gpu|rest|both] [extra pytest args...]
# FILES restricts a run to some test files: the GPU-only phase takes ~18 s a test from a cold Triton cache (113 tests,
# ~35 min), more than one 10-minute call, so it runs in shards of a few files each, each shard logged on its own.
# SHARD=1..5 names the shards of the GPU-only phase (about 25 tests, ~8 min each), in place of FILES.
# GPU_WORKERS=N (N > 1, needs pytest-xdist) runs the GPU-only phase on N workers sharing the GPU: the time is mostly
# Triton compiling on the host's cores, so N workers compile N tests at once; tests that run out of GPU memory
# beside each other are then rerun one at a time on the warm cache (`--last-failed`), and only that second verdict
# counts (both logs come back).
# IDS=<file> runs the test ids listed in the file (one per line: what a cut-off call left, see
# bench/gpu_suite_left.py) in place of FILES. PARALLEL_TIMEOUT / RERUN_TIMEOUT / GPU_TIMEOUT / REST_TIMEOUT cap the
# parallel GPU-only run, the one-at-a-time rerun of its failures, the one-at-a-time GPU-only run and the rest phase (seconds; 0 or unset: no cap), so one
# call brings back both verdicts; the failures are read from the log, not pytest's cache (a capped run writes none).
set -uo pipefail
set -f  # test ids hold brackets ([8192]): never globbed
GPU_ENV_AUTOTUNE=off
export SPECGEN_INSTAFAIL=1  # tracebacks as tests fail (conftest.py): a call cut by its limit keeps them
source "$(dirname "$0")/gpu_env.sh"
phase=${1:-both}; shift || true
case ${SHARD:-} in
  1) FILES="generated/test_dsa_v32.py generated/test_nsa_config_a.py" ;;
  2) FILES="generated/test_nsa_paper.py generated/test_nsa_mqa.py" ;;
  3) FILES="generated/test_nsa_token.py generated/test_nsa_small.py tests/test_runtime.py tests/test_nsa_backward.py tests/test_spec_fuzz.py" ;;
  4) FILES="tests/test_decode_errors.py tests/test_train_distributed.py generated/test_dsa_block.py" ;;
  5) FILES="generated/test_dsa_small.py" ;;
  "") [ -n "${IDS:-}" ] && FILES="@$IDS" ;;  # pytest reads the ids from the file, one per line (some hold spaces)
  *) echo "SHARD must be 1..5 (got $SHARD)" >&2; exit 2 ;;
esac
header() {
  echo "# commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ), $1"
  python -c "import sys, torch, triton; print('# python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}
run_phase() {  # run_phase NAME MARKEXPR [xdist args...]
  local name=$1 mark=$2; shift 2
  local files=${FILES:-generated tests}
  local log="$OUT/gpu_tests_${name}_${COMMIT}${FILES:+_$(echo $files | md5sum | cut -c1-6)}.log"
  header "python -m pytest -q -rfE --durations=15 -m '$mark' $* $files" > "$log"
  local cap=${GPU_TIMEOUT:-0}; [ "$name" = rest ] && cap=${REST_TIMEOUT:-0}
  timeout -k 30 -s INT "$cap" python -m pytest -v -p no:cacheprovider -rfE --durations=15 -W ignore -m "$mark" "$@" $files \
    >> "$log" 2>&1
  echo "# exit status $?" >> "$log"
  tail -n 25 "$log"
}
run_gpu_parallel() {  # the GPU-only phase on GPU_WORKERS workers, then its failures one at a time
  local files=${FILES:-generated tests}
  local log="$OUT/gpu_tests_gpu_only_${COMMIT}_parallel.log" relog="$OUT/gpu_tests_gpu_only_${COMMIT}_rerun.log"
  header "python -m pytest -m skipif -n $GPU_WORKERS $* $files, then its failures one at a time" > "$log"
  timeout -k 30 -s INT "${PARALLEL_TIMEOUT:-0}" python -m pytest -v -p no:cacheprovider -rfE --durations=15 -W ignore \
    -m skipif -n "$GPU_WORKERS" "$@" $files >> "$log" 2>&1
  echo "# exit status $?" >> "$log"
  tail -n 25 "$log"
  local failed
  failed=$OUT/failed_ids.txt
  python "$(dirname "$0")/gpu_suite_left.py" --failed "$log" > "$failed"
  if [ -s "$failed" ]; then
    header "rerun of the failures above, one at a time (warm Triton cache)" > "$relog"
    timeout -k 30 -s INT "${RERUN_TIMEOUT:-0}" python -m pytest -v -p no:cacheprovider -rfE -W ignore -m skipif \
      "$@" "@$failed" >> "$relog" 2>&1
    echo "# exit status $?" >> "$relog"
    tail -n 25 "$relog"
  fi
}
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-6}")
if [[ $phase == gpu || $phase == both ]]; then
  if [ "${GPU_WORKERS:-1}" -gt 1 ] && python -c "import xdist" 2>/dev/null; then run_gpu_parallel "$@"
  else run_phase gpu_only "skipif" "$@"; fi
fi
[[ $phase == rest || $phase == both ]] && run_phase rest "not skipif" "${workers[@]}" "$@"
exit 0
