#!/usr/bin/env bash
# Start the stock SGLang server on a CPU-only machine (lynx_sglang.runtime.cpu.support, loaded through
# the plugin entry point, supplies what SGLang lacks there).
#
#   launch/cpu_server.sh                      # tiny Qwen3-MoE on 127.0.0.1:30000
#   launch/cpu_server.sh --tp-size 2 --port 30201  # extra arguments pass through to sglang.launch_server
#   MODEL=/path/to/model launch/cpu_server.sh
#   PYTHON=/path/to/python launch/cpu_server.sh   # another environment with sglang and lynx-sglang (default .venv)
#
# Passed-through arguments come last, so they override the defaults below (except on/off flags).
#   --device cpu                     no GPU
#   --attention-backend torch_native SGLang's x86 CPU default (intel_amx) needs AMX and sgl-kernel's CPU build
#   --disable-overlap-schedule       the documented CPU recipe; keeps scheduling synchronous (simpler
#                                    to debug; a quick try with overlap on also served)
#   --max-total-tokens 8192          a small KV pool: on CPU SGLang otherwise sizes it from host memory
#   --sleep-on-idle                  an idle scheduler otherwise spins a whole core, which on a small
#                                    machine starves the other TP rank
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# SGLang's is_cpu() is False without it (cpu_support also defaults it, but only once plugins load).
export SGLANG_USE_CPU_ENGINE=1

exec "${PYTHON:-$ROOT/.venv/bin/python}" -m sglang.launch_server \
    --model-path "${MODEL:-$ROOT/models/trained-qwen3-moe}" \
    --device cpu \
    --attention-backend torch_native \
    --disable-overlap-schedule \
    --host 127.0.0.1 \
    --max-total-tokens 8192 \
    --sleep-on-idle \
    "$@"
