#!/usr/bin/env bash
# Expert parallelism across nodes: run this once per node with the same MASTER and its own NODE_RANK.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:5000 GPUS_PER_NODE=8 MODEL=/models/qwen3 launch/ep_multinode.sh
#   node 1:  NNODES=2 NODE_RANK=1 MASTER=10.0.0.1:5000 GPUS_PER_NODE=8 MODEL=/models/qwen3 launch/ep_multinode.sh
#
#   NNODES, NODE_RANK, MASTER (host:port of node 0, reachable from all nodes): required
#   GPUS_PER_NODE (default 8); A2A and POLICY as in launch/ep_server.sh
#   CPU=1: development on CPU-only machines (launch/ep_cpu.sh, gloo), GPUS_PER_NODE processes per
#          node; two "nodes" on one machine need different --port values (every node binds one)
# The server answers HTTP on node 0; TP = EP = NNODES * GPUS_PER_NODE. Every node needs the same
# model path and the same lynx-sglang install (the plugin must load in every process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER:?set MASTER=host:port of node 0}"
GPUS=$(( NNODES * ${GPUS_PER_NODE:-8} ))
if [ "${CPU:-0}" = 1 ]; then
    EP=$GPUS exec "$ROOT/launch/ep_cpu.sh" \
        --nnodes "$NNODES" --node-rank "$NODE_RANK" --dist-init-addr "$MASTER" \
        "$@"
fi
export GPUS
exec "$ROOT/launch/ep_server.sh" \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --dist-init-addr "$MASTER" \
    --host 0.0.0.0 \
    "$@"
