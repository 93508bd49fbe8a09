# The environment every bench/*_gpu*.sh script runs in on the GPU machine, sourced (not run) from the repository
# root, after the script's own `set -uo pipefail`:
#   source "$(dirname "$0")/gpu_env.sh"
# It sets, in the calling shell:
#   OUT              ${OUT:-/tmp/out}, created (not exported: as each script had it); scripts write under it only
#   SPECGEN_AUTOTUNE exported: ${SPECGEN_AUTOTUNE:-0} (specs without a tuning record would autotune on their first
#                    calls; tests and timings use the plan's defaults unless the caller asks, docs/tuning.md), or
#                    see GPU_ENV_AUTOTUNE below
#   TRITON_CACHE_DIR $PWD/.triton-cache, exported (one Triton cache per tree, kept between calls on a warm machine)
#   PYTHONUNBUFFERED 1, exported (a call cut off by its time limit still brings back what was printed)
#   SPECGEN_CACHE    $PWD/.specgen-cache, exported (see GPU_ENV_TREE)
#   PYTHONPATH       $PWD, exported: the package from this tree (`python bench/<script>.py` puts bench/, not the
#                    tree, on sys.path, and the device machine's editable install may point elsewhere; see GPU_ENV_TREE)
#   day              $(date +%F), for the names of JSON records (<day>_<what>.jsonl)
#   COMMIT           ${SPECGEN_COMMIT:-$(git rev-parse --short HEAD)}, or "unknown" without either (the device copy
#                    may have no .git: set SPECGEN_COMMIT)
# and defines
#   gpu_smi [FIELDS [noheader]]   nvidia-smi --query-gpu=FIELDS --format=csv[,noheader]; FIELDS defaults to
#                                 $GPU_CLOCKS (name, SM clock and its maximum, temperature, power draw)
# Knobs, plain shell variables set before sourcing:
#   GPU_ENV_AUTOTUNE=off   SPECGEN_AUTOTUNE=0 whatever the caller set (scripts whose results assume the defaults)
#   GPU_ENV_AUTOTUNE=keep  SPECGEN_AUTOTUNE left as the caller set it (bench/tune_gpu.sh)
#   GPU_ENV_TREE=no        neither SPECGEN_CACHE nor PYTHONPATH (scripts that run several trees set them per tree)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case ${GPU_ENV_AUTOTUNE:-default} in
  default) export SPECGEN_AUTOTUNE=${SPECGEN_AUTOTUNE:-0} ;;
  off) export SPECGEN_AUTOTUNE=0 ;;
  keep) ;;
  *) echo "gpu_env.sh: GPU_ENV_AUTOTUNE must be default, off or keep (got $GPU_ENV_AUTOTUNE)" >&2; exit 2 ;;
esac
export TRITON_CACHE_DIR=$PWD/.triton-cache PYTHONUNBUFFERED=1
if [ "${GPU_ENV_TREE:-yes}" != no ]; then
  export SPECGEN_CACHE=$PWD/.specgen-cache PYTHONPATH=$PWD
fi
day=$(date +%F)
COMMIT=${SPECGEN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU_CLOCKS=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
gpu_smi() { nvidia-smi --query-gpu="${1:-$GPU_CLOCKS}" --format=csv${2:+,$2}; }
