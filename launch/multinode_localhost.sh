#!/usr/bin/env bash
# One PPLL pipeline across two "nodes" on this machine: two torchrun invocations (--nnodes 2,
# --node_rank 0 and 1) meeting at a c10d rendezvous on 127.0.0.1. Stages = 2 x NPROC_PER_NODE;
# node 0 runs the first stages. On real nodes run the same two commands on each host with
# RDZV_HOST set to node 0's address.
#   NPROC_PER_NODE=1 launch/multinode_localhost.sh --set train.epochs=2
set -euo pipefail
nproc="${NPROC_PER_NODE:-1}"
host="${RDZV_HOST:-127.0.0.1}"
port="${RDZV_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
stages=$((2 * nproc))
run_node() {
  torchrun --nnodes 2 --node_rank "$1" --nproc_per_node "$nproc" --rdzv-backend c10d \
    --rdzv-endpoint "$host:$port" --rdzv-id "ppll-$port" -m ppll_ext.train --set "local.stages=$stages" "${@:2}"
}
run_node 1 "$@" > >(sed 's/^/[node 1] /') 2> >(sed 's/^/[node 1] /' >&2) &
node1=$!
trap 'kill $node1 2>/dev/null || true' EXIT
status=0
run_node 0 "$@" || status=$?
wait "$node1" || status=$((status ? status : $?))
exit "$status"
