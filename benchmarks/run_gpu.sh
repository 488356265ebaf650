#!/usr/bin/env bash
# What a lent GPU runs: kernel agreement and CUDA-graph replay checks (the selector alone, and a
# Qwen3-MoE-shaped stack of MoE layers with our hook's stage in place: gpu_hook_capture), then the
# selection-stage timings, then the MoE-layer benchmark (SGLang's Triton fused MoE with and without
# selection in front), then the non-MoE decode parts and the end-to-end decode-step estimate from them
# (bench_decode_other, e2e_estimate). Results land in benchmarks/results/; with the device tool's $OUT set,
# they and the run's log also go to $OUT/results_cuda.tgz (one file: the tool returns at most 8), after
# every step, so a step that fails or a call that hits its time limit keeps what came before.
#
# The GPU machine has no sglang: the MoE-layer benchmark reads SGLang's kernel files from
# build/sglang_moe_files, exported here (where sglang is installed) and carried by the device call:
#   .venv/bin/python -m benchmarks.bench_moe_layer --export-sglang-files build/sglang_moe_files
#   device run: command "LYNX_COMMIT=<hash> benchmarks/run_gpu.sh checks", carry ["build/sglang_moe_files"],
#   then, while the machine is warm (Triton's cache is reused), "... benchmarks/run_gpu.sh moe", "... e2e".
#   (One call has 10 minutes; "all" in one call is estimated at 8-11 minutes, so split it.)
#
#   benchmarks/run_gpu.sh lease      # one device call (~8 min): every check, then the timings trimmed to what
#                                    # a 15-minute lease allows (the MoE layer at Qwen3-30B-A3B shape on the
#                                    # e128 model's recorded routing, the e2e estimate, host-transfer rates)
#   benchmarks/run_gpu.sh kernels    # the selection kernels' loop: checks, where their time goes
#                                    # (profile_selection), their timings (~2 min)
#   benchmarks/run_gpu.sh            # all of it (PYTHON: the interpreter, default python3)
#   benchmarks/run_gpu.sh checks     # the checks and the selection timings
#   benchmarks/run_gpu.sh moe [ARGS] # the MoE-layer benchmark only; ARGS go to bench_moe_layer
#   benchmarks/run_gpu.sh e2e [ARGS] # end-to-end estimate only: the non-MoE decode parts (ARGS go to
#                                    # bench_decode_other, expected < 2 min), the MoE layer for Qwen3-30B-A3B at
#                                    # B = 16, 64, then e2e_estimate. "all" runs it too, on the full MoE file.
# LYNX_COMMIT: the commit to record in the results (the device's copy of the tree has no .git).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
WHAT="${1:-all}"
if [ $# -gt 0 ]; then shift; fi
case "$WHAT" in
  all|checks|moe|e2e|lease|kernels) ;;
  *) echo "usage: $0 [all | checks | moe [bench_moe_layer args] | e2e [bench_decode_other args] | lease | kernels]" >&2
     exit 2 ;;
esac
LOG=benchmarks/results/run_gpu_${WHAT}_cuda.log
mkdir -p benchmarks/results
exec > >(tee -a "$LOG") 2>&1
save_out() {  # everything measured so far (and this log) into $OUT, as one file
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/results_cuda.tgz" benchmarks/results/*cuda* 2>/dev/null || true; fi
}
trap save_out EXIT
# Without an install, lynx_sglang.kernels is the kernels/ folder: link it where the package expects it.
"$PY" -c "import lynx_sglang.kernels" 2>/dev/null || ln -sfn ../kernels lynx_sglang/kernels
FAILED=""
step() {  # step NAME SECONDS CMD...: run one step with its own time limit; a failure is noted, the run goes on
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  if ! timeout "$limit" "$@"; then FAILED="$FAILED $name"; echo "=== $name FAILED"; fi
  save_out
}
if [ "$WHAT" = all ] || [ "$WHAT" = checks ]; then
  # A failed check is recorded in gpu_checks_cuda.json; the timings still run (device time is scarce).
  step gpu_checks 240 "$PY" -m benchmarks.gpu_checks
  step gpu_hook_capture 180 "$PY" -m benchmarks.gpu_hook_capture   # MoE layers with our hook's stage, one graph
  step bench_selection 240 "$PY" -m benchmarks.bench_selection --device cuda
