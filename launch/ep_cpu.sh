#!/usr/bin/env bash
# Expert parallelism on a CPU-only machine, for development (gloo between local processes).
#
#   launch/ep_cpu.sh                     # real SGLang server: TP = EP = 2, our all-to-all, lynx_ep
#   EP=4 launch/ep_cpu.sh --port 30201   # 4 ranks (the bundled model has 32 experts: 8 per rank)
#   launch/ep_cpu.sh demo --world 4      # no server: dispatch + experts + combine on 4 processes,
#                                        # checked against one process, traffic per policy
# A2A, POLICY and PYTHON as in launch/ep_server.sh. Each rank is one process; on a 2-core machine EP=4 is slow.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "demo" ]; then
    shift
    exec "${PYTHON:-$ROOT/.venv/bin/python}" -m lynx_sglang.ep_demo "$@"
fi
EP="${EP:-2}"
A2A="${A2A:-lynx}"
exec "$ROOT/launch/cpu_server.sh" \
    --tp-size "$EP" --ep-size "$EP" \
    --moe-a2a-backend "$A2A" \
    --moe-backend lynx --lynx-policy "${POLICY:-lynx_ep}" \
    "$@"
