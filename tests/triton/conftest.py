"""The Triton tests run in their own pytest process: on a GPU when there is one, else on CPU
through the Triton interpreter, which must be switched on before triton is imported:

    TRITON_INTERPRET=1 python -m pytest tests/triton -q

Without a GPU and without the interpreter every test here is skipped, saying why.
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
