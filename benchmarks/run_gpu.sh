#!/usr/bin/env bash
# What a lent GPU runs (a few minutes): kernel agreement and CUDA-graph replay checks, then the
# selection-stage timings. Results land in benchmarks/results/ (and in $OUT when the device tool sets it).
#
#   benchmarks/run_gpu.sh            # with the device image's python (torch + triton, no sglang needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
# Without an install, lynx_sglang.kernels is the kernels/ folder: link it where the package expects it.
"$PY" -c "import lynx_sglang.kernels" 2>/dev/null || ln -sfn ../kernels lynx_sglang/kernels
"$PY" -m benchmarks.gpu_checks
"$PY" -m benchmarks.bench_selection --device cuda
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda* "$OUT"/; fi
