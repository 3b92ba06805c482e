"""The `cpu` backend: the C++ kernels of the compiled extension (csrc/cpu/), one per op.

Each kernel calls `torch.ops.attnfused_C.<op>` (same arguments as the public op, less `backend`).
The extension is loaded, or built just in time, on first use (attnfused/backends/extension.py).
"""
from __future__ import annotations

import torch

from . import extension

NAME = "cpu"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a {torch.device(device).type} device"
    if dtype is not None and dtype not in DTYPES:
        return f"the cpu backend supports {[str(d) for d in DTYPES]}, got {dtype}"
    return extension.unavailable_reason("cpu")


extension.register_ops(NAME)
