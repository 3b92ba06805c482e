#!/usr/bin/env bash
# The test suite: the main pytest run, then the Triton tests in their own process (on a
# machine without a GPU through the Triton interpreter, which must be enabled before
# triton is imported). Fails if either fails or collects no test.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
"$PY" -m pytest tests --ignore=tests/triton -q -p no:cacheprovider "$@" || status=1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -m pytest tests/triton -q -p no:cacheprovider "$@" || status=1
else
  TRITON_INTERPRET=1 "$PY" -m pytest tests/triton -q -p no:cacheprovider "$@" || status=1
fi
exit $status
