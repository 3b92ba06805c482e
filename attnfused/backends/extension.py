"""The compiled extension `attnfused_C`: the one list of sources and flags, and how it is loaded.

Two builds share everything below:
- ahead of time: `pip install --no-build-isolation .` runs setup.py, which calls `aot_extension()`
  and builds `attnfused/_C*.so`;
- just in time: without that library, the first use calls `torch.utils.cpp_extension.load` (ninja)
  on the source tree, into a cache directory, under a file lock (two processes starting at once
  build once; the second waits and loads).

Nothing here compiles at import. `ensure_loaded()` loads (or builds) the library once per process and
raises `ExtensionUnavailable` with the reason when it cannot; `unavailable_reason(device_type)` is the
non-raising form the backends use (auto selection falls back to `reference` with one warning).

This module imports only torch and the standard library so setup.py can load it by path.

Environment:
  ATTNFUSED_FORCE_CUDA=1   compile the CUDA sources even if torch or the toolkit look unusable (and, just
                           in time, even where no GPU is visible: by default the JIT build skips them there)
  ATTNFUSED_NO_CUDA=1      never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST     CUDA archs, as torch reads it (default: "8.0;9.0" ahead of time; the visible
                           GPUs', else "8.0;9.0", just in time)
  MAX_JOBS                 parallel compile jobs (torch's ninja builds read it)
  ATTNFUSED_CACHE_DIR      JIT build cache (default: $XDG_CACHE_HOME or ~/.cache, then attnfused/)
  ATTNFUSED_NO_JIT=1       never build just in time (use the AOT library or nothing)
  ATTNFUSED_BUILD=jit      ignore an ahead-of-time library and use (or make) the JIT build
  ATTNFUSED_CPU_ARCH       CPU vector ISA of the kernels: "avx2" (default on x86 with AVX2+FMA),
                           "generic" (portable), or "native" (-march=native)
  ATTNFUSED_VERBOSE_BUILD=1  show the compiler's output
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the source tree (setup.py, csrc/)
CSRC = ROOT / "csrc"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
AOT_NAME = "attnfused._C"
JIT_NAME = "attnfused_C_jit"
DEFAULT_CUDA_ARCHS = "8.0;9.0"

ENV_FORCE_CUDA = "ATTNFUSED_FORCE_CUDA"
ENV_NO_CUDA = "ATTNFUSED_NO_CUDA"
ENV_CACHE = "ATTNFUSED_CACHE_DIR"
ENV_NO_JIT = "ATTNFUSED_NO_JIT"
ENV_CPU_ARCH = "ATTNFUSED_CPU_ARCH"
ENV_VERBOSE = "ATTNFUSED_VERBOSE_BUILD"
ENV_BUILD = "ATTNFUSED_BUILD"


class ExtensionUnavailable(RuntimeError):
    """The compiled extension could not be loaded or built; the message says why."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# ----------------------------------------------------------------------------- sources and flags

def cpu_sources(root: Path = ROOT) -> list[str]:
    return [str(root / "csrc" / "ops.cpp")] + sorted(glob.glob(str(root / "csrc" / "cpu" / "*.cpp")))


def cuda_sources(root: Path = ROOT) -> list[str]:
    """The CUDA helper's files: every .cu (and host .cpp needing CUDA) in csrc/cuda/."""
    d = root / "csrc" / "cuda"
    return sorted(glob.glob(str(d / "*.cu")) + glob.glob(str(d / "*.cpp")))


def headers(root: Path = ROOT, with_cuda: bool = True) -> list[str]:
    """Headers the build depends on (the CUDA folder's only when CUDA sources are compiled)."""
    out = glob.glob(str(root / "csrc" / "*.h")) + glob.glob(str(root / "csrc" / "cpu" / "*.h"))
    if with_cuda:
        out += glob.glob(str(root / "csrc" / "cuda" / "*.h")) + glob.glob(str(root / "csrc" / "cuda" / "*.cuh"))
    return sorted(out)


