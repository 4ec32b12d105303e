#!/usr/bin/env bash
# Start a DeepSpeed training script on this machine with one process per pipeline stage x data-parallel replica:
#
#   launch/deepspeed.sh NPROC script.py [script args...]
#   launch/deepspeed.sh 2 tests/dist/deepspeed_train.py --stages 2 --config configs/deepspeed/ppll.json --out OUT_DIR
#
# On a machine without GPUs `deepspeed --num_gpus N` is what starts N processes (plain `deepspeed script.py`
# starts one per NUMA node); DS_ACCELERATOR=cpu selects gloo. The launcher appends --local_rank=N to the script's
# arguments and does not limit threads, so each rank gets OMP_NUM_THREADS=1 unless it is set already.
# MASTER_PORT (default 29500) picks the rendezvous port; only the loopback address is used.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC script.py [args...]" >&2
    exit 2
fi
nproc=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

exec deepspeed --num_gpus "$nproc" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" "$@"
