#!/usr/bin/env bash
# The device calls for what the sessions changed or built untimed (each session's GPU run is a section of
# bench/results/SUMMARY.md, the last "Session of 2026-12-07 (night)", commit b6eeeaf). Each call <= 9.5 min, every piece
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
#           (bash bench/dsa_bwd_atomics_gpu.sh: its tests, then the bench); then dsa_gqa16_4's backward on the
#           scatter path (the plan's since c663314) against its inverse-index kernels (deterministic mode) at 16k and 64k.
#   Then: the GPU suite for issue 15 (`GPU_WORKERS=3 bash bench/gpu_suite.sh gpu`, then `rest`), the model matrix
#           at 16k and 32k (`bash bench/model_matrix_gpu.sh "16384 32768" specs/models/*.yaml specs/nsa_config_a.yaml`).
#   CALL=7  the block-outer selection's Triton work list (issue 16; docs/selection_order.md "Work list forms";
#           timed at 2256469, the plan's default since): its GPU tests (the cursor hand-off needs real hardware), the list at 16k-64k
#           with the chunk/tile sweep, and Llama-3's whole forward and fwd+bwd under both forms.
#   CALL=8  the dense-stage distillation's register-operand forms (issue 17; docs/distill.md "The dense forward's
#           forms"; untimed, default base): bash bench/distill_dense_forms_gpu.sh (compile report, checks, timing).
#   CALL=9  the GPU suite's remainder (issue 15), resumable: the GPU-only tests (SUITE=gpu, default) or the rest
#           (SUITE=rest) that no log of bench/results dated 2026-12-07 or later, nor an earlier call on this warm
#           machine (.gpu-suite-logs/), shows passing; one at a time for gpu (their references take tens of GB),
#           on WORKERS xdist workers for rest. Call again until it reports 0 left. FIRST=<regex> runs the ids it
#           matches first (FIRST=cuda_graph: issue 18's packed training call in a graph). The suite's cap is 470 s
#           (T1): collection takes ~30 s, and a call the device's 600 s limit cuts keeps no log of what passed.
#   CALL=10 the decode's "whole" launch form (issue 19; docs/decode.md "Launch forms"; "auto", the default since
#           c663314, runs it at batch 64): its tests (GPU: nsa_paper at 64k against split, a replayed CUDA graph, the
#           float64 reference; whole now at 3 stages), then nsa_paper at 64k, batch 64, 33 (132 programs: the rule's
#           edge) and 16 (split's side), split / fused+cmp_s3_r2 / whole / whole_st / auto.
# Set SPECGEN_COMMIT: the device copy's .git can be stale (it printed 624f9c6 for c9634f5 on 2026-12-07).
#   CALL=11 one call of the most needed pieces (for a session that gets a single machine): the scatter forms at 16k,
#           nsa_paper's chunked prefill, the whole decode forms at batch 64 (whole_st too), dsa_gqa16_4's scatter
#           backward at 16k.
#   CALL=12 issue 18's last item: a packed training call in a CUDA graph (GPU test), then more packed GPU tests.
#   CALL=14 issue 16's model matrix at 64k on the H100 with today's defaults (the Triton work list since a16c93e):
#           the five model specs and nsa_config_a, forward / backward / forward+backward against cuDNN and flash.
#   CALL=15 the decode's "cw" launch form and "pdl" launch chain (issue 19, batch 1; untimed): their GPU tests and
#           their bench against split and fused at batch 1 (128k, 64k) and 16.
#   CALL=13 issue 19's paged-cache steps against contiguous ones on the same values, and q_len 2 and 4 steps
#           (specgen bench --decode --layouts contiguous paged; nsa_paper and dsa_v32 at 64k).
#   CALL=16 the fp8 rounding in one launch (runtime.fp8), the split cap ms<N> and the epilogue's loads cs<N> on the
#           decode (issue 19, batch 1; untimed): tests (with the whole form's realistic test: "auto" runs cw below
#           its rule now), dsa_v32's step at 64k x 1 / x 64 (plan, ms8, ms16, cs32, fold_list_s64 on wide_w8),
#           nsa_paper's at 128k / 64k x 1 (cs32, cs64), the indexer + top-k at 32k / 64k.
#   CALL=17 issue 19's model-shape decode target: the model specs at 64k, `--batches max` (the largest batch whose
#           caches fit) and 1, against SDPA.
#   CALL=18 the "persist" decode launch form (one launch, virtual program ids; untimed): its GPU tests, then
#           nsa_paper at 128k / 64k x 1 and 64k x 16 against cw.
# Next session, most needed first (15, 14, 13's q_len 4 and 8 ran at b6eeeaf: SUMMARY's "Session of 2026-12-07
# (night)"): 16 (tests first), 18 (persist), 17, 9 (the GPU-only tests left, 22 of 161; then SUITE=rest), 3 (T2=0: the NSA
# forward variants), 1 (T1=0 T3=0 T4=0: the training step on today's defaults, the dense distillation's qreg
# forms now V3.2's), 6, then 9 until 0 left.
#   CALL=19 one call for a session short of device time: persist's and the fp8 launch's GPU tests, persist / cw at
#           batch 1, dsa_v32's batch-1 forms (ms<N>, cs<N>, fold_list_s64), V3.2's training step at 16k with the
#           attention backward's p shared (checked there against the recomputing loss), Llama-3's decode at
#           --batches max.
#   CALL=20 issue 16's nsa_paper row at 64k (last timed 2026-11-24) and three model specs at 16k / 32k.
#   CALL=21 a query's head chunks side by side (chunk_inner: V3.2's forward and scatter backward at 16k / 64k), the
#           dense distillation stage from the unabsorbed heads (bench/distill_unabsorbed_gpu.sh at 32k).
#   CALL=22 the forward's plan variants at model heads (timed at dc0b177; now the defaults and baselines), nsa_paper at 64k
#           (CALL=20's first piece), the GPU tests of chunk_inner and the shared p, V3.2's step (STEP_T, 16k) with the
#           shared p.
#   CALL=23 the GPU-only tests that failed at dc0b177 (persist, whole, the DSA pdl chain) with their tracebacks, the
#           scatter forms (chunk_inner) at 64k, the unabsorbed warm-up loss's forward on 16 warps / 128-key trips.
#   CALL=24 after the fixes of 2026-12-08 (the decode epilogue's str default, torch 2.11's custom-op indexing, the
#           interpreter left on by an in-process sweep, the tests' GPU-invalid tiles): the rest phase's failures again
#           (`CALL=9 SUITE=rest` reads the committed 2026-12-08 log and reruns only what did not pass), then the persist
#           decode form against cw at 128k x 1 (its 2026-12-08 piece brought nothing back in 110 s: one seqlen now, a
#           longer cap), then dsa_v32's top-k forms at batch 64 beside batch 1 (fold_list_s64 won at batch 1: 67 against
#           81 us; the batch-64 side decides whether it becomes a batch rule), then the d64 MHA's decode at its largest
#           batch (7.4x, 1.52x its floor, where the other model specs reach 1.03-1.12x) with the whole form at 4 stages
#           and at 32-key tiles: its 64-key tiles of 64-dim rows keep 32 KB an SM in flight at the plan's 3 stages where
#           d128's keep 64 KB (sm_90 compile report, bench/cmp_decode_offline.py --launch whole).
# Next session, most needed first: 24, then 9 SUITE=rest until 0 left (issue 15), 14 (the model matrix at 64k on
# today's defaults), 20 with T1=0 and the MHA specs (16k / 32k), 18, 3 (T1=0: the packed-batch cost), 6.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> CALL=1..24 bash bench/queue_gpu.sh   (T1.. re-split a call)
set -uo pipefail
FINAL=${OUT:-/tmp/out}
day=$(date -u +%Y-%m-%d)  # the file names' date (CALL=9 names logs outside env_in, which sets it too)
W=/tmp/queue_out
mkdir -p "$W" "$FINAL"
pack() { tar -czf "$FINAL/all.tgz" -C "$W" . ; }
piece() { [ "$1" != 0 ]; }  # piece T: false for a T of 0 (timeout(1) would read 0 as no limit)
share() { local t=$(($1 / $2)); echo $((t > 0 ? t : 1)); }  # a piece's T shared by N runs, never 0 (no limit)
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
        timeout $(share $T2 2) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens "$@" \
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
        timeout $(share $T2 2) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens 65536 \
          --decode-forms split cmp_s3 cmp_s3_r2 cmp_s4_r1 cmp_k32_r3 fused+cmp_s3_r2 --out "$W/cmp/results" \
          2>&1 | tee -a "$W/cmp/cmp_bench.log" | tail -14
      done ); pack; }
  ;;
