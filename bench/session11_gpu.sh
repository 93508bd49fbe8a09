#!/usr/bin/env bash
# One device-tool call (<= 10 min) of session 11's checks, most needed first, each piece capped so the call ends
# inside its limit; every piece's own files go under one folder, packed into $OUT/all.tgz after each piece (the
# device returns 8 files a call):
#   1. the fused distillation path (the default since session 10) on the GPU: dsa_v32's distillation tests;
#   2. DSA selection forward forms (key_split / prefetch) beside the default, V3.2 at 16k and 64k;
#   3. deterministic-mode backward at 16k after the inverse index's scatter_-free build;
#   4. the block-outer selection backward's launch config at Llama-3 heads, 64k: `wg` (the default) vs `w8`.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/session11_gpu.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"   # the environment each piece's script sets for itself too
FINAL=$OUT
W=/tmp/session11_out
mkdir -p "$W"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
OUT=$W/distill TEST_TIMEOUT=${T1:-150} BENCH_TIMEOUT=1 bash bench/distill_gpu.sh; pack
OUT=$W/dsafwd FWD_TIMEOUT=${T2:-170} bash bench/dsa_fwd_gpu.sh; pack
OUT=$W/detmode BENCH_TIMEOUT=${T3:-120} bash bench/detmode_gpu.sh; pack
mkdir -p "$W/variants"
SPECGEN_AUTOTUNE=0 timeout ${T4:-110} python bench/variants_bench.py --only llama --reps 3 --variants wg w8 \
    --json "$W/variants/variants_llama.jsonl" 2>&1 | tee "$W/variants/variants_llama.log" | tail -15
pack
