#!/usr/bin/env bash
# One device-tool call (at most ~8.5 minutes: tests capped at 90 s, the bench at 420 s) for the scatter backward's
# forms with fewer atomic adds per selected (query, key) (issue 17; docs/backward.md, "Fewer atomics";
# tuning.scatter_variants):
#  1. their tests on CUDA: tests/test_scatter_forms.py (r64_rl_w16 and split_k64 against the float64 reference and
#     against km_ks_k64 within fp32 rounding, the split form's dQ equal to km_ks_k64's bit for bit, batched and
#     packed, with a spy on the launches) and the split form without MLA on two kv heads
#     (tests/test_scatter_backward.py::test_gqa_two_kv_heads);
#  2. bench/dsa_bwd.py at DeepSeek-V3.2: the backward with w8 (the gradients' reference), km_ks_k64 (the default),
#     r64_rl_w16, split_k64 and split_k128 at T = 16384 (median of 3, per-kernel GPU times of one call: a split
#     form's two kernels) and at 65536 (median of 1 after a warm-up); the atomic adds alone at 1/2/4/8 head chunks
#     (16k) and 1/4 (64k), and the same adds by tl.atomic_add against red.global.add of 1, 2 and 4 floats (16k).
# Files under $OUT (3): dsa_bwd_atomics.log, <day>_dsa_bwd_atomics_forms.jsonl, nvidia-smi.txt.
# Usage on the GPU machine: bash bench/dsa_bwd_atomics_gpu.sh   (TEST_TIMEOUT / BENCH_TIMEOUT cap the two pieces;
# FORMS="km_ks_k64 split_k64" a subset; SEQLENS="16384" other lengths)
set -uo pipefail
GPU_ENV_AUTOTUNE=off
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/dsa_bwd_atomics.log"
gpu_smi | tee "$OUT/nvidia-smi.txt"
echo "commit $COMMIT" | tee "$log"
timeout ${TEST_TIMEOUT:-90} python -m pytest -q -rfE --tb=short -p no:cacheprovider \
    tests/test_scatter_forms.py::test_forms_are_candidates_and_default \
    tests/test_scatter_forms.py::test_fewer_atomics_forms tests/test_scatter_forms.py::test_fewer_atomics_forms_packed \
    tests/test_scatter_backward.py::test_gqa_two_kv_heads 2>&1 | tail -15 | tee -a "$log"
timeout ${BENCH_TIMEOUT:-420} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens ${SEQLENS:-16384 65536} \
    --forms ${FORMS:-km_ks_k64 r64_rl_w16 split_k64 split_k128} --top 4 --reps 3 --form-reps 3 1 --no-det \
    --atomics-floor --vector-atomics --json "$OUT/${day}_dsa_bwd_atomics_forms.jsonl" 2>&1 \
    | grep -v "^\s*\(backward: \)\?void" | tee -a "$log"
gpu_smi | tee -a "$OUT/nvidia-smi.txt"
