"""The seven benchmarked blocks: which class, built with which arguments from the channels.

One table serves both namespaces (`attnfused.reference` and the fused `attnfused`), so the
eager and the fused module of a case have the same structure and load the same state_dict.
"""
from __future__ import annotations

import torch
import torch.nn as nn

RATIO = 16  # the papers' MLP reduction
SPATIAL_K = 7  # CBAM's spatial kernel


def ratio(channels: int) -> int:
    return min(RATIO, channels)  # keeps channels // ratio >= 1 for narrow layers


BLOCKS = {
    "se": ("SEBlock", lambda c: ("avg", c, ratio(c))),
    "eca": ("ECABlock", lambda c: (c,)),
    "channel_fc": ("ChannelAttentionFC", lambda c: (c, ratio(c))),
    "channel_conv": ("ChannelAttentionConv", lambda c: (c,)),
    "spatial": ("SpatialAttention", lambda c: (SPATIAL_K,)),
    "cbam_fc": ("CBAMBlock", lambda c: ("FC", SPATIAL_K, c, ratio(c))),
    "cbam_conv": ("CBAMBlock", lambda c: ("Conv", SPATIAL_K, c, None, 2, 1)),
}


def make(block: str, channels: int, backend: str | None = None) -> nn.Module:
    """The reference module (backend None) or the fused one on `backend`."""
    import attnfused

    if block not in BLOCKS:
        raise ValueError(f"block must be one of {list(BLOCKS)}, got {block!r}")
    cls_name, args = BLOCKS[block]
    if backend is None:
        return getattr(attnfused.reference, cls_name)(*args(channels))
    return getattr(attnfused, cls_name)(*args(channels), backend=backend)


def mode_calls(run, module: nn.Module, shape, dtype, device, layout: str) -> dict:
    """{"fwd": inference, "train": forward plus the gradients of x and every parameter} of `run`
    (`module`, or a compiled form of it) on a fresh input of `shape` in `layout` ("cl" or "nchw")."""
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    leaves = [x.requires_grad_(), *module.parameters()]

    def forward():
        with torch.no_grad():
            run(x)

    def train():  # autograd.grad: no accumulation into .grad, so no extra add kernels
        torch.autograd.grad(run(x), leaves, dy)

    return {"fwd": forward, "train": train}
