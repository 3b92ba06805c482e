"""Shared test helpers: inputs, layouts, backends; the tolerances come from attnfused.accuracy."""
from __future__ import annotations

import contextlib
import math
import os

import torch

import attnfused
from attnfused.accuracy import GRAD_TOLERANCE, TOLERANCE, rel_err  # noqa: F401 (re-exported)

LAYOUTS = ("nchw", "channels_last", "strided")


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


def autocast_for(dtype: torch.dtype, device="cpu"):
    """The context for half-precision x with float32 weights: torch.autocast (torch's layers and the
    fused ops take mixed dtypes only there); no context for float32 and float64."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def cpu_backends(dtype: torch.dtype | None = None) -> list[str]:
    """Backends this process can run on CPU tensors (triton only under TRITON_INTERPRET=1)."""
    return attnfused.available_backends("cpu", dtype)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
