#!/usr/bin/env bash
# Start SGLang on one GPU with the lynx-sglang plugin loaded; extra flags pass through.
#
#   MODEL=Qwen/Qwen3-30B-A3B launch/server.sh --moe-backend lynx --enable-metrics
#   MODEL=/models/qwen3 launch/server.sh --moe-backend lynx --lynx-policy oea --port 30001
#   MODEL=/models/qwen3 launch/server.sh                      # stock SGLang behaviour
#
# Default model: the bundled one; PYTHON: the interpreter (default .venv/bin/python). Later flags win in argparse, so passed-through
# arguments override the defaults below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
exec "$PY" -m sglang.launch_server \
    --model-path "${MODEL:-$ROOT/models/trained-qwen3-moe}" \
    "$@"
