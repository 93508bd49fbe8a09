#!/usr/bin/env bash
# Session 12's device calls (each <= 9.5 min), every piece capped, all files of a call under one folder packed into
# $OUT/all.tgz after each piece (the device returns 8 files a call):
#   CALL=a: dsa_v32's training memory now/former (bench/dsa_mem_gpu.sh), the fused decode form's GPU tests and its
#           bench against the split form (bench/decode_fused_gpu.sh), the NSA forward variants at Llama/Qwen heads;
#   CALL=b: packed-batch cost of issue 18's four specs (bench/varlen_gpu_check.sh PHASES=cost), dsa_v32's training
#           step at 64k, the NSA forward variants at Gemma-2 heads.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> CALL=a|b bash bench/session12_gpu.sh
set -uo pipefail
FINAL=${OUT:-/tmp/out}
W=/tmp/session12_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
if [ "${CALL:-a}" = a ]; then
  OUT=$W/mem MODES="now former" MEM_TIMEOUT=${T1:-130} bash bench/dsa_mem_gpu.sh | tail -20; pack
  OUT=$W/dec TEST_TIMEOUT=${T2:-120} BENCH1_TIMEOUT=${T3:-75} BENCH64_TIMEOUT=${T4:-55} bash bench/decode_fused_gpu.sh; pack
  OUT=$W/nsafwd LLAMA_TIMEOUT=${T5:-70} QWEN_TIMEOUT=${T6:-45} GEMMA_TIMEOUT=0 TEST_TIMEOUT=0 \
      bash bench/nsa_forward_variants_gpu.sh | tail -30; pack
else
  OUT=$W/varlen PHASES=cost BENCH_TIMEOUT=${T1:-55} bash bench/varlen_gpu_check.sh; pack
  GPU_ENV_AUTOTUNE=off OUT=$W/step source bench/gpu_env.sh
  timeout ${T2:-75} python -m specgen.cli bench specs/dsa_v32.yaml --training-step --seqlens 65536 --out "$W/step" \
      2>&1 | grep -v "^\s*\(backward: \)\?void" | tee "$W/step/step.log" | tail -25
  pack
  OUT=$W/nsafwd LLAMA_TIMEOUT=0 QWEN_TIMEOUT=0 GEMMA_TIMEOUT=${T3:-70} TEST_TIMEOUT=${T4:-30} \
      bash bench/nsa_forward_variants_gpu.sh | tail -30; pack
fi
