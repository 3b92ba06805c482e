#!/bin/bash
# Validate the CUDA kernels on a lent H100/H200, from the repository root, in one command that
# fits a 15-minute lease (at most 540 s; stages with their own budgets and timeouts):
#   bash csrc/cuda/validate_gpu.sh [--dry-run] [--stages build,tests,...] [--slice N] [--dtype fp16|bf16]
# runs `python3 -m bench.gpu_check` (its docstring lists the stages): JIT build for sm_90, a curated
# CUDA test subset, compute-sanitizer on a rotating slice, per-kernel profile and benchmark rows,
# the L2 and cluster probes, the static check. Logs and CSV go to $GPU_CHECK_DIR (default
# /tmp/attnfused_gpu_check), packed into $OUT/gpu_check.tgz when $OUT is set; a short table is printed last.
#
# Longer single stages, untimed, each in a call of its own (logs in $LOGS, default /tmp/attnfused_gpu):
#   bash csrc/cuda/validate_gpu.sh all-tests    every CUDA, drop-in and Triton test (about 4 min, 12 workers)
#   bash csrc/cuda/validate_gpu.sh e2e          ResNet-50 end to end (bf16 autocast, channels-last, batch 64)
#   bash csrc/cuda/validate_gpu.sh bench-full   CBAM-FC, SE, ECA at the ResNet-50 stages, fp16, batch 128,
#                                               eager, compile, cuda, triton (about 4 min)
# The device machine's copy of the tree may carry a stale .git: set ATTNFUSED_COMMIT=<the commit sent>.
set -u
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
case "${1:-}" in
all-tests | e2e | bench-full)
  LOGS=${LOGS:-/tmp/attnfused_gpu}
  mkdir -p "$LOGS"
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
  for stage in "$@"; do
    echo "== $stage ($(date -u +%H:%M:%S))"
    case $stage in
    all-tests)
      $PY -m pytest tests/test_cuda_backend.py tests/test_drop_in.py tests/triton -q -rf --tb=short \
        -p no:cacheprovider $XDIST > "$LOGS/all-tests.log" 2>&1
      tail -3 "$LOGS/all-tests.log" ;;
    e2e)
      $PY -m bench.e2e --batch 64 --res 224 --amp bf16 --layout cl --no-progress > "$LOGS/e2e.log" 2>&1
      tail -25 "$LOGS/e2e.log" ;;
    bench-full)
      $PY -m bench --blocks cbam_fc,se,eca --shapes resnet50 --batch 128 --dtypes fp16 --layouts cl,nchw \
        --modes fwd,train --providers eager,compile,cuda,triton --name b128 --no-progress > "$LOGS/bench-full.log" 2>&1
      tail -45 "$LOGS/bench-full.log" ;;
    *) echo "unknown stage $stage (one of all-tests, e2e, bench-full)"; exit 2 ;;
    esac
  done
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_logs.tgz" -C "$LOGS" . -C "$PWD" bench/results
  exit 0 ;;
esac
exec $PY -m bench.gpu_check "$@"