6)
  piece ${T1:=420} && { OUT=$W/atomics TEST_TIMEOUT=$((T1 / 6)) BENCH_TIMEOUT=$((T1 * 5 / 6)) \
      bash bench/dsa_bwd_atomics_gpu.sh | tail -40; pack; }
  # The small-group GQA DSA spec's backward on the scatter path (the plan's since c663314) against the inverse-index
  # kernels (its deterministic timing), same inputs.
  piece ${T2:=130} && { ( env_in $W/atomics; timeout $T2 python bench/dsa_bwd.py specs/models/dsa_gqa16_4.yaml \
      --seqlens 16384 65536 --reps 3 --det-reps 1 \
      --json "$W/atomics/${day}_dsa_gqa16_4_bwd_scatter_${COMMIT}.jsonl" 2>&1 | grep -v "^\s*void" \
      | tee $W/atomics/dsa_gqa_bwd.log | tail -12 ); pack; }
  ;;
7)
  piece ${T1:=120} && { mkdir -p $W/wl; ( env_in $W/wl; timeout $T1 python -m pytest -q -rfE --tb=short \
      -p no:cacheprovider tests/test_worklist.py 2>&1 | tail -8 | tee $W/wl/worklist_tests.log ); pack; }
  piece ${T2:=200} && { ( env_in $W/wl; timeout $T2 python bench/worklist_bench.py --forced --packed --sweep \
      --json "$W/wl/${day}_worklist_${COMMIT}.jsonl" 2>&1 | tee $W/wl/worklist_bench.log | tail -30 ); pack; }
  piece ${T3:=200} && { ( env_in $W/wl; timeout $T3 python bench/worklist_bench.py --T 65536 --model \
      --json "$W/wl/${day}_worklist_model_${COMMIT}.jsonl" 2>&1 | tee $W/wl/worklist_model.log | tail -20 ); pack; }
  ;;
