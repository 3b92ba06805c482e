"""Shared test helpers: tolerances (SPEC §4, the one place they live), inputs, layouts, errors."""
from __future__ import annotations

import math
import os

import torch

import attnfused

# ||out - ref|| / ||ref|| against the float64 reference (SPEC §4)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# gradients, keyed by the gradient's own dtype (weights stay float32 under half inputs):
# weight gradients are sums over N*H*W products whose cancellation (a conv bias's
# gradient can sum to near zero) magnifies float32 rounding in the relative error
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}

LAYOUTS = ("nchw", "channels_last", "strided")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in a memory layout: NCHW, channels_last, or a strided view (every 2nd column)."""
    if kind == "nchw":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        N, C, H, W = x.shape
        wide = torch.empty(N, C, H, 2 * W, dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(kind)


def rand(*shape, dtype=torch.float64, device="cpu", scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def rand_distinct(*shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Random values, pairwise distinct once rounded to `dtype`: no ties in any max, so the
    gradient of a max has one right answer (float16/bfloat16 round many normals together).

    Drawn without replacement from the values `dtype` represents in +-[1/16, 4]; returned
    in float64.
    """
    n = math.prod(shape)
    if dtype in (torch.float32, torch.float64):
        return rand(*shape, device=device)
    bits = torch.arange(2 ** 15, dtype=torch.int32).to(torch.int16)
    pos = bits.view(dtype).double()
    pos = pos[(pos >= 1 / 16) & (pos <= 4)]
    pool = torch.cat((pos, -pos))
    if n > pool.numel():
        raise ValueError(f"{n} distinct {dtype} values asked, {pool.numel()} available")
    return pool[torch.randperm(pool.numel())[:n]].view(*shape).to(device)


def cpu_backends(dtype: torch.dtype | None = None) -> list[str]:
    """Backends this process can run on CPU tensors (triton only under TRITON_INTERPRET=1)."""
    return attnfused.available_backends("cpu", dtype)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
