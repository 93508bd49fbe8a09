#!/usr/bin/env bash
# The device calls that time and check what session 12 built untimed (no machine could be started that session),
# most needed first. Each call <= 9.5 min, every piece capped (a T of 0 skips a piece); all files of a call go
# under one folder, packed into $OUT/all.tgz after each piece (the device returns 8 files a call):
#   CALL=1  correctness of landed defaults and the training-side forms:
#           dsa_v32's training memory now/former, bit for bit (bench/dsa_mem_gpu.sh; schema 14's dQ in dtype, no
#           output copy, and the eager path's given indices as a view); nsa_paper's forward against float64 at
#           realistic sizes (the block scorer's unmasked trips, the default since 1de17ab); the distillation
#           forward's forms (bench/distill_forms_gpu.sh); the scatter backward's forms at 16k (bench/dsa_bwd.py).
#   CALL=2  decode (issue 19): the fused NSA launch form's and the chunked top-n forms' GPU tests and their bench
#           against split at batch 1 and 64 (bench/decode_fused_gpu.sh's tests; the bench times split, fused, the
#           top-n forms chunked / chunked_ticket in the split form and fused+chunked_ticket on the same caches:
#           docs/decode.md "Top-n forms"); the DSA decode kernel and top-k forms' tests and one bench of them all
#           (bench/dsa_decode_gpu.sh, bench/dsa_decode_topk_gpu.sh).
#   CALL=3  the NSA forward variants at Llama/Qwen/Gemma-2 heads (bench/nsa_forward_variants_gpu.sh), packed-batch
#           cost of issue 18's four specs (bench/varlen_gpu_check.sh PHASES=cost), dsa_v32's training step at 64k.
#   Next session, its own call (not a CALL= piece here): `bash bench/prefill_gpu.sh` — chunked prefill (issue 18)
#           after the host-built index lists and in-place/page-gathered paged keys (docs/varlen.md "What changed",
#           untimed): the GPU tests, nsa_paper and dsa_v32 64k in 8k chunks with chunk_host_ms, nsa_paper --gather.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> CALL=1|2|3 bash bench/queue_gpu.sh   (T1.. re-split a call)
set -uo pipefail
FINAL=${OUT:-/tmp/out}
W=/tmp/queue_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
piece() { [ "$1" != 0 ]; }  # piece T: false for a T of 0 (timeout(1) would read 0 as no limit)
env_in() { GPU_ENV_AUTOTUNE=off OUT=$1 source bench/gpu_env.sh; }
case ${CALL:-1} in
1)
  piece ${T1:=95} && { OUT=$W/mem MODES="now former" MEM_TIMEOUT=$T1 bash bench/dsa_mem_gpu.sh | tail -20; pack; }
  piece ${T2:=45} && { mkdir -p $W/nsafwd; timeout $T2 python -m pytest -q -rfE --tb=short -p no:cacheprovider \
      generated/test_nsa_paper.py -k forward_realistic 2>&1 | tail -8 | tee $W/nsafwd/forward_realistic.log; pack; }
  piece ${T3:=80} && piece ${T4:=130} && { OUT=$W/distill CHECK_TIMEOUT=$T3 BENCH_TIMEOUT=$T4 \
      bash bench/distill_forms_gpu.sh | tail -30; pack; }
  piece ${T5:=120} && { ( env_in $W/bwd
      timeout $T5 python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 --forms ${BWD_FORMS:-all} --top 2 \
        --reps 3 --form-reps 3 --no-det --json "$W/bwd/${day}_dsa_bwd_forms.jsonl" 2>&1 \
        | tee "$W/bwd/dsa_bwd_forms.log" | tail -30 ); pack; }
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
  piece ${T5:=120} && { OUT=$W/dsadec PHASE=bench BENCH_TIMEOUT=$T5 FORMS="plan ks_pf+wide ks_pf_k32+wide \
ks_pf_k32+wide_w8 fold_list ks_pf_k32+wide+fold_list ks_pf_k32+wide+fold_list_s64" \
      bash bench/dsa_decode_topk_gpu.sh | tail -30; pack; }
  ;;
3)
  piece ${T1:=160} && { OUT=$W/nsafwd LLAMA_TIMEOUT=$((T1 * 7 / 18)) QWEN_TIMEOUT=$((T1 * 4 / 18)) \
      GEMMA_TIMEOUT=$((T1 * 7 / 18)) TEST_TIMEOUT=0 bash bench/nsa_forward_variants_gpu.sh | tail -30; pack; }
  # The packed-batch cost: each (spec, batch, pass) process capped at 50 s, the whole piece at T2.
  piece ${T2:=270} && { OUT=$W/varlen PHASES=cost BENCH_TIMEOUT=50 \
      COST_SPECS="${COST_SPECS:-specs/nsa_paper.yaml specs/models/model_llama3_8b.yaml specs/dsa_v32.yaml}" \
      timeout $T2 bash bench/varlen_gpu_check.sh; pack; }
  piece ${T3:=75} && { ( env_in $W/step
      timeout $T3 python -m specgen.cli bench specs/dsa_v32.yaml --training-step --seqlens 65536 --out "$W/step" \
        2>&1 | grep -v "^\s*\(backward: \)\?void" | tee "$W/step/step.log" | tail -25 ); pack; }
  ;;
*) echo "CALL must be 1, 2 or 3" >&2; exit 2 ;;
esac
