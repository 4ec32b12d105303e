#!/usr/bin/env bash
# PPLL under `accelerate launch`: processes, mixed precision and CPU/GPU come from the Accelerate
# config file (ACCELERATE_CONFIG, default configs/accelerate/cpu_2proc.yaml); PPLL settings from ours.
#   ACCELERATE_CONFIG=configs/accelerate/multi_gpu_4.yaml launch/accelerate.sh --config configs/vit_cifar10_k4.yaml
# Extra arguments go to `ppll train` unchanged.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
config="${ACCELERATE_CONFIG:-$here/configs/accelerate/cpu_2proc.yaml}"
if [ ! -f "$config" ]; then
  echo "launch/accelerate.sh: error: Accelerate config '$config' does not exist; set ACCELERATE_CONFIG to a file in configs/accelerate/" >&2
  exit 2
fi
exec accelerate launch --config_file "$config" -m ppll_ext.train "$@"
