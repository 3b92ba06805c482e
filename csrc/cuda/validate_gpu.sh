#!/bin/bash
# Validate the CUDA kernels on a GPU machine, from the repository root:
#   bash csrc/cuda/validate_gpu.sh [quick]
# 1. just-in-time build for this GPU (attnfused/backends/extension.py), 2. the CUDA tests,
# 3. compute-sanitizer memcheck / racecheck / synccheck on a small subset, 4. the benchmarks.
# Logs go to ${OUT:-/tmp/attnfused_gpu}/.
set -u
OUT=${OUT:-/tmp/attnfused_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} ATTNFUSED_VERBOSE_BUILD=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== build"
$PY -c "import attnfused, json; print(json.dumps(attnfused.build_info(), indent=1))" 2>&1 | tee "$OUT/build.log" | tail -20

echo "== tests"
$PY -m pytest tests/test_cuda_backend.py -q --maxfail=50 -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25
[ "${1:-}" = quick ] && exit 0

echo "== compute-sanitizer (small subset, both forward paths)"
SUB="parity_all_options and cbam and float16 and not bfloat16 or spatial_halves or empty_batch"
for tool in memcheck racecheck synccheck; do
  # no caching allocator: out-of-bounds accesses inside a cached block would go unseen
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    $PY -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "$SUB" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$tool.log") clean summaries)"
done

echo "== bench (SPEC 6 shapes, half precision, both layouts)"
$PY -m bench --blocks all --shapes resnet50,efficientnet,mobilenet,odd --batch 32,128 --dtypes fp16,bf16 --layouts nchw,cl \
  --modes fwd,train --providers eager,compile,cuda,triton --out bench/results/$(hostname)-cuda 2>&1 | tail -60
