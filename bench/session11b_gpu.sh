#!/usr/bin/env bash
# Session 11's second device call (<= 7 min), most needed first, each piece capped; every piece's files go under one
# folder, packed into $OUT/all.tgz after each piece (the device returns 8 files a call):
#   1. dsa_v32's training memory (bench/dsa_mem_gpu.sh, modes now / former): dQ written in the spec's dtype and no
#      copy of the output (schema 14) at 64k and 32k, peaks per piece, and now == former bit for bit at 32k;
#   2. the NSA forward's variants at Llama / Qwen / Gemma-2 heads, 64k (bench/nsa_forward_variants_gpu.sh);
#   3. dsa_v32's whole training step at 64k against dense cuDNN (`specgen bench --training-step`), as time allows.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/session11b_gpu.sh
set -uo pipefail
FINAL=${OUT:-/tmp/out}
W=/tmp/session11b_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
OUT=$W/mem MODES="now former" MEM_TIMEOUT=${T1:-140} bash bench/dsa_mem_gpu.sh; pack
OUT=$W/nsafwd bash bench/nsa_forward_variants_gpu.sh; pack
GPU_ENV_AUTOTUNE=off OUT=$W/step source bench/gpu_env.sh
timeout ${T3:-75} python -m specgen.cli bench specs/dsa_v32.yaml --training-step --seqlens 65536 --out "$W/step" \
    2>&1 | grep -v "^\s*\(backward: \)\?void" | tee "$W/step/step.log" | tail -25
pack
