#!/usr/bin/env bash
# One device-tool call: install, run every generated test on CUDA (small + realistic bf16 sizes), then bench.
# Usage on the GPU machine: bash bench/gpu_check.sh [pytest-args...]; logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Specs without a tuning record would autotune on their first calls: tests use the defaults (docs/tuning.md).
export SPECGEN_AUTOTUNE=${SPECGEN_AUTOTUNE:-0}
export TRITON_CACHE_DIR=$PWD/.triton-cache PYTHONUNBUFFERED=1 SPECGEN_CACHE=$PWD/.specgen-cache
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
