#!/usr/bin/env bash
# One device-tool call: `specgen bench` over the model-shape matrix (issue 16), forward, backward and
# forward+backward with per-kernel times against cuDNN and flash in the same run.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/model_matrix_gpu.sh "SEQLENS" SPEC...; logs land in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"   # SPECGEN_AUTOTUNE 0 unless set: the plan's defaults, what a user gets at the first call
seqlens=$1; shift
gpu_smi | tee "$OUT/nvidia-smi.txt"
python -m specgen.cli bench "$@" --seqlens $seqlens --out "$OUT" 2>&1 | tee "$OUT/bench_${SPECGEN_COMMIT:-unknown}.log"
