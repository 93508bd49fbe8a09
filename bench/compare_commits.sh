#!/usr/bin/env bash
# Two commits benchmarked in one run on one GPU (same Triton cache, same process environment): OLD is a checkout of
# the older commit (e.g. `git archive OLD | tar -x -C .old`, carried to the device machine), the new one is the
# working tree. Runs the host-sensitive benchmarks: the decode step at batch 1 (CUDA graph) and the forward and
# backward passes of SPECS at SEQLENS, old then new then old again (the spread between the two old runs is the noise).
#   OLD=.old SPECS="specs/nsa_paper.yaml" SEQLENS="16384" bash bench/compare_commits.sh
set -uo pipefail
GPU_ENV_TREE=no   # each tree's own SPECGEN_CACHE and PYTHONPATH, in run()
source "$(dirname "$0")/gpu_env.sh"
OLD=${OLD:-.old}
run() {  # run TREE LABEL
  local tree=$1 label=$2
  echo "## $label ($tree)"
  (cd "$tree" && export PYTHONPATH=$PWD SPECGEN_CACHE=$PWD/.specgen-cache &&
   python -m specgen.cli bench ${SPECS:-specs/nsa_paper.yaml} --decode --seqlens ${DECODE_SEQLENS:-131072} \
       --batches 1 --no-dense --out "/tmp/records_$label" > "$OUT/${label}_decode.log" 2>&1
   python -m specgen.cli bench ${SPECS:-specs/nsa_paper.yaml} --seqlens ${SEQLENS:-16384} --no-dense \
       --out "/tmp/records_$label" > "$OUT/${label}_passes.log" 2>&1
   tail -n 12 "$OUT/${label}_decode.log" "$OUT/${label}_passes.log")
}
run "$OLD" old1
run . new
run "$OLD" old2
