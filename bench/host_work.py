"""The host's work behind one call of each fused block: kernel launches, copies and fills,
allocations, ATen ops dispatched, and synchronisations with the device.

    python -m bench.host_work                              # GPU: every block; cuda, cuda/next, triton
    python -m bench.host_work --backends triton,triton+compile --blocks se,cbam_fc
    python -m bench.host_work --device cpu                 # CPU: the ATen ops each call dispatches

Per (block, backend, mode), for one call after warm-up:
  kernels  kernel launches on the device (torch.profiler)
  copies   memcpy and memset operations on the device (a fill or a copy a kernel could do)
  aten     ATen ops the host dispatched (outermost only; each is dispatcher and allocator work)
  allocs   blocks taken from the caching allocator (memory_stats delta; CUDA only)
  sync     "none" when the calls ran under torch.cuda.set_sync_debug_mode("error"), else the error
The time these cost is `python -m bench`'s host_ms column and the last line of
`bench.profile_kernels`; these are the counts behind it. Backend `cuda/next` is the CUDA backend
with $ATTNFUSED_CUDA_KERNELS=next; `<backend>+compile` the block under torch.compile.
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .blocks import BLOCKS, make, mode_calls
from .shapes import parse_shapes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COLUMNS = ("kernels", "copies", "aten", "allocs", "sync")


@contextlib.contextmanager
def _backend_env(spec: str):
    """The environment a backend spec asks for (`cuda/next`: the new CUDA kernels)."""
    old = os.environ.get("ATTNFUSED_CUDA_KERNELS")
    if spec.split("+")[0].endswith("/next"):
        os.environ["ATTNFUSED_CUDA_KERNELS"] = "next"
    else:
        os.environ.pop("ATTNFUSED_CUDA_KERNELS", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNFUSED_CUDA_KERNELS", None)
        else:
            os.environ["ATTNFUSED_CUDA_KERNELS"] = old


def _outermost_aten(event) -> bool:
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def counts(fn, device: torch.device) -> dict:
    """COLUMNS for one call of `fn` (warmed up already)."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum(1 for e in device_events if e.name.startswith(("Memcpy", "Memset")))
    out = {"kernels": len(device_events) - copies if cuda else "-", "copies": copies if cuda else "-",
           "aten": sum(1 for e in prof.events() if e.device_type == DeviceType.CPU and _outermost_aten(e))}
    if cuda:
        before = torch.cuda.memory_stats(device).get("allocation.all.allocated", 0)
        fn()
        out["allocs"] = torch.cuda.memory_stats(device).get("allocation.all.allocated", 0) - before
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            out["sync"] = "none"
        except RuntimeError as e:
            out["sync"] = str(e).splitlines()[0][:60]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        out["allocs"], out["sync"] = "-", "-"
    return out


def case_rows(block: str, spec: str, shape, dtype, device: torch.device, layout: str):
    """One row per mode (fwd: inference; train: forward and every gradient) of `block` on `spec`."""
    backend, _, compiled = spec.partition("+")
    with _backend_env(spec):
        module = make(block, shape[1], backend.split("/")[0]).to(device, dtype)
        run = torch.compile(module, fullgraph=True) if compiled else module
        for mode, fn in mode_calls(run, module, shape, dtype, device, layout).items():
            for _ in range(3):  # warm-up: extension load, Triton compilation, allocator
                fn()
            yield {"block": block, "backend": spec, "mode": mode, **counts(fn, device)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.host_work", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    ap.add_argument("--blocks", default="se,eca,spatial,cbam_fc", help=f"comma list of {list(BLOCKS)}")
    ap.add_argument("--backends", default=None,
                    help="comma list of backends, <backend>/next (CUDA: the new kernels), <backend>+compile "
                         "(default: cuda,cuda/next,triton on a GPU; cpu,reference on CPU)")
    ap.add_argument("--shape", default=None, help="NxCxHxW (default 32x256x28x28 on a GPU, 2x64x8x8 on CPU)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp16 on a GPU, fp32 on CPU")
    ap.add_argument("--layout", default="cl", choices=["cl", "nchw"])
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    backends = a.backends or ("cuda,cuda/next,triton" if cuda else "cpu,reference")
    (shape,) = parse_shapes([a.shape or ("32x256x28x28" if cuda else "2x64x8x8")], [1])
    dtype = DTYPES[a.dtype or ("fp16" if cuda else "fp32")]
    torch.manual_seed(0)
    print(f"host work per call: {'x'.join(map(str, shape))} {dtype} {a.layout} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, torch {torch.__version__}")
    head = f"{'block':9s} {'backend':16s} {'mode':5s} " + " ".join(f"{c:>7s}" for c in COLUMNS[:-1]) + "  sync"
    print(head)
    for block in a.blocks.split(","):
        for spec in backends.split(","):
            for r in case_rows(block, spec, shape, dtype, device, a.layout):
                print(f"{r['block']:9s} {r['backend']:16s} {r['mode']:5s} "
                      + " ".join(f"{r[c]!s:>7s}" for c in COLUMNS[:-1]) + f"  {r['sync']}")


if __name__ == "__main__":
    main()
