#!/usr/bin/env bash
# Issue 21 on a CUDA host, one call: the sweep's GPU worker path and data-parallel training with generated layers,
# on every visible GPU (N = their count; on one GPU this is the single-GPU run of each script).
#   1. specgen sweep bench/gpu_smoke.sweep.yaml --device cuda: one worker per GPU, the GPU in each speed record;
#      wall time with all N GPUs and with one (CUDA_VISIBLE_DEVICES=first).
#   2. bench/train_distributed.py: DDP and FSDP2 on N ranks against one process with the same global batch
#      (fp32 and bf16 autocast), 50 steps, NSA layer (DSA with FAMILY=dsa); --compare checks the loss curves.
# Records and logs go to $OUT (set SPECGEN_COMMIT: the device copy's .git may be stale).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
N=$(python -c "import torch; print(torch.cuda.device_count())")
FAMILY=${FAMILY:-nsa}
LOG="$OUT/distributed_${SPECGEN_COMMIT:-unknown}_${N}gpu.log"
{
echo "# distributed check, commit ${SPECGEN_COMMIT:-unknown}, $(date -u +%FT%TZ), $N GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | tr -s ' ')"
t0=$(date +%s.%N)
specgen_sweep() { python -m specgen.cli sweep bench/gpu_smoke.sweep.yaml --device cuda --out "$1" 2>&1 | tail -3; }
specgen_sweep "$OUT/sweep_all"
t1=$(date +%s.%N)
first=$(echo "${CUDA_VISIBLE_DEVICES:-0}" | cut -d, -f1)
CUDA_VISIBLE_DEVICES=$first python -m specgen.cli sweep bench/gpu_smoke.sweep.yaml --device cuda --out "$OUT/sweep_one" 2>&1 | tail -3
t2=$(date +%s.%N)
python - "$t0" "$t1" "$t2" "$OUT" <<'PY'
import json, sys, pathlib
t0, t1, t2, out = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), pathlib.Path(sys.argv[4])
print(f"sweep wall time: all GPUs {t1 - t0:.1f} s, one GPU {t2 - t1:.1f} s (compilation included; the first run warms the caches)")
for name in ("sweep_all", "sweep_one"):
    for line in (out / name / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("part") == "speed":
            print(f"  {name}: {r.get('label', r.get('key', '?'))[:40]:40s} status {r.get('status')} gpu {r.get('gpu')} device {r.get('device')} host {r.get('host')}")
PY
for dtype in fp32 bf16; do
  python bench/train_distributed.py --family $FAMILY --single --dtype $dtype --out "$OUT/train_single_$dtype.json" 2>&1 | tail -1
  for mode in ddp fsdp; do
    torchrun --standalone --nproc-per-node "$N" bench/train_distributed.py --family $FAMILY --mode $mode --dtype $dtype \
        --out "$OUT/train_${mode}_$dtype.json" 2>&1 | tail -1
    python bench/train_distributed.py --compare "$OUT/train_single_$dtype.json" "$OUT/train_${mode}_$dtype.json" 2>&1 | tail -2
  done
done
} 2>&1 | tee "$LOG"
