"""The `triton` backend: Triton kernels (not written yet)."""
from __future__ import annotations

import torch

NAME = "triton"


def unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    return "the Triton kernels are not part of this build yet"
