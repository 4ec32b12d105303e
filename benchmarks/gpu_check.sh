#!/usr/bin/env bash
# The GPU check, as one script: equivalence tests on CUDA, a short PPLL vs 1F1B vs GPipe bench on the GPU(s),
# results in benchmarks/results/gpu.md (the checks are tools/gpu_check.py). Without a CUDA device it prints one
# "no CUDA device" line and exits 1.
#     bash benchmarks/gpu_check.sh            (from anywhere; uses the active Python environment)
set -euo pipefail
cd "$(dirname "$0")/.."
export CUBLAS_WORKSPACE_CONFIG=:4096:8
if ! python -c "import torch" 2>/dev/null; then
    echo "gpu_check: no torch in this Python ($(command -v python || echo 'python not found')); activate the project's environment first (see README.md: Quick start)" >&2
    exit 1
fi
exec python tools/gpu_check.py "$@"
