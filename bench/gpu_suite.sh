#!/usr/bin/env bash
# The whole test suite on the GPU machine in one device call: kernels compiled for CUDA, the generated tests'
# realistic bf16 sizes included. Workers share the one GPU (pytest-xdist where the device has it; the suite's
# tensors are small enough for four at once). Output is written to $OUT as it comes, so a call cut off by its time
# limit still brings back what ran.
#   SPECGEN_COMMIT=<sha> bash bench/gpu_suite.sh [pytest paths/args...]   (default: generated tests)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD SPECGEN_AUTOTUNE=0 TRITON_CACHE_DIR=$PWD/.triton-cache SPECGEN_CACHE=$PWD/.specgen-cache \
       PYTHONUNBUFFERED=1
commit=${SPECGEN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
log="$OUT/gpu_tests_${commit}.log"
workers=()
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(generated tests)
python -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-4}")
{
  echo "# commit $commit, $(date -u +%Y-%m-%dT%H:%M:%SZ), whole suite on CUDA (${workers[*]:-serial})"
  python -c "import sys, torch, triton; print('# python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "# python -m pytest -q -p no:cacheprovider ${workers[*]} ${args[*]}"
} > "$log"
python -m pytest -p no:cacheprovider -rfE --durations=20 ${PYTEST_FLAGS:--q} "${workers[@]}" "${args[@]}" >> "$log" 2>&1
echo "# exit status $?" >> "$log"
tail -n 40 "$log"
