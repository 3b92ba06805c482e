"""Where a run happens: device name, library versions, commit, date, threads."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# the paths whose changes make a result's commit "dirty" (the tree is shared, other files may change)
_CODE_PATHS = ("attnfused", "csrc", "bench", "setup.py", "pyproject.toml")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_all_cores() -> int:
    n = cpu_count()
    torch.set_num_threads(n)
    return n


def prepare_cpu() -> None:
    """The CPU conditions every benchmark runs under: all cores this process may use, freed memory kept."""
    use_all_cores()
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (no trimming of
    the heap, no mmap for big blocks), for every provider alike. Otherwise a fresh output of a
    large tensor can land on pages the OS must fault in and zero again on every call, depending
    on the heap's history: ECA's forward at 8x256x56x56 took 1250-2500 page faults per call in
    one process of three and ran 2x slower there, its kernels unchanged. True where it applied."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):  # not glibc
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "cpu"


@lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """A folder-safe name, e.g. `cpu-AMD-EPYC-2c` or `NVIDIA-H100-80GB-HBM3`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        raw = torch.cuda.get_device_name(dev)
    else:
        raw = f"cpu-{_cpu_model()}-{cpu_count()}c"
    raw = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b|@.*?GHz", "", raw)
    return re.sub(r"[^A-Za-z0-9.]+", "-", raw).strip("-")


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # not installed, or broken on this platform
        return "none"


@lru_cache(maxsize=None)
def commit() -> str:
    """Short commit of HEAD, `-dirty` when the code paths have uncommitted changes;
    $ATTNFUSED_COMMIT where the tree travels without .git (the GPU machines)."""
    if os.environ.get("ATTNFUSED_COMMIT"):
        return os.environ["ATTNFUSED_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *_CODE_PATHS],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_facts(device: torch.device, command: str, wall_s: float) -> dict:
    """What a results folder's README says of a run beyond `meta`: the command, its wall time,
    threads and load (written to `<name>.json` by report.write_run_meta)."""
    return {"command": command, "wall_s": round(wall_s, 1), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_end": round(os.getloadavg()[0], 2),
            "device_long": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                            f"{_cpu_model()}, {cpu_count()} cores")}


def meta(device: str) -> dict:
    """The leading CSV columns every row carries."""
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
            "commit": commit(), "date": now()}
