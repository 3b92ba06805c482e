"""The `cpu` backend: C++ kernels of the compiled extension (not built yet)."""
from __future__ import annotations

import torch

NAME = "cpu"


def unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    return "the C++ extension's cpu kernels are not part of this build yet"
