#!/usr/bin/env bash
# Session 12's device calls (each <= 9.5 min), every piece capped, all files of a call under one folder packed into
# $OUT/all.tgz after each piece (the device returns 8 files a call):
#   CALL=a: dsa_v32's training memory now/former (bench/dsa_mem_gpu.sh), the fused NSA decode form's GPU tests
#           (bench/decode_fused_gpu.sh) and its batch-1 bench against the split form, the DSA decode forms' tests and
#           and top-k forms (bench/dsa_decode_topk_gpu.sh), the scatter backward's forms at 16k (bench/dsa_bwd.py),
#           the NSA forward variants at Llama heads;
#   CALL=b: packed-batch cost of issue 18's four specs (bench/varlen_gpu_check.sh PHASES=cost), dsa_v32's training
#           step at 64k, the NSA forward variants at Qwen and Gemma-2 heads, the fused decode form at batch 64.
#   CALL=c: the short form of a (below).
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> CALL=a|b|c bash bench/session12_gpu.sh
set -uo pipefail
FINAL=${OUT:-/tmp/out}
W=/tmp/session12_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
if [ "${CALL:-a}" = a ]; then
  OUT=$W/mem MODES="now former" MEM_TIMEOUT=${T1:-100} bash bench/dsa_mem_gpu.sh | tail -20; pack
  OUT=$W/dec PHASE=tests TEST_TIMEOUT=${T2:-60} bash bench/decode_fused_gpu.sh; pack
  ( GPU_ENV_AUTOTUNE=off OUT=$W/dec source bench/gpu_env.sh
    timeout ${T3:-55} python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches 1 --seqlens 131072 65536 \
      --decode-forms split fused --out "$W/dec/results" 2>&1 | tee "$W/dec/decode_fused_bench.log" | tail -16 ); pack
  # The DSA decode's kernel forms and top-k forms in one bench (tests of the top-k forms first).
  OUT=$W/dsadec PHASE=tests TEST_TIMEOUT=${T4:-55} bash bench/dsa_decode_topk_gpu.sh | tail -12; pack
  OUT=$W/dsadec PHASE=bench BENCH_TIMEOUT=${T5:-90} \
      FORMS="plan ks_pf+wide ks_pf_k32+wide ks_pf_k32+wide_w8 ks_pf_k32+wide+fold_list ks_pf_k32+wide+fold_list_s64" \
      bash bench/dsa_decode_topk_gpu.sh | tail -30; pack
  # The scatter backward's forms at 16k (each form's gradients compared with w8's in the bench).
  ( GPU_ENV_AUTOTUNE=off OUT=$W/bwd source bench/gpu_env.sh
    timeout ${T6:-110} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 --forms ${BWD_FORMS:-all} --top 2 \
      --reps 3 --form-reps 3 --no-det --json "$W/bwd/${day}_dsa_bwd_forms.jsonl" 2>&1 | tee "$W/bwd/dsa_bwd_forms.log" \
      | tail -30 ); pack
  OUT=$W/nsafwd LLAMA_TIMEOUT=${T7:-60} QWEN_TIMEOUT=0 GEMMA_TIMEOUT=0 TEST_TIMEOUT=0 \
      bash bench/nsa_forward_variants_gpu.sh | tail -30; pack
elif [ "${CALL}" = c ]; then
  # (a T of 0 skips its piece) The short form of call a (<= 8 min): no decode bench of the NSA fused form, no top-k tests; the NSA forward's
  # default (the scorer's unmasked trips) checked against float64 at nsa_paper's realistic sizes instead.
  OUT=$W/mem MODES="now former" MEM_TIMEOUT=${T1:-95} bash bench/dsa_mem_gpu.sh | tail -20; pack
  mkdir -p $W/nsafwd
  timeout ${T2:-60} python -m pytest -q -rfE --tb=short -p no:cacheprovider generated/test_nsa_paper.py \
      -k forward_realistic 2>&1 | tail -8 | tee $W/nsafwd/forward_realistic.log; pack
  [ "${T3:-50}" = 0 ] || { OUT=$W/dec PHASE=tests TEST_TIMEOUT=${T3:-50} bash bench/decode_fused_gpu.sh | tail -12; pack; }
  [ "${T4:-80}" = 0 ] || { OUT=$W/dsadec PHASE=bench BENCH_TIMEOUT=${T4:-80} \
      FORMS="plan ks_pf_k32+wide ks_pf_k32+wide+fold_list ks_pf+wide_w8+fold_list_s64" \
      bash bench/dsa_decode_topk_gpu.sh | tail -30; pack; }
  ( GPU_ENV_AUTOTUNE=off OUT=$W/bwd source bench/gpu_env.sh
    timeout ${T5:-90} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 --forms ${BWD_FORMS:-all} --top 2 \
      --reps 3 --form-reps 3 --no-det --json "$W/bwd/${day}_dsa_bwd_forms.jsonl" 2>&1 | tee "$W/bwd/dsa_bwd_forms.log" \
      | tail -30 ); pack
  OUT=$W/nsafwd LLAMA_TIMEOUT=${T6:-45} QWEN_TIMEOUT=0 GEMMA_TIMEOUT=0 TEST_TIMEOUT=0 \
      bash bench/nsa_forward_variants_gpu.sh | tail -30; pack
else
  OUT=$W/varlen PHASES=cost BENCH_TIMEOUT=${T1:-55} bash bench/varlen_gpu_check.sh; pack
  GPU_ENV_AUTOTUNE=off OUT=$W/step source bench/gpu_env.sh
  timeout ${T2:-75} python -m specgen.cli bench specs/dsa_v32.yaml --training-step --seqlens 65536 --out "$W/step" \
      2>&1 | grep -v "^\s*\(backward: \)\?void" | tee "$W/step/step.log" | tail -25
  pack
  OUT=$W/nsafwd LLAMA_TIMEOUT=0 QWEN_TIMEOUT=${T3:-45} GEMMA_TIMEOUT=${T4:-60} TEST_TIMEOUT=0 \
      bash bench/nsa_forward_variants_gpu.sh | tail -30; pack
  ( GPU_ENV_AUTOTUNE=off OUT=$W/dec source bench/gpu_env.sh
    timeout ${T5:-60} python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches 64 --seqlens 65536 \
      --decode-forms split fused --out "$W/dec" 2>&1 | tee "$W/dec/decode_fused_bench64.log" | tail -16 ); pack
fi
