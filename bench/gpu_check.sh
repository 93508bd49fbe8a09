#!/usr/bin/env bash
# One device-tool call: install, run every generated test on CUDA (small + realistic bf16 sizes), then bench.
# Usage on the GPU machine: bash bench/gpu_check.sh [pytest-args...]; logs land in $OUT.
set -uo pipefail
GPU_ENV_TREE=no   # the package installed from this tree; PYTHONPATH only where the install fails
source "$(dirname "$0")/gpu_env.sh"
export SPECGEN_CACHE=$PWD/.specgen-cache
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
gpu_smi
