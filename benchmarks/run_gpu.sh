#!/usr/bin/env bash
# What a lent GPU runs (a few minutes): kernel agreement and CUDA-graph replay checks, then the
# selection-stage timings, then the MoE-layer benchmark (SGLang's Triton fused MoE with and without
# selection in front). Results land in benchmarks/results/ (and in $OUT when the device tool sets it).
#
# The GPU machine has no sglang: the MoE-layer benchmark reads SGLang's kernel files from
# build/sglang_moe_files, exported here (where sglang is installed) and carried by the device call:
#   .venv/bin/python -m benchmarks.bench_moe_layer --export-sglang-files build/sglang_moe_files
#   device run: command "benchmarks/run_gpu.sh", carry ["build/sglang_moe_files"]
#
#   benchmarks/run_gpu.sh            # with the device image's python (torch + triton, no sglang needed)
#   benchmarks/run_gpu.sh moe [ARGS] # the MoE-layer benchmark only; ARGS go to bench_moe_layer
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WHAT="${1:-all}"
if [ $# -gt 0 ]; then shift; fi
case "$WHAT" in all|moe) ;; *) echo "usage: $0 [all | moe [bench_moe_layer args]]" >&2; exit 2 ;; esac
# Without an install, lynx_sglang.kernels is the kernels/ folder: link it where the package expects it.
"$PY" -c "import lynx_sglang.kernels" 2>/dev/null || ln -sfn ../kernels lynx_sglang/kernels
if [ "$WHAT" = all ]; then
  "$PY" -m benchmarks.gpu_checks
  "$PY" -m benchmarks.bench_selection --device cuda
fi
if [ "$WHAT" = all ] || [ "$WHAT" = moe ]; then
  if [ -f build/sglang_moe_files/lynx_sglang_files.json ]; then
    "$PY" -m benchmarks.bench_moe_layer --device cuda --sglang-files build/sglang_moe_files "$@"
  elif "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"; then
    "$PY" -m benchmarks.bench_moe_layer --device cuda "$@"   # sglang installed: its files are read in place
  else
    echo "bench_moe_layer skipped: no build/sglang_moe_files (export it where sglang is installed, carry it)" >&2
    if [ "$WHAT" = moe ]; then exit 1; fi
  fi
fi
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda* "$OUT"/; fi
