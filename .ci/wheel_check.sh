#!/usr/bin/env bash
# The package as a user installs it: a built wheel (not the checkout) in a fresh virtual environment, with the triton
# that torch 2.13's CUDA build pins (3.7.1; the main run uses 3.6.0, the triton of the GPU records). From a folder
# outside the checkout it builds one example spec and runs that module's small forward tests under the interpreter,
# so a template, a package-data entry or an install step missing from the wheel fails here.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q -c "$repo/constraints-cpu.txt" torch==2.13.0 triton==3.7.1
wheel=("$work"/dist/specgen-*.whl)
"$py" -m pip install -q -c "$repo/constraints-cpu.txt" "${wheel[0]}[test]"

cd "$work"
"$py" -c "import specgen, torch, triton; print('wheel check: specgen', specgen.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'from', specgen.__file__)"
"$work/venv/bin/specgen" build "$repo/specs/nsa_small.yaml" --out "$work/out"
SPECGEN_CACHE="$work/cache" "$py" -m pytest -q -p no:cacheprovider "$work/out/test_nsa_small.py" -k "forward_small or bad_arguments" -W error::pytest.PytestUnknownMarkWarning