def cuda_why_not() -> str | None:
    """Why CUDA sources are not compiled in a build made now (None: they are)."""
    if _flag(ENV_NO_CUDA):
        return f"${ENV_NO_CUDA} is set"
    if not cuda_sources():
        return "no CUDA sources in csrc/cuda"
    if _flag(ENV_FORCE_CUDA):
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _cuda_home() is None:
        return "no CUDA toolkit found (set CUDA_HOME to it, e.g. /usr/local/cuda)"
    return None


def _cuda_home() -> str | None:
    """torch's CUDA_HOME, corrected when torch guessed it from an `nvcc` wrapper outside the toolkit
    (e.g. /usr/local/bin/nvcc gives /usr/local, which has no libcudart) and $CUDA_HOME is unset."""
    import torch.utils.cpp_extension as cpp

    def ok(home):
        return home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
            glob.glob(os.path.join(home, "lib64", "libcudart.so*")) or glob.glob(os.path.join(home, "lib", "libcudart.so*")))

    if ok(cpp.CUDA_HOME):
        return cpp.CUDA_HOME
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if ok(home):
            cpp.CUDA_HOME = home  # what torch's builders read
            os.environ.setdefault("CUDA_HOME", home)
            return home
    return None


def _cuda_include_dirs() -> list[str]:
    """Some torch CUDA headers need the toolkit headers of torch's nvidia wheels (nvidia/cu13/include)."""
    out = []
    for base in sys.path:
        out += glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include"))
    return sorted(set(out))


def _cpu_arch_flags() -> tuple[list[str], str]:
    arch = os.environ.get(ENV_CPU_ARCH, "").strip().lower()
    if not arch:
        arch = "avx2" if _cpu_has("avx2") and _cpu_has("fma") else "generic"
    if arch == "avx2":
        # at::vec's AVX2 specialisations (an inline namespace of our own, not torch's kernels)
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"], arch
    if arch == "native":
        return ["-march=native"], arch
    if arch == "generic":
        return [], arch
    raise ExtensionUnavailable(f"${ENV_CPU_ARCH} must be avx2, generic or native, got {arch!r}")


def _cpu_has(feature: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return feature in line.split()
    except OSError:
        pass
    return False


def cuda_arch_list(jit: bool) -> str:
    """The TORCH_CUDA_ARCH_LIST a CUDA build made now uses."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if jit and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return DEFAULT_CUDA_ARCHS


def arch_names(arch_list: str) -> list[str]:
    """"8.0;9.0+PTX" -> ["sm_80", "sm_90"] (as build_info reports them)."""
    out = []
    for a in arch_list.replace(" ", ";").split(";"):
        a = a.split("+")[0].strip()
        if a:
            major, minor = a.split(".")
            out.append(f"sm_{major}{minor}")
    return out


def build_flags(with_cuda: bool, kind: str, arch_list: str | None) -> dict:
    """Compiler flags of both builds: {"cxx": [...], "nvcc": [...], "include_dirs": [...], "ldflags": [...]}."""
    cpu_arch, cpu_arch_name = _cpu_arch_flags()
    defines = [f"-DAF_BUILD={kind}", f"-DAF_CPU_ARCH={cpu_arch_name}"]
    if with_cuda:
        defines += ["-DAF_WITH_CUDA=1", "-DAF_CUDA_ARCHS=" + "-".join(arch_names(arch_list or ""))]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"] + cpu_arch + defines
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG"] + defines
    includes = [str(CSRC)] + (_cuda_include_dirs() if with_cuda else [])
    return {"cxx": cxx, "nvcc": nvcc, "include_dirs": includes, "ldflags": ["-fopenmp"]}


def aot_extension():
    """The setuptools Extension that setup.py builds (attnfused._C)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    why_not = cuda_why_not()
    with_cuda = why_not is None
    arch_list = None
    if with_cuda:
        arch_list = cuda_arch_list(jit=False)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # torch turns it into -gencode flags
    flags = build_flags(with_cuda, "aot", arch_list)
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731  (setuptools wants relative)
    sources = rel(cpu_sources() + (cuda_sources() if with_cuda else []))
    cls = CUDAExtension if with_cuda else CppExtension
    args = {"cxx": flags["cxx"]}
    if with_cuda:
        args["nvcc"] = flags["nvcc"]
    print(f"attnfused: building {AOT_NAME} with cpu kernels"
          + (f" and cuda kernels for {arch_names(arch_list)}" if with_cuda else f" only (no cuda: {why_not})"),
          file=sys.stderr)
    return cls(AOT_NAME, sources, include_dirs=flags["include_dirs"], extra_compile_args=args,
               extra_link_args=flags["ldflags"], depends=rel(headers(with_cuda=with_cuda)))


# ----------------------------------------------------------------------------- loading

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "build": None, "path": None, "warned": False}


