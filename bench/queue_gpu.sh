#!/usr/bin/env bash
# The device calls for what session 13 changed or built untimed, most needed first (session 13's H200 run, commit
# 6cc8fb1, is bench/results/SUMMARY.md's "Session of 2026-12-07 (morning)"). Each call <= 9.5 min, every piece
# capped (a T of 0 skips a piece); all files of a call go under one folder, packed into $OUT/all.tgz after each
# piece (the device returns 8 files a call). A warm machine goes back 30 s after a call: send the next at once.
#   CALL=1  the training side on today's defaults (issue 17): the indexer's tests (the fp8 rounding fix, the 1e-3
#           score tolerance) and its timing (key-major scores at 3 stages + top-k at 8 warps, the new default,
#           against each half and the former default: bench/indexer_gpu.sh); dsa_v32's whole training step at 64k
#           against dense (specgen bench --training-step: km_ks_k64 scatter backward, km_pf distillation forward);
#           the scatter kernel's atomics alone (bench/dsa_bwd.py --atomics-floor); nsa_paper's realistic forward
#           tests, the varlen one included (cut by the cap last time).
#   CALL=2  decode (issue 19): the chunked top-n forms' and the fused form's GPU tests and their bench against
#           split at batch 1 and 64 (bench/decode_fused_gpu.sh; docs/decode.md "Top-n forms"); the DSA decode
#           forms' and top-k forms' tests (the fold histogram fix) and a bench of the new plan default
#           (ks_pf_k32+wide_w8+radix) against base+tile and the fold_list forms on it.
#   CALL=3  the NSA forward variants at Llama/Qwen/Gemma-2 heads (bench/nsa_forward_variants_gpu.sh, its TypeError
#           fixed), packed-batch cost of the rows not run (nsa_config_a; dsa_v32 training and the 256-document batch).
#   CALL=4  chunked prefill (issue 18) after the host-built index lists and in-place / page-gathered paged keys
#           (docs/varlen.md, untimed): bash bench/prefill_gpu.sh (tests, nsa_paper and dsa_v32 64k in 8k chunks with
#           chunk_host_ms, nsa_paper --gather).
#   CALL=5  the decode compression kernel's forms (cmp_*: pipelined stages, split rule; untimed): tests + bench.
#   CALL=6  the scatter backward's forms with fewer atomics (issue 17; docs/backward.md "Fewer atomics"; untimed):
#           r64_rl_w16, split_k64, split_k128 beside km_ks_k64 at 16k and 64k, the atomics floor, vector widths
#           (bash bench/dsa_bwd_atomics_gpu.sh: its tests, then the bench).
#   Then: the GPU suite for issue 15 (`GPU_WORKERS=3 bash bench/gpu_suite.sh gpu`, then `rest`), the model matrix
#           at 16k and 32k (`bash bench/model_matrix_gpu.sh "16384 32768" specs/models/*.yaml specs/nsa_config_a.yaml`).
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> CALL=1|2|3|4|5|6 bash bench/queue_gpu.sh   (T1.. re-split a call)
set -uo pipefail
FINAL=${OUT:-/tmp/out}
W=/tmp/queue_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
piece() { [ "$1" != 0 ]; }  # piece T: false for a T of 0 (timeout(1) would read 0 as no limit)
env_in() { GPU_ENV_AUTOTUNE=off OUT=$1 source bench/gpu_env.sh; }
case ${CALL:-1} in
1)
  piece ${T1:=150} && { OUT=$W/idx TEST_TIMEOUT=$((T1 * 2 / 5)) BENCH_TIMEOUT=$((T1 * 3 / 5)) \
      SEQLENS="32768 65536" bash bench/indexer_gpu.sh 2>&1 | grep -v "^\s*void" | tail -30; pack; }
  piece ${T2:=200} && { ( env_in $W/step
      timeout $T2 python -m specgen.cli bench specs/dsa_v32.yaml --training-step --seqlens 65536 --out "$W/step" \
        2>&1 | grep -v "^\s*\(backward: \)\?void" | tee "$W/step/step.log" | tail -30 ); pack; }
  piece ${T3:=80} && { ( env_in $W/bwd
      timeout $T3 python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 --atomics-floor --reps 3 --no-det \
        --json "$W/bwd/${day}_dsa_bwd_atomics.jsonl" 2>&1 | tee "$W/bwd/dsa_bwd_atomics.log" | tail -20 ); pack; }
  piece ${T4:=80} && { mkdir -p $W/nsafwd; timeout $T4 python -m pytest -q -rfE --tb=short -p no:cacheprovider \
      generated/test_nsa_paper.py -k "forward_realistic" 2>&1 | tail -8 | tee $W/nsafwd/forward_realistic.log; pack; }
  ;;
