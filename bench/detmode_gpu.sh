#!/usr/bin/env bash
# One device-tool call (about 2 minutes on an H100, cold Triton cache) for issue 17's deterministic-mode backward
# (docs/backward.md, "Determinism"): dsa_v32 at T = 16384, the backward's default (scatter, fp32 atomics) against
# torch.use_deterministic_algorithms(True) (dq kernel + inverse-index dK/dV), medians of 3 after a warm-up; one
# forward + backward again in deterministic mode compared bit for bit; the 15 kernels with the most GPU time in one
# deterministic backward (torch.profiler); and the inverse index's build alone in deterministic mode, as built now
# and with the former scatter_ compaction (the cause of 7324 ms at commit 6fe631f). All of it is bench/dsa_bwd.py.
# Two files under $OUT: detmode.log and <date>_detmode.jsonl.
# Usage on the GPU machine: SPECGEN_COMMIT=<sha> bash bench/detmode_gpu.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
gpu_smi name,memory.total noheader | tee "$OUT/detmode.log"
timeout ${BENCH_TIMEOUT:-140} python bench/dsa_bwd.py specs/dsa_v32.yaml --seqlens 16384 --reps 3 --det-reps 3 \
    --profile 15 --bitwise --former-index --json "$OUT/${day}_detmode.jsonl" 2>&1 | tee -a "$OUT/detmode.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/detmode.log"