8)
  piece ${T1:=540} && { OUT=$W/dd bash bench/distill_dense_forms_gpu.sh 2>&1 | tail -40; pack; }
  ;;
9)
  mkdir -p $W/suite .gpu-suite-logs
  suite=${SUITE:-gpu}; mark="skipif"; [ "$suite" = rest ] && mark="not skipif"
  python -m pytest --collect-only -q -p no:cacheprovider -m "$mark" generated tests 2>/dev/null | grep "::" \
      > $W/suite/ids_$suite.txt
  logs=$(ls bench/results/*_gpu_tests_*.log .gpu-suite-logs/*.log 2>/dev/null | awk -F/ '$NF >= "2026-12-07" || $1 == ".gpu-suite-logs"')
  python bench/gpu_suite_left.py $W/suite/ids_$suite.txt $logs > $W/suite/left_$suite.txt
  if [ -n "${FIRST:-}" ]; then  # FIRST=<regex>: the ids it matches run first (a cut call still brings them back)
    grep -E "$FIRST" </dev/null; [ $? -le 1 ] || { echo "FIRST is not a valid extended regex: $FIRST" >&2; exit 2; }
    { grep -E "$FIRST" $W/suite/left_$suite.txt; grep -vE "$FIRST" $W/suite/left_$suite.txt; } > $W/suite/ordered.txt
    mv $W/suite/ordered.txt $W/suite/left_$suite.txt
  fi
  echo "$suite: $(wc -l < $W/suite/left_$suite.txt) of $(wc -l < $W/suite/ids_$suite.txt) tests left"
  if [ "${T1:-470}" = 0 ]; then echo "CALL=9 needs a cap: T1 > 0" >&2; exit 2; fi
  if [ -s $W/suite/left_$suite.txt ]; then
    OUT=$W/suite IDS=$W/suite/left_$suite.txt GPU_TIMEOUT=${T1:=470} REST_TIMEOUT=${T1} WORKERS=${WORKERS:-12} \
        bash bench/gpu_suite.sh $suite --maxfail=2000 2>&1 | tail -12
    for f in $W/suite/gpu_tests_*.log; do cp "$f" ".gpu-suite-logs/${day}_$(basename "$f" .log)_$(date +%H%M%S).log"; done
  fi
  pack
  ;;
10)
  # The whole launch form (docs/decode.md "Launch forms"): GPU tests, then timing at batch 64 (B x kv groups = 256
  # programs: "auto" runs whole), 33 (132: the rule's edge) and 16 (64 programs: "auto" ran split, cw since b6eeeaf) against split
  # and the fused form's best compression form, in one process per batch.
  piece ${T1:=200} && { mkdir -p $W/whole; ( env_in $W/whole; timeout $T1 python -m pytest -q -rfE --tb=short \
      -p no:cacheprovider tests/test_decode.py -k whole 2>&1 | tail -8 | tee $W/whole/whole_tests.log ); pack; }
  piece ${T2:=300} && { ( env_in $W/whole
      for bb in 64 33 16; do
        timeout $(share $T2 3) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens 65536 \
          --decode-forms ${WHOLE_FORMS:-split fused+cmp_s3_r2 whole whole_st auto} --out "$W/whole/results" \
          2>&1 | tee -a "$W/whole/whole_bench.log" | tail -16
      done ); pack; }
  ;;
11)
  # One call of the most needed pieces when the session gets one machine (device time short): each capped, most
  # needed first. The scatter backward's forms at 16k (issue 17), nsa_paper's chunked prefill (issue 18), the whole
  # decode forms at batch 64 (issue 19), dsa_gqa16_4's backward on the scatter path (issue 17).
  mkdir -p $W/mix
  piece ${T1:=230} && { ( env_in $W/mix; timeout $T1 python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 \
      --forms km_ks_k64 r64_rl_w16 split_k64 split_k128 --reps 3 --no-det \
      --json "$W/mix/${day}_dsa_bwd_forms_${COMMIT}.jsonl" 2>&1 | grep -v "^\s*\(backward: \)\?void" \
      | tee $W/mix/dsa_bwd_forms.log | tail -10 ); pack; }
  piece ${T2:=110} && { ( env_in $W/mix; timeout $T2 python bench/prefill_cost.py specs/nsa_paper.yaml \
      --json "$W/mix/${day}_prefill_cost_${COMMIT}.jsonl" 2>&1 | tee $W/mix/prefill_cost.log | tail -8 ); pack; }
  piece ${T3:=130} && { ( env_in $W/mix; timeout $T3 python -m specgen.cli bench specs/nsa_paper.yaml --decode \
      --batches 64 --seqlens 65536 --decode-forms split fused+cmp_s3_r2 whole whole_st whole+cmp_s3_r2 \
      --out "$W/mix/results" 2>&1 | tee $W/mix/whole_bench.log | tail -12 ); pack; }
  piece ${T4:=90} && { ( env_in $W/mix; timeout $T4 python bench/dsa_bwd.py specs/models/dsa_gqa16_4.yaml \
      --seqlens 16384 --reps 3 --det-reps 1 \
      --json "$W/mix/${day}_dsa_gqa16_4_bwd_scatter_${COMMIT}.jsonl" 2>&1 | grep -v "^\s*void" \
      | tee $W/mix/dsa_gqa_bwd.log | tail -6 ); pack; }
  ;;
12)
  # Issue 18's last item: a packed training call captured in one CUDA graph (tests/test_varlen.py), then the packed
  # GPU tests of the specs the last run did not cover (dsa_small, nsa_token, nsa_mqa; dsa_v32's 64k ones need ~67 GB).
  mkdir -p $W/varlen
  piece ${T1:=150} && { ( env_in $W/varlen; timeout $T1 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      tests/test_varlen.py -k "cuda_graph or read_nothing" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" \
      | tee $W/varlen/${day}_gpu_tests_varlen_graph_${COMMIT}.log ); pack; }
  piece ${T2:=300} && { ( env_in $W/varlen; timeout $T2 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      generated/test_dsa_small.py generated/test_nsa_token.py generated/test_nsa_mqa.py -k varlen 2>&1 \
      | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | tee $W/varlen/${day}_gpu_tests_varlen_more_${COMMIT}.log ); pack; }
  ;;
13)
  # Issue 19's paged-cache target (paged steps within 1.1x of contiguous ones, same values) and its q_len 2 and 4
  # steps: nsa_paper and dsa_v32 at 64k, batch 64 and 1, plan defaults, each row on both layouts.
  mkdir -p $W/paged
  for s in nsa_paper dsa_v32; do
    piece ${T1:=130} && { ( env_in $W/paged; timeout $T1 python -m specgen.cli bench specs/$s.yaml --decode \
        --batches 64 1 --seqlens 65536 --layouts contiguous paged --out "$W/paged/results" 2>&1 \
        | grep -v "UserWarning\|return sdpa\|_warn_once" | tee -a $W/paged/paged_bench.log | tail -8 ); pack; }
    for ql in 2 4; do
      piece ${T2:=70} && { ( env_in $W/paged; timeout $T2 python -m specgen.cli bench specs/$s.yaml --decode \
          --batches 64 --seqlens 65536 --q-len $ql --layouts contiguous paged --out "$W/paged/results" 2>&1 \
          | grep -v "UserWarning\|return sdpa\|_warn_once" | tee -a $W/paged/paged_bench.log | tail -5 ); pack; }
    done
  done
  ;;
14)
  mkdir -p $W/matrix
  piece ${T1:=560} && { ( env_in $W/matrix; timeout $T1 python -m specgen.cli bench specs/models/model_llama3_8b.yaml \
      specs/models/model_qwen25_7b.yaml specs/nsa_config_a.yaml specs/models/model_gemma2_9b.yaml \
      specs/models/model_mha32_d128.yaml specs/models/model_mha16_d64.yaml --seqlens 65536 --out "$W/matrix" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once" | tee $W/matrix/bench_${COMMIT}.log | tail -30 ); pack; }
  ;;
15)
  # The "cw" launch form and the "pdl" chain (docs/decode.md "Launch forms", "Launch chains"; untimed): their GPU
  # tests, then nsa_paper's step at batch 1 (128k, 64k) and 16 (64k) against split (the plan's below "auto"'s rule)
  # and fused, chunked_ticket top-n in all.
  mkdir -p $W/cw
  piece ${T1:=120} && { ( env_in $W/cw; timeout $T1 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      tests/test_decode.py tests/test_decode_forms.py -k "cw_form or launch_chain" 2>&1 \
      | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" \
      | tee $W/cw/${day}_gpu_tests_cw_${COMMIT}.log ); pack; }
  piece ${T2:=300} && { ( env_in $W/cw
      for b in "1 131072 65536" "16 65536"; do
        set -- $b; bb=$1; shift
        timeout $(share $T2 2) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb --seqlens "$@" \
          --decode-forms split cw fused split+pdl cw+pdl --out "$W/cw/results" 2>&1 \
          | grep -v "UserWarning\|return sdpa\|_warn_once\|^nsa_paper {" | tee -a "$W/cw/cw_bench.log" | tail -14
      done
      timeout $(share $T2 3) python -m specgen.cli bench specs/dsa_v32.yaml --decode --batches 1 --seqlens 65536 \
        --decode-forms plan pdl --out "$W/cw/results" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once\|^dsa_v32 {" \
        | tee -a "$W/cw/cw_bench.log" | tail -8 ); pack; }
  ;;
16)
  # The fp8 rounding in one launch (runtime.fp8; untimed), the split cap (ms<N>) and the epilogue's loads (cs<N>)
  # on dsa_v32's decode: the fp8
  # tests (the kernel on the GPU against the CPU's torch form, at a decode step's and a prefill chunk's size) and
  # the DSA step's GPU tests, then the step at 64k x 1 and x 64 under the plan, split caps 8 and 16 and the
  # fold_list top-k on wide_w8 (untimed there); then the indexer + top-k at 32k and 64k (its q_I / k_I rounding).
  mkdir -p $W/fp8
  piece ${T1:=120} && { ( env_in $W/fp8; timeout $T1 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      tests/test_runtime.py tests/test_decode_forms.py tests/test_decode.py \
      -k "fp8 or pdl_on_the_dsa or whole_form_realistic" 2>&1 \
      | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | tee $W/fp8/${day}_gpu_tests_fp8_${COMMIT}.log ); pack; }
  piece ${T2:=220} && { ( env_in $W/fp8
      for bb in 1 64; do
        timeout $(share $T2 2) python -m specgen.cli bench specs/dsa_v32.yaml --decode --batches $bb --seqlens 65536 \
          --decode-forms plan ms8 ms16 cs32 ms16+cs32 ks_pf_k32+wide_w8+fold_list_s64 \
          ks_pf_k32+wide_w8+fold_list_s64+ms16+cs32 \
          --out "$W/fp8/results" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once\|^dsa_v32 {" \
          | tee -a "$W/fp8/dsa_decode_ms.log" | tail -14
      done ); pack; }
  # The epilogue's loads at batch 1 (cs<N>, the descriptor's combine_sb; 8 the plan's): nsa_paper at 128k and 64k.
  piece ${T3:=100} && { ( env_in $W/fp8; timeout $T3 python -m specgen.cli bench specs/nsa_paper.yaml --decode \
      --batches 1 --seqlens 131072 65536 --decode-forms plan cs32 cs64 --out "$W/fp8/results" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once\|^nsa_paper {" | tee -a "$W/fp8/nsa_decode_cs.log" | tail -12 ); pack; }
  piece ${T4:=100} && { OUT=$W/fp8/idx TEST_TIMEOUT=1 BENCH_TIMEOUT=$T4 SEQLENS="32768 65536" \
      bash bench/indexer_gpu.sh 2>&1 | grep -v "^\s*void" | tail -20; pack; }
  ;;
17)
  # Issue 19's model-shape target (>= 8x dense at 64k with the largest batch whose caches fit; never timed): each
  # model spec's step at 64k at `--batches max` and at 1, the plan's forms, SDPA of the same run.
  mkdir -p $W/models
  for s in model_llama3_8b model_qwen25_7b model_gemma2_9b model_mha32_d128 model_mha16_d64; do
    piece ${T1:=95} && { ( env_in $W/models; timeout $T1 python -m specgen.cli bench specs/models/$s.yaml --decode \
        --batches max 1 --seqlens 65536 --out "$W/models/results" 2>&1 \
        | grep -v "UserWarning\|return sdpa\|_warn_once\|^$s {" | tee -a $W/models/models_decode.log | tail -8 ); pack; }
  done
  ;;
18)
  # The "persist" launch form (issue 19's 17 us at 128k x 1; untimed): its GPU tests first (a hang there means the
  # virtual-id argument failed: the cap ends it), then nsa_paper at batch 1 (128k, 64k) and 16 against cw.
  mkdir -p $W/persist
  piece ${T1:=150} && { ( env_in $W/persist; timeout -k 20 $T1 python -m pytest -v -rfE --tb=short \
      -p no:cacheprovider tests/test_decode.py -k "persist" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" \
      | tee $W/persist/${day}_gpu_tests_persist_${COMMIT}.log ); pack; }
  piece ${T2:=240} && { ( env_in $W/persist
      for b in "1 131072 65536" "16 65536"; do
        set -- $b; bb=$1; shift
        timeout -k 20 $(share $T2 2) python -m specgen.cli bench specs/nsa_paper.yaml --decode --batches $bb \
          --seqlens "$@" --decode-forms cw persist persist+cs32 --out "$W/persist/results" 2>&1 \
          | grep -v "UserWarning\|return sdpa\|_warn_once\|^nsa_paper {" | tee -a "$W/persist/persist_bench.log" | tail -12
      done ); pack; }
  ;;
19)
  # One call of the most needed untimed pieces for a session short of device time (2026-12-07 late: three start
  # failures): the persist form's GPU tests and its batch-1 bench against cw (issue 19's 17 us), the fp8
  # launch's tests, dsa_v32's batch-1 step with the split cap / epilogue loads, V3.2's training step with the shared
  # p, and Llama-3's decode at the largest batch that fits (issue 19's model-shape target, never timed).
  mkdir -p $W/one
  piece ${T1:=90} && { ( env_in $W/one; timeout -k 20 $T1 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      tests/test_decode.py tests/test_runtime.py -k "persist or fp8" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" \
      | tee $W/one/${day}_gpu_tests_persist_fp8_${COMMIT}.log ); pack; }
  piece ${T2:=120} && { ( env_in $W/one; timeout -k 20 $T2 python -m specgen.cli bench specs/nsa_paper.yaml --decode \
      --batches 1 --seqlens 131072 65536 --decode-forms cw persist persist+cs32 cw+cs32 --out "$W/one/results" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once\|^nsa_paper {" | tee -a "$W/one/persist_bench.log" | tail -14 ); pack; }
  piece ${T3:=100} && { ( env_in $W/one; timeout -k 20 $T3 python -m specgen.cli bench specs/dsa_v32.yaml --decode \
      --batches 1 --seqlens 65536 --decode-forms plan ms8 ms16 cs32 ms16+cs32 ks_pf_k32+wide_w8+fold_list_s64 \
      --out "$W/one/results" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once\|^dsa_v32 {" \
      | tee -a "$W/one/dsa_decode_ms.log" | tail -14 ); pack; }
  # The attention backward's p shared with the distillation (untimed; docs/distill.md): V3.2's step at 16k, both ways,
  # with the shared path checked against the recomputing one at that size (the row's *_rel_diff).
  piece ${T5:=110} && { ( env_in $W/one; timeout -k 20 $T5 python -m specgen.cli bench specs/dsa_v32.yaml \
      --training-step --seqlens 16384 --out "$W/one/results" 2>&1 | grep -v "UserWarning\|^\s*void" \
      | tee -a $W/one/training_step_shared_p.log | tail -24 ); pack; }
  for s in model_llama3_8b; do
    piece ${T4:=95} && { ( env_in $W/one; timeout -k 20 $T4 python -m specgen.cli bench specs/models/$s.yaml --decode \
        --batches max 1 --seqlens 65536 --out "$W/one/results" 2>&1 \
        | grep -v "UserWarning\|return sdpa\|_warn_once\|^$s {" | tee -a $W/one/models_decode.log | tail -8 ); pack; }
  done
  ;;
20)
  # Issue 16's nsa_paper target (forward >= 4x, forward + backward >= 3.5x cuDNN at 64k; last timed 2026-11-24, before
  # the block-outer selection, the work list and the backward forms) and the matrix's 32k / 16k rows (06133e7).
  mkdir -p $W/matrix
  piece ${T1:=200} && { ( env_in $W/matrix; timeout -k 20 $T1 python -m specgen.cli bench specs/nsa_paper.yaml \
      --seqlens 65536 --out "$W/matrix" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once" \
      | tee -a $W/matrix/bench_nsa_paper_${COMMIT}.log | tail -30 ); pack; }
  piece ${T2:=340} && { ( env_in $W/matrix; timeout -k 20 $T2 python -m specgen.cli bench \
      specs/models/model_llama3_8b.yaml specs/models/model_qwen25_7b.yaml specs/models/model_gemma2_9b.yaml \
      --seqlens 16384 32768 --out "$W/matrix" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once" \
      | tee -a $W/matrix/bench_16k_32k_${COMMIT}.log | tail -30 ); pack; }
  ;;
21)
  # The first call of 2026-12-07 (night 2), ordered by what could move a default: a query's head chunks side by side
  # (chunk_inner: V3.2's forward ks_pf_ci and scatter backward km_ks_k64_ci against the defaults at 16k and 64k;
  # docs/tuning.md "Head chunks side by side"), then the dense distillation from the unabsorbed heads.
  mkdir -p $W/ci
  piece ${T1:=80} && { ( env_in $W/ci; timeout -k 10 $T1 python bench/variants_bench.py --only dsa_fwd --calls 2 \
      --variants ks_pf ks_pf_ci --json "$W/ci/${day}_dsa_fwd_chunk_inner_${COMMIT}.jsonl" 2>&1 \
      | tee $W/ci/dsa_fwd_chunk_inner.log | tail -8 ); pack; }
  piece ${T2:=110} && { ( env_in $W/ci; timeout -k 10 $T2 python bench/dsa_bwd.py specs/dsa_v32.yaml \
      --seqlens 16384 65536 --forms km_ks_k64 km_ks_k64_ci km_ks_k64_cr --top 3 --reps 3 --form-reps 3 1 --no-det \
      --json "$W/ci/${day}_dsa_bwd_chunk_inner_${COMMIT}.jsonl" 2>&1 | tee $W/ci/dsa_bwd_chunk_inner.log | tail -14 ); pack; }
  # The dense distillation stage from the unabsorbed heads (docs/distill.md; issue 17's warm-up target: the loss's
  # forward at 32k <= 2x cuDNN's forward): compile report, float64 check at T 512, its GPU tests, fwd / fwd+bwd at 32k.
  piece ${T3:=280} && { OUT=$W/mha CHECK_TIMEOUT=$((T3 / 5)) TEST_TIMEOUT=$((T3 / 5)) BENCH_TIMEOUT=$((T3 / 2)) \
      DENSE_T=32768 timeout -k 10 $T3 bash bench/distill_unabsorbed_gpu.sh 2>&1 | tail -30; pack; }
  ;;
22)
  # The second call: nsa_paper's forward / backward at 64k (issue 16, last timed 2026-11-24), then the GPU tests of
  # the chunk_inner forms and the shared p, then V3.2's training step at 64k (the shared p and whatever won in 21).
  mkdir -p $W/matrix $W/one
  piece ${T0:=170} && { OUT=$W/nsafwd LLAMA_TIMEOUT=$((T0 * 7 / 18)) QWEN_TIMEOUT=$((T0 * 4 / 18)) \
      GEMMA_TIMEOUT=$((T0 * 7 / 18)) TEST_TIMEOUT=0 bash bench/nsa_forward_variants_gpu.sh | tail -40; pack; }
  piece ${T1:=200} && { ( env_in $W/matrix; timeout -k 20 $T1 python -m specgen.cli bench specs/nsa_paper.yaml \
      --seqlens 65536 --out "$W/matrix" 2>&1 | grep -v "UserWarning\|return sdpa\|_warn_once" \
      | tee -a $W/matrix/bench_nsa_paper_${COMMIT}.log | tail -30 ); pack; }
  piece ${T2:=120} && { ( env_in $W/one; timeout -k 20 $T2 python -m pytest -v -rfE --tb=short -p no:cacheprovider \
      tests/test_kernel_variants.py tests/test_scatter_forms.py tests/test_distill_shared_p.py \
      -k "side_by_side or shared or p_" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" \
      | tee $W/one/${day}_gpu_tests_chunk_inner_shared_p_${COMMIT}.log ); pack; }
  piece ${T3:=200} && { ( env_in $W/one; timeout -k 20 $T3 python -m specgen.cli bench specs/dsa_v32.yaml \
      --training-step --seqlens ${STEP_T:-16384}  --out "$W/one/results" 2>&1 | grep -v "UserWarning\|^\s*void" \
      | tee -a $W/one/training_step_64k.log | tail -24 ); pack; }
  ;;
23)
  # Next session's first call: the GPU-only tests that failed at dc0b177 with their tracebacks (the persist and whole
  # decode forms, the DSA pdl chain), then the scatter forms at 64k (their 2026-12-07 run ran out of memory).
  mkdir -p $W/fix $W/ci
  piece ${T1:=200} && { ( env_in $W/fix; SPECGEN_INSTAFAIL=1 timeout -k 20 $T1 python -m pytest -v -rfE --tb=short \
      -p no:cacheprovider "tests/test_decode.py::test_persist_form_realistic_and_in_a_cuda_graph" \
      "tests/test_decode.py::test_launch_form_realistic_against_the_reference" \
      "tests/test_decode_forms.py::test_launch_chain_pdl_on_the_dsa_step" 2>&1 \
      | tee $W/fix/${day}_gpu_tests_decode_failures_${COMMIT}.log | grep -E "PASSED|FAILED|Error|error|assert" | head -40 ); pack; }
  piece ${T2:=200} && { ( env_in $W/ci; timeout -k 10 $T2 python bench/dsa_bwd.py specs/dsa_v32.yaml \
      --seqlens 65536 --forms km_ks_k64 km_ks_k64_ci km_ks_k64_cr --reps 2 --no-det \
      --json "$W/ci/${day}_dsa_bwd_chunk_inner_64k_${COMMIT}.jsonl" 2>&1 | tee $W/ci/dsa_bwd_chunk_inner_64k.log | tail -10 ); pack; }
  # The unabsorbed warm-up loss's forward on other tiles (16 warps; 128 keys a trip at 16 warps): checked at T 512,
  # then timed at 32k beside the plan's (issue 17's warm-up target: <= 2x cuDNN's forward).
  piece ${T3:=150} && { ( env_in $W/mha; V="fused_unabsorbed fused_unabsorbed_w16 fused_unabsorbed_k128_w16"
      timeout -k 10 $((T3 / 3)) python bench/distill_bench.py specs/dsa_v32.yaml --variants $V --check-dense 512 \
        --sparse --dense --no-cudnn --json "$W/mha/${day}_distill_unabsorbed_tiles_${COMMIT}.jsonl" 2>&1 | tail -6
      timeout -k 10 $((T3 * 2 / 3)) python bench/distill_bench.py specs/dsa_v32.yaml --variants $V --sparse \
        --dense 32768 --reps 3 --json "$W/mha/${day}_distill_unabsorbed_tiles_${COMMIT}.jsonl" 2>&1 | tail -6 ); pack; }
  ;;
24)
  # The first call of the next session (see the header): the rest phase's failures of 2026-12-08, then decode timings.
  piece ${T1:=300} && { SUITE=rest T1=$T1 WORKERS=${WORKERS:-12} CALL=9 bash "$0" 2>&1 | tail -14; }
  mkdir -p $W/one
  piece ${T2:=150} && { ( env_in $W/one; timeout -k 20 $T2 python -m specgen.cli bench specs/nsa_paper.yaml --decode \
      --batches 1 --seqlens 131072 --decode-forms cw persist persist+cs32 --out "$W/one/results" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once\|^nsa_paper {" | tee -a "$W/one/persist_bench.log" | tail -10 ); pack; }
  piece ${T3:=80} && { ( env_in $W/one; timeout -k 20 $T3 python -m specgen.cli bench specs/dsa_v32.yaml --decode \
      --batches 64 1 --seqlens 65536 --decode-forms plan ks_pf_k32+wide_w8+fold_list_s64 --out "$W/one/results" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once\|^dsa_v32 {" | tee -a "$W/one/dsa_topk_b64.log" | tail -10 ); pack; }
  piece ${T4:=60} && { ( env_in $W/one; timeout -k 20 $T4 python -m specgen.cli bench specs/models/model_mha16_d64.yaml \
      --decode --batches max --seqlens 65536 --decode-forms auto whole+cmp_s4_r1 whole+cmp_k32_r3 --out "$W/one/results" 2>&1 \
      | grep -v "UserWarning\|return sdpa\|_warn_once\|^model_mha16_d64 {" | tee -a "$W/one/mha16_decode.log" | tail -10 ); pack; }
  ;;
*) echo "CALL must be 1 to 24" >&2; exit 2 ;;
esac
