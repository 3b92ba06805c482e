"""The seven benchmarked blocks: which class, built with which arguments from the channels.

One table serves both namespaces (`attnfused.reference` and the fused `attnfused`), so the
eager and the fused module of a case have the same structure and load the same state_dict.
"""
from __future__ import annotations

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
