#!/usr/bin/env bash
# One device-tool call: `specgen bench` over the model-shape matrix (issue 16), forward, backward and
# forward+backward with per-kernel times against cuDNN and flash in the same run.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/model_matrix_gpu.sh "SEQLENS" SPEC...; logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export SPECGEN_AUTOTUNE=${SPECGEN_AUTOTUNE:-0}   # the plan's defaults: what a user gets at the first call
export TRITON_CACHE_DIR=$PWD/.triton-cache PYTHONUNBUFFERED=1 SPECGEN_CACHE=$PWD/.specgen-cache
# The package from this tree: `python bench/<script>.py` puts bench/, not the tree, on sys.path, and the
# device machine's editable install may point elsewhere.
export PYTHONPATH=$PWD
seqlens=$1; shift
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
python -m specgen.cli bench "$@" --seqlens $seqlens --out "$OUT" 2>&1 | tee "$OUT/bench_${SPECGEN_COMMIT:-unknown}.log"
