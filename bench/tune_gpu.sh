#!/usr/bin/env bash
# One device-tool call: tune specs (forward and backward kernels) at one length, copy the tuning records to $OUT,
# bake them into the generated modules, then time every pass (`specgen bench`) with the records in place.
# Usage on the GPU machine: bash bench/tune_gpu.sh "<specs to tune>" "<specs to bench>" [seqlen] [bench lengths...]
set -uo pipefail
GPU_ENV_AUTOTUNE=keep   # the tuner times the candidates itself
source "$(dirname "$0")/gpu_env.sh"
TUNE=$1; BENCH=$2; SEQLEN=${3:-16384}; shift 3 || shift $#
LENGTHS=${*:-8192 32768 65536}
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
for s in $TUNE; do
    python -m specgen.cli tune "$s" --seqlen "$SEQLEN" 2>&1 | tee -a "$OUT/tune.log"
    cp specs/*.tune.json "$OUT"/ 2>/dev/null
done
python -m specgen.cli build specs/ | tail -n 20
for s in $BENCH; do
    python -m specgen.cli bench "$s" --seqlens $LENGTHS --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
done
