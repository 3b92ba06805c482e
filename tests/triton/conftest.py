"""The Triton tests run in their own pytest process: on a GPU when there is one, else on CPU
through the Triton interpreter, which must be switched on before triton is imported:

    TRITON_INTERPRET=1 python -m pytest tests/triton -q

Without a GPU and without the interpreter every test here is skipped, saying why.

On a GPU machine (no interpreter; bfloat16 included, bigger blocks, autotuned scale pass):

    python -m pytest tests/triton -q
    python -m bench --device cuda --providers eager,compile,compile-max,triton --blocks all \
        --shapes resnet50,efficientnet,odd --dtypes fp16,fp32 --layouts nchw,cl --batch 32 \
        --modes fwd,train --name triton

Without a GPU, `python -m tests.triton.compile_sm90` (no interpreter) compiles every kernel
variant for sm_90, which the interpreter never does.
"""
import os

import pytest

from tests.triton._env import DEVICES


def pytest_collection_modifyitems(config, items):
    if DEVICES:
        return
    skip = pytest.mark.skip(reason="Triton tests need a CUDA GPU or TRITON_INTERPRET=1 set before triton is "
                                   "imported (run them in their own process: "
                                   "TRITON_INTERPRET=1 python -m pytest tests/triton)")
    for item in items:
        if "tests/triton/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
