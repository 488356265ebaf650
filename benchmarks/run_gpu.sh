#!/usr/bin/env bash
# What a lent GPU runs (a few minutes): kernel agreement and CUDA-graph replay checks (the selector alone,
# and a Qwen3-MoE-shaped stack of MoE layers with our hook's stage in place: gpu_hook_capture), then the
# selection-stage timings, then the MoE-layer benchmark (SGLang's Triton fused MoE with and without
# selection in front), then the non-MoE decode parts and the end-to-end decode-step estimate from them
# (bench_decode_other, e2e_estimate). Results land in benchmarks/results/ (and in $OUT when the device
# tool sets it).
#
# The GPU machine has no sglang: the MoE-layer benchmark reads SGLang's kernel files from
# build/sglang_moe_files, exported here (where sglang is installed) and carried by the device call:
#   .venv/bin/python -m benchmarks.bench_moe_layer --export-sglang-files build/sglang_moe_files
#   device run: command "benchmarks/run_gpu.sh", carry ["build/sglang_moe_files"]
#
#   benchmarks/run_gpu.sh            # with the device image's python (torch + triton, no sglang needed)
#   benchmarks/run_gpu.sh moe [ARGS] # the MoE-layer benchmark only; ARGS go to bench_moe_layer
#   benchmarks/run_gpu.sh e2e [ARGS] # end-to-end estimate only: the non-MoE decode parts (ARGS go to
#                                    # bench_decode_other, expected < 2 min), the MoE layer for Qwen3-30B-A3B at
#                                    # B = 16, 64, then e2e_estimate. "all" runs it too, on the full MoE file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WHAT="${1:-all}"
if [ $# -gt 0 ]; then shift; fi
case "$WHAT" in
  all|moe|e2e) ;;
  *) echo "usage: $0 [all | moe [bench_moe_layer args] | e2e [bench_decode_other args]]" >&2; exit 2 ;;
esac
# Without an install, lynx_sglang.kernels is the kernels/ folder: link it where the package expects it.
"$PY" -c "import lynx_sglang.kernels" 2>/dev/null || ln -sfn ../kernels lynx_sglang/kernels
CHECKS_OK=1
if [ "$WHAT" = all ]; then
  # A failed check is recorded in gpu_checks_cuda.json; the timings still run (device time is scarce).
  "$PY" -m benchmarks.gpu_checks || CHECKS_OK=0
  "$PY" -m benchmarks.gpu_hook_capture || CHECKS_OK=0   # MoE layers with our hook's stage, one CUDA graph
  "$PY" -m benchmarks.bench_selection --device cuda
fi
moe_layer() {  # bench_moe_layer on the GPU with SGLang's kernel files; returns 1 where there are none
  if [ -f build/sglang_moe_files/lynx_sglang_files.json ]; then
    "$PY" -m benchmarks.bench_moe_layer --device cuda --sglang-files build/sglang_moe_files "$@"
  elif "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"; then
    "$PY" -m benchmarks.bench_moe_layer --device cuda "$@"   # sglang installed: its files are read in place
  else
    echo "bench_moe_layer skipped: no build/sglang_moe_files (export it where sglang is installed, carry it)" >&2
    return 1
  fi
}
MOE_OK=0
if [ "$WHAT" = all ] || [ "$WHAT" = moe ]; then
  if moe_layer "$@"; then MOE_OK=1; elif [ "$WHAT" = moe ]; then exit 1; fi
fi
if [ "$WHAT" = all ] || [ "$WHAT" = e2e ]; then
  if [ "$WHAT" = e2e ]; then "$PY" -m benchmarks.bench_decode_other --device cuda "$@";
  else "$PY" -m benchmarks.bench_decode_other --device cuda; fi
  if [ "$WHAT" = all ] && [ "$MOE_OK" = 1 ]; then
    "$PY" -m benchmarks.e2e_estimate --device cuda      # reads moe_layer_cuda.json, decode_other_cuda.json
  elif [ "$WHAT" = e2e ] && moe_layer --shapes qwen3-30b-a3b --batches 16,64 --no-plot \
      --out benchmarks/results/moe_layer_e2e_cuda; then
    "$PY" -m benchmarks.e2e_estimate --device cuda --moe benchmarks/results/moe_layer_e2e_cuda.json
  else
    echo "e2e_estimate skipped: no MoE-layer measurement on this GPU" >&2
    if [ "$WHAT" = e2e ]; then exit 1; fi
  fi
fi
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda* "$OUT"/; fi
if [ "$CHECKS_OK" = 0 ]; then
  echo "GPU checks FAILED: see benchmarks/results/gpu_checks_cuda.json, gpu_hook_capture_cuda.json" >&2; exit 1
fi
