"""The `cuda` backend: the CUDA kernels of the compiled extension (csrc/cuda/), one per op.

Each kernel calls `torch.ops.attnfused_C.<op>` (same arguments as the public op, less `backend`);
the extension registers them for the CUDA dispatch key. The extension is loaded, or built just in
time, on first use (attnfused/backends/extension.py); asking whether this backend can run never
starts a build on a machine without a GPU.
"""
from __future__ import annotations

import torch

from . import extension

NAME = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a {device.type} device"
    if dtype is not None and dtype not in DTYPES:
        return f"the cuda backend supports {[str(d) for d in DTYPES]}, got {dtype}"
    if not torch.cuda.is_available():
        return "torch.cuda is not available (no GPU or no CUDA build of torch)"
    return extension.unavailable_reason("cuda")


extension.register_ops(NAME)
