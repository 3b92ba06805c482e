"""What ships: the wheel holds the library (`attnfused`) and its metadata only, and the compiled
extension registers no benchmark instrument."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# what a build reads from a checkout; not the caches, builds and results a working tree gathers
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "results",
                               ".pytest_cache")


def test_wheel_holds_the_library_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)  # builds in a copy: the shared tree gets no build/ or egg-info
    out = tmp_path / "wheel"
    env = {**os.environ, "ATTNFUSED_NO_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("attnfused-*.whl"))
    assert len(wheels) == 1, f"expected one attnfused wheel in {out}, got {[p.name for p in out.iterdir()]}"
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    meta = {t for t in tops if t.endswith(".dist-info")}
    assert tops - meta == {"attnfused"}, f"the wheel's top-level entries should be attnfused/ and its metadata, " \
                                         f"got {sorted(tops)}"
    assert "attnfused/__init__.py" in names and "attnfused/backends/extension.py" in names
    assert not [n for n in names if n.startswith("bench") or "traffic_probe" in n]


def test_extension_registers_no_benchmark_probe():
    from attnfused.backends import extension

    try:
        extension.ensure_loaded()
    except extension.ExtensionUnavailable as e:
        pytest.skip(f"no C++ extension here: {e}")
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("attnfused_C::")]
    assert "attnfused_C::channel_attention" in ops, f"the extension's operators were not listed: {ops}"
    assert not [n for n in ops if "probe" in n], f"a benchmark probe is registered in the library: {ops}"
    assert not [s for s in extension.cpu_sources() if "probe" in Path(s).name]
