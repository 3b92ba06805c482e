#!/bin/bash
# Validate the CUDA and Triton kernels on a GPU machine, from the repository root:
#   bash csrc/cuda/validate_gpu.sh [STAGE ...]      (default: build tests sanitize profile bench)
# Stages (each logs to $LOGS/<stage>.log and prints a short summary):
#   build     just-in-time build for this GPU (attnfused/backends/extension.py; about 90 s, 16 cores)
#   tests     the CUDA tests (about 4 min with pytest-xdist's 12 workers on an H100), the Triton tests
#   sanitize  compute-sanitizer memcheck / racecheck / synccheck on a small subset (about 15 s each)
#   profile   per-kernel times of CBAM-FC and SE (bench/profile_kernels.py)
#   bench     the microbenchmarks: CBAM-FC, SE, ECA at the ResNet-50 stages, fp16, batch 128, both layouts (4 min)
#   e2e       ResNet-50 end to end (bf16 autocast, channels-last, batch 64, 224x224)
# Logs go to $LOGS (default /tmp/attnfused_gpu); with $OUT set (the device tool's folder), the logs
# and bench/results/ are packed into $OUT/gpu_logs.tgz at the end. The device machine's copy of the
# tree may carry a stale .git: set ATTNFUSED_COMMIT=<the commit sent> so the results name it.
set -u
LOGS=${LOGS:-/tmp/attnfused_gpu}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} ATTNFUSED_VERBOSE_BUILD=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
STAGES=${*:-build tests sanitize profile bench}

for stage in $STAGES; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  log=$LOGS/$stage.log
  case $stage in
  build)
    $PY -c "import attnfused, json; print(json.dumps(attnfused.build_info(), indent=1))" > "$log" 2>&1
    tail -12 "$log" ;;
  tests)
    $PY -m pytest tests/test_cuda_backend.py tests/test_drop_in.py -v -rf --tb=short -p no:cacheprovider $XDIST \
      > "$log" 2>&1
    tail -3 "$log"; grep -E "^FAILED|^ERROR" "$log" | cut -c1-200 | head -20
    $PY -m pytest tests/triton -q -rf -p no:cacheprovider $XDIST > "$LOGS/tests_triton.log" 2>&1
    tail -3 "$LOGS/tests_triton.log" ;;
  sanitize)
    # CBAM fp16 avg+max pooling in both forward paths and layouts, the spatial halves, an empty batch
    SUB="(parity_all_options and float16 and not bfloat16 and avg+max and cbam) or (spatial_halves and float16 and not bfloat16) or empty_batch"
    for tool in memcheck racecheck synccheck; do
      # no caching allocator: out-of-bounds accesses inside a cached block would go unseen
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
        $PY -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "$SUB" > "$LOGS/sanitize_$tool.log" 2>&1
      echo "$tool: exit $?; $(grep -E 'SUMMARY' "$LOGS/sanitize_$tool.log" | tail -1); $(tail -1 "$LOGS/sanitize_$tool.log")"
    done ;;
  profile)
    $PY -m bench.profile_kernels --blocks cbam_fc,se > "$log" 2>&1; tail -40 "$log" ;;
  bench)
    $PY -m bench --blocks cbam_fc,se,eca --shapes resnet50 --batch 128 --dtypes fp16 --layouts cl,nchw \
      --modes fwd,train --providers eager,compile,cuda,triton --name b128 --no-progress > "$log" 2>&1
    tail -45 "$log" ;;
  e2e)
    $PY -m bench.e2e --batch 64 --res 224 --amp bf16 --layout cl --no-progress > "$log" 2>&1
    tail -25 "$log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_logs.tgz" -C "$LOGS" . -C "$PWD" bench/results
fi
