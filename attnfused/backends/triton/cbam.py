"""CBAM fused: channel attention, then spatial attention on x1 = x * s, with x1 never
stored. Forward: channel pooling of x, spatial pooling of x * s, one pass y = x * s * t
(3R + 1W). Backward: three passes over (dy, x) and one write of dx; dx1 is recomputed
in each pass instead of stored.
"""
from __future__ import annotations

import torch

from ._common import device_guard
from .channel import channel_gate, channel_pool, channel_small_backward, weight_grads
from .reduce import apply, reduce
from .spatial import spatial_gate, spatial_small_backward


def cbam_forward(x, w1, b1, w2, b2, sweight, sbias, kind, pool, act, gate, padding, maps, sgate):
    with device_guard(x):
        N, C, H, W = x.shape
        pooled, argmax = channel_pool(x, pool)
        smaps = torch.empty((N, 2, H, W), dtype=torch.float32, device=x.device)
        sargmax = torch.empty((N, H, W), dtype=torch.int64, device=x.device)
        y = torch.empty_like(x)
        if N:
            s = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
            flat = smaps.view(N, 2, H * W)
            reduce(x, False, s=s, pooled_out=(flat[:, 1], flat[:, 0], sargmax.view(N, H * W)))
            apply(x, y, s=s, t=spatial_gate(smaps, sweight, sbias, maps, sgate))
        return y, pooled, argmax, smaps, sargmax, pooled.new_empty(0)  # hidden: recomputed in backward


def cbam_backward(grad_y, x, pooled, argmax, smaps, sargmax, _hidden, w1, b1, w2, b2, sweight, sbias, kind, pool,
                  act, gate, padding, maps, sgate):
    with device_guard(x):
        N, C, H, W = x.shape
        dx = torch.empty_like(x)
        pooled, smaps = pooled.float().contiguous(), smaps.float().contiguous()
        argmax, sargmax = argmax.contiguous(), sargmax.contiguous().view(N, H * W)
        if N:
            s = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
            t = spatial_gate(smaps, sweight, sbias, maps, sgate)
            # spatial attention's backward at x1 = x * s: needs sum_c(dy * x1)
            sdot = reduce(x, False, dy=grad_y, s=s)
        else:
            sdot = pooled.new_empty((0, H * W))
        gmap, dsw, dsb = spatial_small_backward(sdot, smaps, sweight, sbias, maps, sgate)
        if N:
            # channel attention's backward with dx1 (recomputed from dy) as its output gradient
            cdot = reduce(x, True, dy=grad_y, sp_grad=(t, gmap, sargmax))
        else:
            cdot = pooled.new_empty((0, C))
        dpooled, grads = channel_small_backward(cdot, pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if N:
            apply(x, dx, dy=grad_y, s=s, t=t, ch_grad=(dpooled, argmax), sp_grad=(gmap, sargmax), bwd=True)
        return (dx, *weight_grads((w1, b1, w2, b2, sweight, sbias), (*grads, dsw, dsb)))
