#!/bin/bash
# Validate the CUDA and Triton kernels on a GPU machine, from the repository root:
#   bash csrc/cuda/validate_gpu.sh [quick]
# 1. just-in-time build for this GPU (attnfused/backends/extension.py; about 90 s with 16 cores),
# 2. the CUDA tests (about 4 min with pytest-xdist's 12 workers on an H100) and the Triton tests,
# 3. compute-sanitizer memcheck / racecheck / synccheck on a small subset (about 15 s each),
# 4. the benchmarks and a per-kernel profile (bench/profile_kernels.py).
# Logs go to ${OUT:-/tmp/attnfused_gpu}/.
set -u
OUT=${OUT:-/tmp/attnfused_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} ATTNFUSED_VERBOSE_BUILD=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")

echo "== build"
$PY -c "import attnfused, json; print(json.dumps(attnfused.build_info(), indent=1))" > "$OUT/build.log" 2>&1
tail -12 "$OUT/build.log"

echo "== tests"
$PY -m pytest tests/test_cuda_backend.py tests/test_drop_in.py -v -rf --tb=short -p no:cacheprovider $XDIST \
  > "$OUT/pytest_cuda.log" 2>&1
tail -3 "$OUT/pytest_cuda.log"; grep -E "^FAILED|^ERROR" "$OUT/pytest_cuda.log" | cut -c1-200 | head -20
$PY -m pytest tests/triton -q -rf -p no:cacheprovider $XDIST > "$OUT/pytest_triton.log" 2>&1
tail -3 "$OUT/pytest_triton.log"
[ "${1:-}" = quick ] && exit 0

echo "== compute-sanitizer (CBAM fp16 avg+max pooling in both forward paths and layouts, spatial halves, empty batch)"
SUB="(parity_all_options and float16 and not bfloat16 and avg+max and cbam) or (spatial_halves and float16 and not bfloat16) or empty_batch"
for tool in memcheck racecheck synccheck; do
  # no caching allocator: out-of-bounds accesses inside a cached block would go unseen
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    $PY -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "$SUB" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool: exit $?; $(grep -E 'SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
done

echo "== profile and bench (ResNet-50 stages, fp16, batch 128, both layouts)"
$PY -m bench.profile_kernels > "$OUT/profile.txt" 2>&1; tail -40 "$OUT/profile.txt"
$PY -m bench --blocks all --shapes resnet50 --batch 128 --dtypes fp16 --layouts cl,nchw \
  --modes fwd,train --providers eager,compile,cuda,triton --name gpu_b128 2>&1 | tail -60
