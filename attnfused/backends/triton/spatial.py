"""Spatial attention: y = x * gate(conv2d(maps(x)) + bias)[n, h, w], maps built from the max
and mean over channels, forward and backward; and its two halves (spatial_pool,
spatial_scale). Forward: one pooling pass over x and one scaling pass (2R + 1W); the k x k
conv runs in a small kernel on the (N, 2, H, W) maps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (GATES, INNER_T, INTERPRET, MAPS, code, device_guard, gate_fn, gate_grad_fn, is_split,
                      launch, run_push, splits_for)
from .channel import weight_grads
from .reduce import apply, prologue, reduce, sum_over_batch, tail


@triton.jit
def _maps_at(smaps_ptr, n, P, q, ok, MAPS: tl.constexpr):
    """The conv's input channels (m0, m1) at flat positions q from the saved [max, mean] maps."""
    mx = tl.load(smaps_ptr + n * 2 * P + q, mask=ok, other=0.0)
    mean = tl.load(smaps_ptr + n * 2 * P + P + q, mask=ok, other=0.0)
    if MAPS == 0:
        m0 = mx
        m1 = mean
    elif MAPS == 1:
        m0 = mean
        m1 = mx
    else:
        m0 = 0.5 * mean + 0.5 * mx
        m1 = m0
    return m0, m1


@triton.jit
def _taps(K, KK_PAD: tl.constexpr):
    """Tap t = i*K + j of the k x k kernel: (t, i - pad, j - pad, valid)."""
    t = tl.arange(0, KK_PAD)
    pad = (K - 1) // 2
    return t, t // K - pad, t % K - pad, t < K * K


