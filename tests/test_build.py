"""The extension's build: what build_info reports, nothing compiled at import, the just-in-time
build (two processes at once build it once), and a failed build falling back to `reference`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnfused
from attnfused.backends import extension

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_build_info_contents():
    info = attnfused.build_info()
    assert {"cpu", "cuda", "cuda_archs", "torch", "cuda_version", "build", "path"} <= set(info)
    assert info["torch"] == torch.__version__ and info["cuda_version"] == torch.version.cuda
    assert info["cpu"] is True, info.get("error")
    assert info["build"] in ("aot", "jit") and Path(info["path"]).is_file()
    assert info["cpu_arch"] in ("avx2", "generic", "native")
    assert all(a.startswith("sm_") for a in info["cuda_archs"])
    assert info["cuda"] == bool(info["cuda_archs"]) == extension.has_cuda()
    if info["cuda"] and not os.environ.get("TORCH_CUDA_ARCH_LIST") and info["build"] == "aot":
        assert {"sm_80", "sm_90"} <= set(info["cuda_archs"])


def test_build_info_names_the_cuda_kernels(monkeypatch):
    monkeypatch.delenv("ATTNFUSED_CUDA_KERNELS", raising=False)
    assert attnfused.build_info()["cuda_kernels"] == "validated"
    monkeypatch.setenv("ATTNFUSED_CUDA_KERNELS", "next")
    assert attnfused.build_info()["cuda_kernels"] == "next"


def test_arch_names():
    assert extension.arch_names("8.0;9.0+PTX") == ["sm_80", "sm_90"]
    assert extension.arch_names("8.0 8.6 9.0a") == ["sm_80", "sm_86", "sm_90a"]


def test_one_source_list():
    srcs = extension.cpu_sources()
    assert srcs[0].endswith("ops.cpp") and len(srcs) > 1 and all(Path(s).is_file() for s in srcs)
    assert all(s.endswith((".cu", ".cpp")) for s in extension.cuda_sources())


def test_nothing_compiles_at_import():
    p = _python("import attnfused, torch; from attnfused.backends import extension as e; "
                "assert not e._state['loaded'] and e._state['error'] is None; "
                "assert not hasattr(torch.ops.attnfused_C, 'cbam'), 'the C++ ops are registered'; "
                "assert not [p for p in torch.ops.loaded_libraries if 'attnfused' in p], torch.ops.loaded_libraries; "
                "print('ok')")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and out.strip() == "ok", err


def test_failed_build_falls_back_with_a_warning(tmp_path):
    code = """
import warnings, torch, attnfused
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    x = torch.randn(1, 4, 3, 3)
    assert attnfused.backends.resolve("auto", x) == "reference"
    attnfused.backends.resolve("auto", x)
assert sum("extension is unavailable" in str(m.message) for m in w) == 1, [str(m.message) for m in w]
try:
    attnfused.backends.resolve("cpu", x)
except attnfused.BackendUnavailableError as e:
    assert "ATTNFUSED_NO_JIT" in str(e), e
else:
    raise AssertionError("backend='cpu' did not raise")
info = attnfused.build_info()
assert info["cpu"] is False and info["build"] is None and "ATTNFUSED_NO_JIT" in info["error"]
print("ok")
"""
    p = _python(code, {"ATTNFUSED_BUILD": "jit", "ATTNFUSED_NO_JIT": "1", "ATTNFUSED_CACHE_DIR": str(tmp_path),
                       "ATTNFUSED_BACKEND": ""})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and out.strip() == "ok", err


@pytest.mark.slow
def test_jit_build_two_processes_at_once(tmp_path):
    """A fresh cache, two processes starting together: one compiles (and says so in one line), the
    other waits on the lock and loads the same library; both run the kernels."""
    code = """
import torch, attnfused
info = attnfused.build_info()
assert info["build"] == "jit" and info["cpu"], info
x = torch.randn(2, 8, 5, 5)
y = attnfused.functional.channel_attention(x, torch.randn(2, 8), None, torch.randn(8, 2), backend="cpu")
assert y.shape == x.shape
print(info["path"])
"""
    env = {"ATTNFUSED_BUILD": "jit", "ATTNFUSED_CACHE_DIR": str(tmp_path), "ATTNFUSED_NO_CUDA": "1",
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    procs = [_python(code, env) for _ in range(2)]
    results = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and Path(paths.pop()).parent.parent == tmp_path
    messages = [line for _, err in results for line in err.splitlines() if line.startswith("attnfused: compiling")]
    assert len(messages) == 1, messages
