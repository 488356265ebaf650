#!/usr/bin/env bash
# Start SGLang with Lynx on one GPU (or any stock SGLang deployment: extra flags pass through).
#
#   MODEL=Qwen/Qwen3-30B-A3B launch/server.sh                       # lynx policy, defaults
#   MODEL=/models/qwen3 launch/server.sh --lynx-policy oea --port 30001
#   MODEL=/models/qwen3 launch/server.sh --moe-backend default      # stock SGLang, same flags otherwise
#
# Later flags win in argparse, so passed-through arguments override the defaults below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
exec "$PY" -m sglang.launch_server \
    --model-path "${MODEL:?set MODEL to a model path or hub id}" \
    --moe-backend lynx \
    --enable-metrics \
    "$@"
