#!/usr/bin/env bash
# The whole test suite on the GPU machine: kernels compiled for CUDA, the GPU-only tests (realistic bf16 sizes
# against float64, tens of GB each) one at a time, then the rest (small shapes) on pytest-xdist workers sharing the
# GPU where the device has xdist. Output is written to $OUT as it comes, so a call cut off by its time limit still
# brings back what ran. Phases: gpu (the tests marked skipif: GPU-only), rest, or both (default).
#   SPECGEN_COMMIT=<sha> [FILES="generated/test_a.py tests/test_b.py"] bash bench/gpu_suite.sh [gpu|rest|both] [extra pytest args...]
# FILES restricts a run to some test files: the GPU-only phase takes ~18 s a test from a cold Triton cache (113 tests,
# ~35 min), more than one 10-minute call, so it runs in shards of a few files each, each shard logged on its own.
# SHARD=1..5 names the shards of the GPU-only phase (about 25 tests, ~8 min each), in place of FILES.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD SPECGEN_AUTOTUNE=0 TRITON_CACHE_DIR=$PWD/.triton-cache SPECGEN_CACHE=$PWD/.specgen-cache \
       PYTHONUNBUFFERED=1
commit=${SPECGEN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
phase=${1:-both}; shift || true
case ${SHARD:-} in
  1) FILES="generated/test_dsa_v32.py generated/test_nsa_config_a.py" ;;
  2) FILES="generated/test_nsa_paper.py generated/test_nsa_mqa.py" ;;
  3) FILES="generated/test_nsa_token.py generated/test_nsa_small.py tests/test_runtime.py tests/test_nsa_backward.py tests/test_spec_fuzz.py" ;;
  4) FILES="tests/test_decode_errors.py tests/test_train_distributed.py generated/test_dsa_block.py" ;;
  5) FILES="generated/test_dsa_small.py" ;;
  "") ;;
  *) echo "SHARD must be 1..5 (got $SHARD)" >&2; exit 2 ;;
esac
header() {
  echo "# commit $commit, $(date -u +%Y-%m-%dT%H:%M:%SZ), $1"
  python -c "import sys, torch, triton; print('# python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}
run_phase() {  # run_phase NAME MARKEXPR [xdist args...]
  local name=$1 mark=$2; shift 2
  local files=${FILES:-generated tests}
  local log="$OUT/gpu_tests_${name}_${commit}${FILES:+_$(echo $files | md5sum | cut -c1-6)}.log"
  header "python -m pytest -q -rfE --durations=15 -m '$mark' $* $files" > "$log"
  python -m pytest -v -p no:cacheprovider -rfE --durations=15 -W ignore -m "$mark" "$@" $files >> "$log" 2>&1
  echo "# exit status $?" >> "$log"
  tail -n 25 "$log"
}
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-6}")
[[ $phase == gpu || $phase == both ]] && run_phase gpu_only "skipif" "$@"
[[ $phase == rest || $phase == both ]] && run_phase rest "not skipif" "${workers[@]}" "$@"
exit 0