2)
  piece ${T1:=120} && { OUT=$W/dec PHASE=tests TEST_TIMEOUT=$T1 bash bench/decode_fused_gpu.sh | tail -12; pack; }
  piece ${T2:=170} && { ( env_in $W/dec
      for b in "1 131072 65536" "64 65536"; do
        set -- $b; bb=$1; shift
        timeout $((T2 / 2)) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens "$@" \
          --decode-forms ${NSA_FORMS:-split fused chunked chunked_ticket fused+chunked_ticket} --out "$W/dec/results" \
          2>&1 | tee -a "$W/dec/decode_fused_bench.log" | tail -24
      done ); pack; }
  piece ${T3:=60} && { OUT=$W/dsadec PHASE=tests TEST_TIMEOUT=$T3 bash bench/dsa_decode_gpu.sh | tail -12; pack; }
  piece ${T4:=60} && { OUT=$W/dsadec PHASE=tests TEST_TIMEOUT=$T4 bash bench/dsa_decode_topk_gpu.sh | tail -12; pack; }
  piece ${T5:=120} && { OUT=$W/dsadec PHASE=bench BENCH_TIMEOUT=$T5 FORMS="plan base+tile ks_pf_k32+wide_w8+fold_list ks_pf_k32+wide_w8+fold_list_s64" \
      bash bench/dsa_decode_topk_gpu.sh | tail -30; pack; }
  ;;
3)
  piece ${T1:=160} && { OUT=$W/nsafwd LLAMA_TIMEOUT=$((T1 * 7 / 18)) QWEN_TIMEOUT=$((T1 * 4 / 18)) \
      GEMMA_TIMEOUT=$((T1 * 7 / 18)) TEST_TIMEOUT=0 bash bench/nsa_forward_variants_gpu.sh | tail -30; pack; }
  # The packed-batch cost: each (spec, batch, pass) process capped at 50 s, the whole piece at T2.
  piece ${T2:=380} && { OUT=$W/varlen PHASES=cost BENCH_TIMEOUT=50 \
      COST_SPECS="${COST_SPECS:-specs/nsa_config_a.yaml specs/dsa_v32.yaml}" \
      timeout $T2 bash bench/varlen_gpu_check.sh; pack; }
  ;;
4)
  piece ${T1:=560} && { OUT=$W/prefill timeout $T1 bash bench/prefill_gpu.sh 2>&1 | tail -30; pack; }
  ;;
5)
  # The decode compression kernel's launch forms (docs/decode.md "Compression forms"): GPU tests, then timing at
  # batch 1 and 64 against split (the default) in one process per batch.
  piece ${T1:=90} && { mkdir -p $W/cmp; ( env_in $W/cmp; timeout $T1 python -m pytest -q -rfE --tb=short \
      -p no:cacheprovider tests/test_decode.py -k cmp_form 2>&1 | tail -8 | tee $W/cmp/cmp_form_tests.log ); pack; }
  piece ${T2:=150} && { ( env_in $W/cmp
      for bb in 64 1; do
        timeout $((T2 / 2)) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens 65536 \
          --decode-forms split cmp_s3 cmp_s3_r2 cmp_s4_r1 cmp_k32_r3 fused+cmp_s3_r2 --out "$W/cmp/results" \
          2>&1 | tee -a "$W/cmp/cmp_bench.log" | tail -14
      done ); pack; }
  ;;
6)
  piece ${T1:=540} && { OUT=$W/atomics TEST_TIMEOUT=$((T1 / 6)) BENCH_TIMEOUT=$((T1 * 5 / 6)) \
      bash bench/dsa_bwd_atomics_gpu.sh | tail -40; pack; }
  ;;
*) echo "CALL must be 1, 2, 3, 4, 5 or 6" >&2; exit 2 ;;
esac
