"""CBAM fused: channel attention, then spatial attention on x1 = x * s, with x1 never
stored. Forward: channel pooling of x, spatial pooling of x * s, one pass y = x * s * t
(3R + 1W), with the tail (+ residual, relu) in that pass. Backward: three passes over (dy, x) and
one write of dx; dx1 is recomputed in each pass instead of stored. Under the tie rule "split" the first two passes also count the
ties of the maxima (of x1 over C, of x over H*W) and the dx pass reads x too (4R + 1W).
"""
from __future__ import annotations

import torch

from ._common import device_guard, is_split
from .channel import channel_gate, channel_pool, channel_small_backward, weight_grads
from .reduce import apply, prologue, reduce, tail
from .spatial import spatial_gate, spatial_small_backward


def cbam_forward(x, w1, b1, w2, b2, sweight, sbias, kind, pool, act, gate, padding, maps, sgate, tie="first",
                 residual=None, activation="none", in_scale=None, in_shift=None):
    is_split(tie)  # checked; the forward is the same under both rules
    x = prologue(x, in_scale, in_shift)
    out_tail = tail(x, residual, activation)
    with device_guard(x):
        N, C, H, W = x.shape
        pooled, argmax = channel_pool(x, pool)
        smaps = torch.empty((N, 2, H, W), dtype=torch.float32, device=x.device)
        sargmax = torch.empty((N, H, W), dtype=torch.int64, device=x.device)
        y = torch.empty_like(x)
        s, hidden = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if N:
            flat = smaps.view(N, 2, H * W)
            reduce(x, False, s=s, pooled_out=(flat[:, 1], flat[:, 0], sargmax.view(N, H * W)))
            apply(x, y, s=s, t=spatial_gate(smaps, sweight, sbias, maps, sgate), **out_tail)
        return y, pooled, argmax, smaps, sargmax, hidden  # the backward recomputes hidden


def cbam_backward(grad_y, x, pooled, argmax, smaps, sargmax, _hidden, w1, b1, w2, b2, sweight, sbias, kind, pool,
                  act, gate, padding, maps, sgate, tie="first"):
    # "split": the first pass (sum_c dy * x1) counts the channels where x1 = x * s (the product the
    # forward's max saw, rounded alike) equals each pixel's max; the second (sum_p dx1 * x) the pixels
    # where x equals each (n, c)'s max (pool not "avg"), and its dx1 splits the spatial max's
    # gradient; the dx pass splits both
    split = is_split(tie)
    ch_split = split and pool != "avg"
    with device_guard(x):
        N, C, H, W = x.shape
        dx = torch.empty_like(x)
        pooled, smaps = pooled.float().contiguous(), smaps.float().contiguous()
        argmax, sargmax = argmax.contiguous(), sargmax.contiguous().view(N, H * W)
        flat = smaps.view(N, 2, H * W)
        scnt = ccnt = None
        if N:
            s, _ = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
            t = spatial_gate(smaps, sweight, sbias, maps, sgate)
            # spatial attention's backward at x1 = x * s: needs sum_c(dy * x1)
            if split:
                sdot, scnt = reduce(x, False, dy=grad_y, s=s, count_max=flat[:, 0])
            else:
                sdot = reduce(x, False, dy=grad_y, s=s)
        else:
            sdot = pooled.new_empty((0, H * W))
        gmap, dsw, dsb = spatial_small_backward(sdot, smaps, sweight, sbias, maps, sgate)
        if N:
            # channel attention's backward with dx1 (recomputed from dy) as its output gradient
            cdot = reduce(x, True, dy=grad_y, sp_grad=(t, gmap, sargmax), sp_split=(flat, scnt, s) if split else None,
                          count_max=pooled[:, 1] if ch_split else None)
            if ch_split:
                cdot, ccnt = cdot
        else:
            cdot = pooled.new_empty((0, C))
        dpooled, grads = channel_small_backward(cdot, pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if N:
            apply(x, dx, dy=grad_y, s=s, t=t, ch_grad=(dpooled, argmax), sp_grad=(gmap, sargmax), bwd=True,
                  ch_split=(pooled, ccnt) if ch_split else None, sp_split=(flat, scnt) if split else None)
        return (dx, *weight_grads((w1, b1, w2, b2, sweight, sbias), (*grads, dsw, dsb)))
