"""The new CUDA path's pooling passes (csrc/cuda/next_pool.cuh) replayed on the CPU: tests/cpp/
next_plan_check.cpp compiles csrc/cuda/next_plan.h (their tiling and max rule, plain C++) with the
host compiler and checks sum, max and argmax of every (sample, channel) in both layouts (NCHW rows
of whole vectors, and rows of any length through shared-memory tiles) against a direct computation
with torch's rules: integer inputs (exact sums), many ties, -inf rows, NaNs. The pool over channels
(spatial_pool) runs the same two passes with C and H*W swapped (rows of a position's channels,
columns of a channel's positions): the random shapes here include such long runs of short rows.
The NCHW passes that hold a position's terms down a column of channels, CBAM's weighted pool in
two lanes per vector, and the spatial conv's tiles of rows staged in shared memory are replayed
too."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pooling_passes_decomposition_on_cpu(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "next_plan_check"
    subprocess.run([cxx, "-O1", "-std=c++17", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cpp" / "next_plan_check.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.strip().endswith(" 0 failures"), out.stdout
