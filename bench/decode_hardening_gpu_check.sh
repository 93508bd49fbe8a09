#!/usr/bin/env bash
# Decode hardening (issue 14) on a CUDA machine, one call: the decode tests of every generated module (CPU-sized
# cases with prompts that complete blocks while decoding, 64k-context bf16 cases under the gpu marker, the CUDA
# graph replay), tests/test_decode.py, and tests/test_decode_errors.py (call and constructor mistakes; values
# known only on the device clamped and flagged, also inside a CUDA graph).
#   bash bench/decode_hardening_gpu_check.sh            # everything (FILES= narrows it, K= changes the -k filter)
# If one call must stay under 10 minutes, split it, e.g. FILES=tests/test_decode_errors.py, then
# FILES="tests/test_decode.py generated/test_nsa_*.py", then FILES=generated/test_dsa_*.py (TEST_TIMEOUT, default 570 s).
# Install on the GPU machine (no network): pip install --no-deps -e .   (or rely on PYTHONPATH=$PWD, set below).
# Set SPECGEN_COMMIT (the device copy may have no .git). The log goes to $OUT/decode_hardening_<commit>.log.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
LOG="$OUT/decode_hardening_${COMMIT}.log"
{
  echo "# decode hardening GPU check, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python - <<'PY'
import torch, triton, sys
print(f"# python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
PY
} | tee "$LOG"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device: this script checks the GPU paths (the CPU ones run in the normal suite)" | tee -a "$LOG"; exit 2; }
timeout ${TEST_TIMEOUT:-570} python -m pytest -v -rfEs --tb=short -p no:cacheprovider -k "${K:-decode}" \
    ${FILES:-tests/test_decode_errors.py tests/test_decode.py generated/} 2>&1 | tee -a "$LOG" \
    | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -60
rc=${PIPESTATUS[0]}
echo "# exit status $rc" | tee -a "$LOG"
exit $rc