def _aot_library() -> str | None:
    libs = sorted(glob.glob(str(PACKAGE_DIR / "_C*.so")) + glob.glob(str(PACKAGE_DIR / "_C*.pyd")))
    return libs[0] if libs else None


def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnfused"


def _jit_build_dir(sources: list[str], flags: dict, arch_list: str | None, with_cuda: bool) -> Path:
    """One folder per (sources' contents, flags, torch, python): a changed file rebuilds elsewhere."""
    h = hashlib.sha256()
    for p in sorted(sources + headers(with_cuda=with_cuda)):
        h.update(p.encode())
        h.update(Path(p).read_bytes())
    h.update(repr((flags, arch_list, torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_dir() / f"{tag}-{h.hexdigest()[:16]}"


def _jit_build() -> str:
    from torch.utils.cpp_extension import load

    if _flag(ENV_NO_JIT):
        raise ExtensionUnavailable(f"no ahead-of-time build of {AOT_NAME} and ${ENV_NO_JIT} is set")
    if not (CSRC / "ops.cpp").is_file():
        raise ExtensionUnavailable(f"no ahead-of-time build of {AOT_NAME}, and the C++ sources for a "
                                   f"just-in-time build are not at {CSRC} (install with `pip install .`)")
    # just in time, CUDA sources are compiled only where they can run: on a machine without a GPU
    # they would cost tens of minutes for kernels nobody can call (the AOT build compiles them)
    with_cuda = cuda_why_not() is None and (torch.cuda.is_available() or _flag(ENV_FORCE_CUDA))
    arch_list = cuda_arch_list(jit=True) if with_cuda else None
    flags = build_flags(with_cuda, "jit", arch_list)
    sources = cpu_sources() + (cuda_sources() if with_cuda else [])
    build_dir = _jit_build_dir(sources, flags, arch_list, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{JIT_NAME}.so"
    import fcntl

    with open(build_dir / "attnfused.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # a second process waits here, then finds the library built
        if not lib.is_file():
            what = "cpu" + (f" + cuda {arch_names(arch_list)}" if with_cuda else "")
            print(f"attnfused: compiling the C++ extension ({what}) into {build_dir}, once; this takes a few "
                  f"minutes...", file=sys.stderr, flush=True)
            if with_cuda:
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            try:
                load(JIT_NAME, sources, extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
                     extra_ldflags=flags["ldflags"], extra_include_paths=flags["include_dirs"],
                     build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False,
                     verbose=_flag(ENV_VERBOSE))
            except Exception as e:  # compiler errors, missing ninja, ...
                raise ExtensionUnavailable(f"the just-in-time build of the C++ extension failed in {build_dir}: "
                                           f"{_tail(e)} (set {ENV_VERBOSE}=1 for the full log)") from e
            return str(lib)
    torch.ops.load_library(str(lib))
    return str(lib)


def _tail(e: Exception, lines: int = 12) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: " + " | ".join(text[-lines:])


def ensure_loaded() -> str:
    """Load the extension (the AOT library, else a JIT build); return its path or raise ExtensionUnavailable."""
    with _lock:
        if _state["loaded"]:
            return _state["path"]
        if _state["error"] is not None:
            raise ExtensionUnavailable(_state["error"])
        try:
            aot = None if os.environ.get(ENV_BUILD, "").strip().lower() == "jit" else _aot_library()
            if aot is not None:
                try:
                    torch.ops.load_library(aot)
                    path, build = aot, "aot"
                except OSError as e:  # e.g. built against another torch
                    raise ExtensionUnavailable(f"cannot load the ahead-of-time build {aot}: {e}") from e
            else:
                path, build = _jit_build(), "jit"
        except ExtensionUnavailable as e:
            _state["error"] = str(e)
            raise
        except Exception as e:
            _state["error"] = f"loading the C++ extension failed: {_tail(e)}"
            raise ExtensionUnavailable(_state["error"]) from e
        _state.update(loaded=True, path=path, build=build)
        return path


def _library_info() -> dict:
    """What the loaded library says about itself (compiled by csrc/ops.cpp from the build's defines)."""
    info = {}
    for item in torch.ops.attnfused_C._build_info().split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            info[k] = v
    return info


def has_cpu() -> bool:
    return unavailable_reason("cpu") is None


def has_cuda() -> bool:
    """CUDA kernels are compiled into the loaded library (a GPU may still be missing)."""
    return unavailable_reason("cuda") is None


def unavailable_reason(device_type: str) -> str | None:
    """Why the extension cannot run kernels for `device_type` ("cpu" or "cuda"), or None."""
    try:
        ensure_loaded()
    except ExtensionUnavailable as e:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"attnfused: the C++ extension is unavailable, the cpu/cuda backends are off and "
                          f"'auto' uses the other backends: {e}", RuntimeWarning, stacklevel=3)
        return str(e)
    info = _library_info()
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if info.get("cuda") != "1":
            return f"the C++ extension ({_state['build']} build, {_state['path']}) was compiled without CUDA"
        return None
    return f"the C++ extension has no kernels for device type {device_type!r}"


def build_info() -> dict:
    """What was built and loaded: {cpu, cuda, cuda_archs, cpu_arch, torch, cuda_version, build, path, error,
    cuda_kernels}; cuda_kernels is "next" when $ATTNFUSED_CUDA_KERNELS=next selects the new CUDA
    kernels (not yet validated on a GPU; $ATTNFUSED_CUDA_DEBUG=1 prints each call's tiling plan),
    else "validated".

    May trigger the just-in-time build."""
    out = {"cpu": False, "cuda": False, "cuda_archs": [], "cpu_arch": None, "torch": torch.__version__,
           "cuda_version": torch.version.cuda, "build": None, "path": None, "error": None,
           "cuda_kernels": cuda_kernels()}
    try:
        ensure_loaded()
    except ExtensionUnavailable as e:
        out["error"] = str(e)
        return out
    info = _library_info()
    archs = [a for a in info.get("cuda_archs", "").split("-") if a]
    out.update(cpu=info.get("cpu") == "1", cuda=info.get("cuda") == "1", cuda_archs=archs,
               cpu_arch=info.get("cpu_arch"), build=_state["build"], path=_state["path"])
    return out


def cuda_kernels() -> str:
    """Which CUDA kernels the ops run: "next" (the new path, where it covers the inputs) when
    $ATTNFUSED_CUDA_KERNELS=next, else "validated" (the C++ side reads the variable at every call)."""
    return "next" if os.environ.get("ATTNFUSED_CUDA_KERNELS", "") == "next" else "validated"


def _cuda_splits(op: str) -> bool:
    # the new path's channel attention backward computes "split" (where it does not cover the
    # inputs it says so, and attnfused.ops runs the reference backend's)
    return op == "channel_attention_backward" and cuda_kernels() == "next"


def register_ops(backend: str) -> None:
    """Register `torch.ops.attnfused_C.<op>` as `backend`'s kernel for every op (the cpu and cuda
    backends differ only in the dispatch key the extension registered, and in availability). The
    compiled tie ops take the tie rule (last); the CPU kernels compute "split" themselves, the CUDA
    kernels on the new path for channel attention; elsewhere a "split" backward on cuda runs the
    reference backend's."""
    from . import OPS, declare_ties, register

    declare_ties(backend, split=True if backend == "cpu" else _cuda_splits)

    def kernel(op: str):
        def run(*args):
            ensure_loaded()
            return getattr(torch.ops.attnfused_C, op)(*args)

        run.__name__ = f"{op}_{backend}"
        return run

    for op in OPS:
        register(backend, op)(kernel(op))
