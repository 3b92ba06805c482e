"""The `triton` backend: Triton kernels for every op, forward and backward.

Runs on CUDA tensors (float32, float16, bfloat16), and on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is imported; float32 and float16: the
interpreter has no bfloat16), which is how the CPU-only CI tests these kernels.

Layout: _common (option codes, scalar math, configs), reduce (the passes over x: pooling and
backward dot products with fixed-order split reductions, and the elementwise scale and
input-gradient pass), channel (MLP as small matmuls over blocks of samples, 1D conv),
spatial (k x k conv), cbam (the fused block). Every reduction is deterministic: partials per
program, combined in a fixed order by a second small kernel; no atomics. Every float32 sum over
a long axis is blocked (no level adds more than 16 terms of like size; reduce.py): no long
running sum, whose error would grow with H*W, C or N.

The max's tie rule (attnfused.ops): every kernel of an op that takes a max takes `tie` last.
"first" sends the max's gradient to the saved index; "split" divides it among all elements
equal to the max, as torch's amax: the backward pass that already reduces dy * x (or dy * x1,
x1 = x * s in CBAM, the product rounded as the forward's max saw it) also counts each max's
ties, and the dx pass adds (v == max) * (dmax / count) (a NaN max: count 0, NaN along it).

Tests: `TRITON_INTERPRET=1 python -m pytest tests/triton -q` (CPU), the same without the
variable on a GPU; `python -m tests.triton.compile_sm90` compiles every kernel variant for
sm_90 without a GPU.
"""
from __future__ import annotations

import os

import torch

from .. import declare_ties, register

NAME = "triton"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = e


def unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if dtype is not None and dtype not in _DTYPES:
        return f"the Triton kernels take float32, float16 and bfloat16, not {dtype}"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1, set before import)"
        if dtype == torch.bfloat16:
            return "the Triton interpreter does not support bfloat16"
        return None
    return f"Triton kernels do not run on {device.type} tensors"


if _IMPORT_ERROR is None:
    from . import cbam as _cbam, channel as _channel, spatial as _spatial

    declare_ties(NAME, split=True)  # "split" backwards count the maxima's ties in a pass over x

    for _op, _fn in {
        "channel_attention": _channel.channel_attention_forward,
        "channel_attention_backward": _channel.channel_attention_backward,
        "spatial_attention": _spatial.spatial_attention_forward,
        "spatial_attention_backward": _spatial.spatial_attention_backward,
        "cbam": _cbam.cbam_forward,
        "cbam_backward": _cbam.cbam_backward,
        "spatial_pool": _spatial.spatial_pool,
        "spatial_pool_backward": _spatial.spatial_pool_backward,
        "spatial_scale": _spatial.spatial_scale_forward,
        "spatial_scale_backward": _spatial.spatial_scale_backward,
    }.items():
        register(NAME, _op)(_fn)