@triton.jit
def _spatial_fwd_kernel(smaps_ptr, w_ptr, b_ptr, dot_ptr, out_ptr, H, W, K, n_pblk, BWD: tl.constexpr,
                        MAPS: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                        KK_PAD: tl.constexpr):
    """t = gate(conv2d(maps) + bias) at a block of pixels of one sample (all taps at once); with
    BWD, dlogits = dot * gate'(logits) instead."""
    pid = tl.program_id(0)
    n = (pid // n_pblk).to(tl.int64)
    P = H * W
    p = (pid % n_pblk) * BLOCK + tl.arange(0, BLOCK)
    p_ok = p < P
    t, di, dj, t_ok = _taps(K, KK_PAD)
    hh = (p // W)[:, None] + di[None, :]
    ww = (p % W)[:, None] + dj[None, :]
    ok = p_ok[:, None] & t_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    m0, m1 = _maps_at(smaps_ptr, n, P, hh * W + ww, ok, MAPS)
    z = tl.sum(m0 * tl.load(w_ptr + t, mask=t_ok, other=0.0).to(tl.float32)[None, :], axis=1)
    if MAPS != 2:
        z += tl.sum(m1 * tl.load(w_ptr + K * K + t, mask=t_ok, other=0.0).to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        z += tl.load(b_ptr).to(tl.float32)
    if BWD:
        out = tl.load(dot_ptr + n * P + p, mask=p_ok, other=0.0) * gate_grad_fn(z, GATE)
    else:
        out = gate_fn(z, GATE)
    tl.store(out_ptr + n * P + p, out, mask=p_ok)


@triton.jit
def _spatial_bwd_dmaps_kernel(dlog_ptr, w_ptr, gmap_ptr, H, W, K, n_pblk, MAPS: tl.constexpr,
                              BLOCK: tl.constexpr, KK_PAD: tl.constexpr):
    """Gradients of the [max, mean] maps: the transposed k x k conv of dlogits, routed back
    through the map mode. gmap[n] = (dmax, dmean)."""
    pid = tl.program_id(0)
    n = (pid // n_pblk).to(tl.int64)
    P = H * W
    p = (pid % n_pblk) * BLOCK + tl.arange(0, BLOCK)
    p_ok = p < P
    t, di, dj, t_ok = _taps(K, KK_PAD)
    hh = (p // W)[:, None] - di[None, :]
    ww = (p % W)[:, None] - dj[None, :]
    ok = p_ok[:, None] & t_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    dl = tl.load(dlog_ptr + n * P + hh * W + ww, mask=ok, other=0.0)
    d0 = tl.sum(dl * tl.load(w_ptr + t, mask=t_ok, other=0.0).to(tl.float32)[None, :], axis=1)
    if MAPS == 2:
        dmax = 0.5 * d0
        dmean = dmax
    else:
        d1 = tl.sum(dl * tl.load(w_ptr + K * K + t, mask=t_ok, other=0.0).to(tl.float32)[None, :], axis=1)
        if MAPS == 0:
            dmax = d0
            dmean = d1
        else:
            dmax = d1
            dmean = d0
    tl.store(gmap_ptr + n * 2 * P + p, dmax, mask=p_ok)
    tl.store(gmap_ptr + n * 2 * P + P + p, dmean, mask=p_ok)


@triton.jit
def _spatial_bwd_dw_kernel(smaps_ptr, dlog_ptr, part_ptr, H, W, K, TAPS, PER, MAPS: tl.constexpr,
                           BLOCK: tl.constexpr, KK_PAD: tl.constexpr):
    """Partial weight and bias gradients of one sample over one split of PER pixels (row
    n * splits + split of part = taps of map 0, of map 1, bias): dlogits times the conv input
    under each tap, summed over the pixels in a fixed order, blocked (reduce.py): runs of INNER
    tiles, a tree across the tile's pixels, two levels of runs."""
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    P = H * W
    p_start = split * PER
    p_end = p_start + tl.minimum(PER, P - p_start)
    t, di, dj, t_ok = _taps(K, KK_PAD)
    a1 = tl.zeros([KK_PAD], dtype=tl.float32)  # the taps on map 0
    a2 = tl.zeros([KK_PAD], dtype=tl.float32)
    b1 = tl.zeros([KK_PAD], dtype=tl.float32)  # on map 1
    b2 = tl.zeros([KK_PAD], dtype=tl.float32)
    c1 = tl.zeros([1], dtype=tl.float32)  # the bias
    c2 = tl.zeros([1], dtype=tl.float32)
    i = 0
    for r0 in range(p_start, p_end, INNER_T * BLOCK):
        run0 = tl.zeros([KK_PAD, BLOCK], dtype=tl.float32)
        run1 = tl.zeros([KK_PAD, BLOCK], dtype=tl.float32)
        runb = tl.zeros([1, BLOCK], dtype=tl.float32)
        for p0 in range(r0, r0 + tl.minimum(INNER_T * BLOCK, p_end - r0), BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            p_ok = p < p_end
            dl = tl.load(dlog_ptr + n * P + p, mask=p_ok, other=0.0)
            hh = (p // W)[None, :] + di[:, None]
            ww = (p % W)[None, :] + dj[:, None]
            ok = p_ok[None, :] & t_ok[:, None] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            m0, m1 = _maps_at(smaps_ptr, n, P, hh * W + ww, ok, MAPS)
            run0 += m0 * dl[None, :]
            if MAPS != 2:
                run1 += m1 * dl[None, :]
            runb += dl[None, :]
        a1, a2 = run_push(tl.sum(run0, axis=1), i, a1, a2)
        if MAPS != 2:
            b1, b2 = run_push(tl.sum(run1, axis=1), i, b1, b2)
        c1, c2 = run_push(tl.sum(runb, axis=1), i, c1, c2)
        i += 1
    base = part_ptr + (n * tl.num_programs(1) + split) * (TAPS + 1)
    tl.store(base + t, a1 + a2, mask=t_ok)
    if MAPS != 2:
        tl.store(base + K * K + t, b1 + b2, mask=t_ok)
    tl.store(base + TAPS + tl.arange(0, 1), c1 + c2)


def _blocks(P: int, K: int):
    """(BLOCK over pixels, padded tap count)."""
    kk = triton.next_power_of_2(K * K)
    return (16 if INTERPRET else max(16, min(triton.next_power_of_2(P), 8192 // kk))), kk


def spatial_gate(smaps, weight, bias, maps, gate, dot=None):
    """t = gate(conv(maps) + bias) as (N, P) float32; or, given dot = sum_c(dy * x), dlogits."""
    N, _, H, W = smaps.shape
    P = H * W
    out = torch.empty((N, P), dtype=torch.float32, device=smaps.device)
    if N * P == 0:  # launch no empty grid
        return out
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    bp, kk = _blocks(P, weight.shape[-1])
    npb = triton.cdiv(P, bp)
    launch(_spatial_fwd_kernel)[(N * npb,)](
        smaps, weight, weight if bias is None else bias, smaps if dot is None else dot, out, H, W, weight.shape[-1],
        npb, BWD=dot is not None, MAPS=code(MAPS, "maps", maps), GATE=code(GATES, "gate", gate),
        HAS_BIAS=bias is not None, BLOCK=bp, KK_PAD=kk)
    return out


def spatial_weight_grad_parts(smaps, dlog, K: int, taps: int, maps_code: int):
    """Partial weight and bias gradients of the k x k conv, [N * splits, taps + 1] float32 (their
    sum over rows is the gradient), from the conv input smaps [N, 2, H, W] and dlogits [N, H * W]."""
    N, _, H, W = smaps.shape
    P = H * W
    kk = triton.next_power_of_2(K * K)
    bw = 16 if INTERPRET else max(16, min(triton.next_power_of_2(P), 2048 // kk))
    per = triton.cdiv(triton.cdiv(P, splits_for(P, bw)), bw) * bw
    splits = triton.cdiv(P, per)
    part = torch.empty((N * splits, taps + 1), dtype=torch.float32, device=smaps.device)
    launch(_spatial_bwd_dw_kernel)[(N, splits)](
        smaps, dlog, part, H, W, K, taps, per, MAPS=maps_code, BLOCK=bw, KK_PAD=kk)
    return part


def spatial_small_backward(dot, smaps, weight, bias, maps, gate):
    """Back through gate and conv from dot = sum_c(dy * x): (gmap [N, 2, P] = (dmax, dmean),
    dweight float32, dbias float32 or None)."""
    N, _, H, W = smaps.shape
    P = H * W
    f32 = dict(dtype=torch.float32, device=smaps.device)
    gmap = torch.empty((N, 2, P), **f32)
    taps = weight.numel()
    dw = torch.zeros(taps + 1, **f32)  # the weight taps, then the bias
    if N * P:  # else the gradients are sums over nothing (and no empty grid is launched)
        K = weight.shape[-1]
        dlog = spatial_gate(smaps, weight, bias, maps, gate, dot=dot)
        wc = weight.contiguous()
        bp, kk = _blocks(P, K)
        npb = triton.cdiv(P, bp)
        MAPS_ = code(MAPS, "maps", maps)
        launch(_spatial_bwd_dmaps_kernel)[(N * npb,)](
            dlog, wc, gmap, H, W, K, npb, MAPS=MAPS_, BLOCK=bp, KK_PAD=kk)
        sum_over_batch(spatial_weight_grad_parts(smaps, dlog, K, taps, MAPS_), dw)
    # separate tensors: the op's outputs may not alias one another
    return gmap, dw[:taps].view(weight.shape).clone(), (dw[taps:].clone() if bias is not None else None)


def spatial_pool(x, tie="first"):
    """(smaps [N, 2, H, W] float32 = (max, mean) over C, sargmax [N, H, W] int64)."""
    is_split(tie)  # checked; the forward is the same under both rules
    N, C, H, W = x.shape
    smaps = torch.empty((N, 2, H, W), dtype=torch.float32, device=x.device)
    sargmax = torch.empty((N, H, W), dtype=torch.int64, device=x.device)
    if N:
        with device_guard(x):
            flat = smaps.view(N, 2, H * W)
            reduce(x, False, pooled_out=(flat[:, 1], flat[:, 0], sargmax.view(N, H * W)))
    return smaps, sargmax


def spatial_attention_forward(x, weight, bias, maps, gate, tie="first", residual=None, activation="none",
                              in_scale=None, in_shift=None):
    is_split(tie)
    x = prologue(x, in_scale, in_shift)
    out_tail = tail(x, residual, activation)
    with device_guard(x):
        smaps, sargmax = spatial_pool(x)
        y = torch.empty_like(x)
        if x.shape[0]:
            apply(x, y, t=spatial_gate(smaps, weight, bias, maps, gate), **out_tail)
        return y, smaps, sargmax


def spatial_attention_backward(grad_y, x, smaps, sargmax, weight, bias, maps, gate, tie="first"):
    # "split": the pass that reduces dy * x over C also counts the channels equal to each pixel's max;
    # the dx pass gives each of them dmax / count
    split = is_split(tie)
    with device_guard(x):
        dx = torch.empty_like(x)
        smaps = smaps.float().contiguous()
        N, _, H, W = x.shape
        scnt = None
        if not N:
            dot = smaps.new_empty((0, 0))
        elif split:
            dot, scnt = reduce(x, False, dy=grad_y, count_max=smaps.view(N, 2, H * W)[:, 0])
        else:
            dot = reduce(x, False, dy=grad_y)
        gmap, dw, db = spatial_small_backward(dot, smaps, weight, bias, maps, gate)
        if N:
            t = spatial_gate(smaps, weight, bias, maps, gate)
            apply(x, dx, dy=grad_y, t=t, sp_grad=(gmap, sargmax.contiguous()), bwd=True,
                  sp_split=(smaps, scnt) if split else None)
        return (dx, *weight_grads((weight, bias), (dw, db)))


def spatial_pool_backward(grad_smaps, x, sargmax, tie="first"):
    # "split": no max is saved here; the maps are pooled again, and the channels equal to each pixel's
    # max counted, before the dx pass (two more reads of x than "first")
    split = is_split(tie)
    with device_guard(x):
        dx = torch.empty_like(x)
        if x.shape[0]:
            N, _, H, W = x.shape
            gmap = grad_smaps.float().contiguous().view(N, 2, H * W)
            sp_split = None
            if split:
                smaps, _ = spatial_pool(x)
                smaps = smaps.view(N, 2, H * W)
                _, scnt = reduce(x, False, dy=x, count_max=smaps[:, 0])
                sp_split = (smaps, scnt)
            apply(x, dx, sp_grad=(gmap, sargmax.contiguous()), bwd=True, sp_split=sp_split)
        return dx


def spatial_scale_forward(x, t, residual=None, activation="none"):
    out_tail = tail(x, residual, activation)
    with device_guard(x):
        y = torch.empty_like(x)
        if x.shape[0]:
            apply(x, y, t=t.float().contiguous(), **out_tail)
        return y


def spatial_scale_backward(grad_y, x, t):
    with device_guard(x):
        dx = torch.empty_like(x)
        N, _, H, W = x.shape
        if N == 0:
            return dx, torch.empty_like(t)
        apply(x, dx, dy=grad_y, t=t.float().contiguous(), bwd=True)
        dt = reduce(x, False, dy=grad_y).view(N, H, W)
        return dx, dt.to(t.dtype)
