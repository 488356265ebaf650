#!/usr/bin/env bash
# Expert-parallel SGLang server on one node's GPUs with the lynx-sglang plugin; extra flags pass through.
#
#   GPUS=4 MODEL=Qwen/Qwen3-30B-A3B launch/ep_server.sh                 # our all-to-all + rank-aware lynx_ep
#   GPUS=8 A2A=none MODEL=... launch/ep_server.sh                       # experts sharded, outputs all-reduced
#   GPUS=8 A2A=deepep MODEL=... launch/ep_server.sh --attn-dp-size 8   # DeepEP: global selection
#   GPUS=2 POLICY=off launch/ep_server.sh --port 30001                  # same data path, router's choice
#
#   GPUS    expert-parallel size = tensor-parallel size (2, 4 or 8; default 2)
#   A2A     --moe-a2a-backend: lynx (default; lynx-sglang's all-to-all), none, or a DeepEP-family backend
#   PYTHON  the interpreter (default .venv/bin/python)
#   POLICY  --lynx-policy (default: lynx_ep with lynx/none; lynx with DeepEP, where each rank only
#           sees its own tokens and the kept set is reduced over the EP group)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
GPUS="${GPUS:-2}"
A2A="${A2A:-lynx}"
case "$A2A" in
    lynx|none) DEFAULT_POLICY=lynx_ep ;;
    *) DEFAULT_POLICY=lynx ;;
esac
exec "$PY" -m sglang.launch_server \
    --model-path "${MODEL:-$ROOT/models/trained-qwen3-moe}" \
    --tp-size "$GPUS" --ep-size "$GPUS" \
    --moe-a2a-backend "$A2A" \
    --moe-backend lynx --lynx-policy "${POLICY:-$DEFAULT_POLICY}" \
    "$@"
