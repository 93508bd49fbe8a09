#!/usr/bin/env bash
# Two source trees benchmarked in one run on one GPU, old, new, old again (the spread of the two old runs is the
# noise): the training passes of nsa_paper and nsa_config_a at 16k and 64k, dsa_v32's passes at 16k and forward at
# 64k (its sparse forward+backward does not fit 80 GB at 64k), nsa_paper's batch-1 decode step at 128k, and
# first_use.py on the new tree. OLD and NEW are checkouts (`git archive C | tar -x -C .old`) carried to the device.
#   OLD=.old NEW=.new bash bench/compare_trees.sh
set -uo pipefail
GPU_ENV_AUTOTUNE=off GPU_ENV_TREE=no   # each tree's own SPECGEN_CACHE and PYTHONPATH, in run()
source "$(dirname "$0")/gpu_env.sh"
OLD=${OLD:-.old}; NEW=${NEW:-.}
run() {  # run TREE LABEL
  local tree=$1 label=$2
  (cd "$tree" && export PYTHONPATH=$PWD SPECGEN_CACHE=$PWD/.specgen-cache &&
   python -m specgen.cli bench specs/nsa_paper.yaml specs/nsa_config_a.yaml --seqlens 16384 65536 --no-dense \
       --out "/tmp/records_$label" > "$OUT/${label}_passes.log" 2>&1
   python -m specgen.cli bench specs/dsa_v32.yaml --seqlens 16384 --no-dense --out "/tmp/records_$label" \
       >> "$OUT/${label}_passes.log" 2>&1
   python -m specgen.cli bench specs/dsa_v32.yaml --seqlens 65536 --forward-only --no-dense \
       --out "/tmp/records_$label" >> "$OUT/${label}_passes.log" 2>&1
   python -m specgen.cli bench specs/nsa_paper.yaml --decode --seqlens 131072 --batches 1 --no-dense \
       --out "/tmp/records_$label" > "$OUT/${label}_decode.log" 2>&1
   grep -E "^ +[0-9]+ +(forward|backward|fwd_bwd)|graph|eager" "$OUT/${label}_passes.log" "$OUT/${label}_decode.log" | head -40)
}
run "$OLD" old1
run "$NEW" new
(cd "$NEW" && PYTHONPATH=$PWD SPECGEN_CACHE=$PWD/.specgen-cache-fu python bench/first_use.py specs/nsa_paper.yaml \
    --json "$OUT/new_first_use.jsonl" > "$OUT/new_first_use.log" 2>&1; tail -5 "$OUT/new_first_use.log")
run "$OLD" old2