fi
# bench_moe_layer on the GPU with SGLang's kernel files (exported and carried, or an installed sglang's).
if [ -f build/sglang_moe_files/lynx_sglang_files.json ]; then
  MOE=("$PY" -m benchmarks.bench_moe_layer --device cuda --sglang-files build/sglang_moe_files)
elif "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"; then
  MOE=("$PY" -m benchmarks.bench_moe_layer --device cuda)
else
  MOE=(false)  # a failed step, with this message:
  echo "no build/sglang_moe_files: export it where sglang is installed and carry it (see the top of this file)"
fi
if [ "$WHAT" = lease ]; then
  # Most valuable first: correctness on sm_90 and CUDA-graph capture, then the MoE-layer speed, then the rest.
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv || true
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  step gpu_checks 150 "$PY" -m benchmarks.gpu_checks
  step gpu_hook_capture 75 "$PY" -m benchmarks.gpu_hook_capture
  step moe_layer_e128_trace 170 "${MOE[@]}" --shapes qwen3-30b-a3b --batches 1,16,32,64 --routing trace \
    --trace data/routing/trained-qwen3-moe-e128.pt --policies off,lynx,lynx+sim,oea --aa --reps 15 \
    --out benchmarks/results/moe_layer_cuda
  step host_transfer 40 "$PY" -m benchmarks.bench_host_transfer
  step bench_decode_other 60 "$PY" -m benchmarks.bench_decode_other --device cuda --reps 15
  case "$FAILED" in *moe_layer_e128_trace*) ;; *)
    step e2e_estimate 30 "$PY" -m benchmarks.e2e_estimate --device cuda --moe benchmarks/results/moe_layer_cuda.json ;;
  esac
  step bench_selection 50 "$PY" -m benchmarks.bench_selection --device cuda --policies lynx,oea,budget \
    --batches 1,16,64,256 --experts 64,128,256 --topk 8 --iters 100
fi
if [ "$WHAT" = kernels ]; then
  step gpu_checks 150 "$PY" -m benchmarks.gpu_checks
  step profile_selection 90 "$PY" -m benchmarks.profile_selection
  step bench_selection 60 "$PY" -m benchmarks.bench_selection --device cuda --policies lynx,oea,budget \
    --batches 1,16,64,256 --experts 64,128,256 --topk 8 --iters 100
fi
MOE_OK=0
if [ "$WHAT" = all ] || [ "$WHAT" = moe ]; then
  step bench_moe_layer 480 "${MOE[@]}" "$@"
  case "$FAILED" in *bench_moe_layer*) ;; *) MOE_OK=1 ;; esac
fi
if [ "$WHAT" = all ] || [ "$WHAT" = e2e ]; then
  if [ "$WHAT" = e2e ]; then
    step bench_decode_other 180 "$PY" -m benchmarks.bench_decode_other --device cuda "$@"
    step moe_layer_e2e 300 "${MOE[@]}" --shapes qwen3-30b-a3b --batches 16,64 --no-plot \
      --out benchmarks/results/moe_layer_e2e_cuda
    case "$FAILED" in *moe_layer_e2e*) ;; *) MOE_OK=1 ;; esac
    MOE_JSON=benchmarks/results/moe_layer_e2e_cuda.json
  else
    step bench_decode_other 180 "$PY" -m benchmarks.bench_decode_other --device cuda
    MOE_JSON=benchmarks/results/moe_layer_cuda.json
  fi
  if [ "$MOE_OK" = 1 ]; then
    step e2e_estimate 60 "$PY" -m benchmarks.e2e_estimate --device cuda --moe "$MOE_JSON"
  else
    echo "e2e_estimate skipped: no MoE-layer measurement on this GPU"
  fi
fi
if [ -n "$FAILED" ]; then
  echo "FAILED steps:$FAILED (failed checks: benchmarks/results/gpu_checks_cuda.json, gpu_hook_capture_cuda.json)"
  exit 1
fi
