#!/usr/bin/env bash
# PPLL under torchrun on this machine: one process per stage (NPROC = local.stages, default 2).
#   NPROC=4 launch/torchrun.sh --config configs/resnet32_cifar10_k4.yaml --set data.root=DIR
# Extra arguments go to `ppll train` unchanged.
set -euo pipefail
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" -m ppll_ext.train "$@"
