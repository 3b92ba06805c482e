"""Per-kernel GPU times of one forward and one training step of the fused blocks (torch.profiler).

    python -m bench.profile_kernels                      # cbam_fc, stages 1 and 4, fp16, batch 128
    python -m bench.profile_kernels --blocks se,cbam_fc --shapes 128x512x28x28 --backends cuda

Prints, per (block, backend, mode, shape, layout), the GPU time per call summed over its kernels
and the largest kernels with their share, then the host's time to issue a call and the wall time
per call with the queue kept full: where issuing takes longer than the GPU's work, the host bounds
the step (launch overhead, not kernels). The benchmark (`python -m bench`) gives the end-to-end
figures; this says which pass they go to. GPU only.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .blocks import BLOCKS, make, mode_calls
from .shapes import parse_shapes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kernel_times(fn, calls: int) -> list[tuple[str, float, int]]:
    """(kernel name, us per call, launches per call) of `fn`, largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls, e.count / calls) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def host_times(fn, calls: int) -> tuple[float, float]:
    """(us per call to issue `fn` on the host, us per call until the GPU has run them all), over
    `calls` back-to-back calls."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return 1e6 * (t1 - t0) / calls, 1e6 * (t2 - t0) / calls


def profile_case(block: str, backend: str, shape, dtype, layout: str, calls: int, top: int) -> None:
    module = make(block, shape[1], backend).to("cuda", dtype)
    for mode, fn in mode_calls(module, module, shape, dtype, "cuda", layout).items():
        for _ in range(3):  # warm-up: extension load, Triton compilation, allocator
            fn()
        torch.cuda.synchronize()
        rows = kernel_times(fn, calls)
        total = sum(r[1] for r in rows)
        print(f"== {block} {backend} {mode} {'x'.join(map(str, shape))} {layout}: {total:.1f} us per call on the GPU")
        for name, us, n in rows[:top]:
            print(f"   {us:8.1f} us {100 * us / total:4.0f}%  x{n:<4g} {name[:120]}")
        issue, wall = host_times(fn, max(calls, 50))
        print(f"   host: {issue:.0f} us per call to issue, {wall:.0f} us per call back to back"
              f"{' (host-bound)' if issue > total else ''}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="cbam_fc", help=f"comma list of {list(BLOCKS)}")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--shapes", default="256x56x56,2048x7x7", help="CxHxW / NxCxHxW / presets, as for bench")
    ap.add_argument("--batch", default="128")
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--layouts", default="cl,nchw")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_kernels needs a CUDA GPU")
    torch.manual_seed(0)
    shapes = parse_shapes(a.shapes.split(","), [int(b) for b in a.batch.split(",")])
    for shape in shapes:
        for layout in a.layouts.split(","):
            for block in a.blocks.split(","):
                for backend in a.backends.split(","):
                    profile_case(block, backend, shape, DTYPES[a.dtype], layout, a.calls, a.top)


if __name__ == "__main__":
    main()
