"""Build of attnfused: `pip install --no-build-isolation .` compiles the extension `attnfused._C`
(CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of torch are present, or
with ATTNFUSED_FORCE_CUDA=1; never with ATTNFUSED_NO_CUDA=1; archs from TORCH_CUDA_ARCH_LIST,
default "8.0;9.0"; MAX_JOBS parallel jobs). The sources and flags live in
attnfused/backends/extension.py, the one list shared with the just-in-time build.
Set ATTNFUSED_NO_EXTENSION=1 to install the Python package alone (first use then builds just in time).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _extension_module():
    # loaded by path: importing the attnfused package here would need its dependencies at build time
    spec = importlib.util.spec_from_file_location("_attnfused_extension", ROOT / "attnfused" / "backends" / "extension.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kwargs = {}
if os.environ.get("ATTNFUSED_NO_EXTENSION", "") in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension

    kwargs = dict(ext_modules=[_extension_module().aot_extension()],
                  cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})

setup(**kwargs)
