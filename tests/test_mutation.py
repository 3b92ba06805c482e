"""The mutation check: the suite must fail against wrong kernels. For each mutant of
tests/mutation/plugin.py (an output 1% off in half precision, an input gradient 3x too large, a
float64 path computed in float32, a weight gradient zeroed, a max's gradient sent to the wrong
index, a channels_last output written NCHW, a forward's residual and relu not applied, its input's
affine not applied) a fast subset of the parity tests runs in its own
process against the cpu backend's kernels so wrapped, and must fail on an assertion; without a
mutant the same subset must pass."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import attnfused
from tests.cases import CBAM_CASES, CHANNEL_CASES, PROLOGUE_CASES, SHAPES, SPATIAL_CASES, TAIL_CASES
from tests.mutation.plugin import ENV_VAR, MUTANTS

ROOT = Path(__file__).resolve().parents[1]
# The parity tests of tests/test_ops.py on the cpu backend that run: a channel attention with both
# pools (MLP), one with the max pool (1D conv), a spatial attention and a CBAM with max pools, in
# every dtype; the three shapes-and-layouts cases on channels_last input; a channel attention and a
# CBAM with the residual block's tail; a spatial attention and a CBAM with the input's affine.
_CASES = (CHANNEL_CASES[5], CHANNEL_CASES[11], SPATIAL_CASES[0], CBAM_CASES[3])
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SUBSET = ([f"tests/test_ops.py::test_parity_all_options[{c}-cpu-{dt}]" for c in _CASES for dt in _DTYPES]
          + [f"tests/test_ops.py::test_parity_shapes_layouts[{c}-{SHAPES[0]}-channels_last-cpu]"
             for c in (CHANNEL_CASES[2], SPATIAL_CASES[0], CBAM_CASES[9])]
          + [f"tests/test_tail.py::test_tail_matches_the_oracle[{c}-cpu-nchw-torch.float32]"
             for c in (TAIL_CASES[0], TAIL_CASES[5])]
          + [f"tests/test_prologue.py::test_prologue_matches_the_oracle[{c}-cpu-channels_last-torch.float32]"
             for c in (PROLOGUE_CASES[3], PROLOGUE_CASES[8])])
RUNS = ("none", *MUTANTS)


def _pytest(mutant: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", *SUBSET, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--no-header", "-rf"] + ([] if mutant == "none" else ["-x"])
    env = {**os.environ, ENV_VAR: mutant, "ATTNFUSED_BACKEND": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def results():
    """Every run's result, two processes at a time (one per core of the CI machine)."""
    if attnfused.backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip(f"the cpu backend cannot run: {attnfused.backends.unavailable_reason('cpu', 'cpu')}")
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(RUNS, pool.map(_pytest, RUNS)))


@pytest.mark.parametrize("mutant", RUNS)
def test_suite_catches_wrong_kernels(results, mutant):
    r = results[mutant]
    out = (r.stdout + r.stderr)[-3000:]
    if mutant == "none":
        assert r.returncode == 0 and f"{len(SUBSET)} passed" in r.stdout, \
            f"the subset does not pass ({len(SUBSET)} tests) with the right kernels:\n{out}"
        return
    # exit code 1: tests ran and failed (2-5: interrupted, internal or usage error, none collected)
    assert r.returncode == 1 and "1 failed" in r.stdout, f"mutant {mutant!r} was not caught:\n{out}"
    # a failed assert, not an exception of another kind (a mutant that breaks the call itself)
    raised = set(re.findall(r"^E\s+(\w+(?:Error|Exception|Interrupt)):", r.stdout, re.M))
    assert raised <= {"AssertionError"}, f"mutant {mutant!r} made a test fail other than on an assertion:\n{out}"
