"""Channel attention: y = x * gate(f(pool(x)))[n, c], f the small MLP or the 1D conv along
channels, forward and backward. Forward: one pooling pass and one scaling pass over x
(2R + 1W); the small f runs in per-sample kernels on the pooled (N, 2, C) vectors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACTS, GATES, INTERPRET, PADDINGS, POOLS, act_fn, act_grad_fn, code, device_guard,
                      gate_fn, gate_grad_fn)
from .reduce import apply, reduce, sum_over_batch


# ----------------------------------------------------------------------------- small kernels

@triton.jit
def _load_vecs(pooled_ptr, n, C, c, ok, POOL: tl.constexpr):
    """The vectors f sees at channels c: (va, vb); vb only for avg+max (f(avg) + f(max))."""
    avg = tl.load(pooled_ptr + n * 2 * C + c, mask=ok, other=0.0)
    mx = tl.load(pooled_ptr + n * 2 * C + C + c, mask=ok, other=0.0)
    if POOL == 0:
        va = avg
    elif POOL == 1:
        va = mx
    elif POOL == 2:
        va = avg
    else:
        va = 0.5 * avg + 0.5 * mx
    return va, mx


@triton.jit
def _mlp_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, CR, POOL: tl.constexpr, HAS_B1: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Pre-activations w1 @ v + b1 of the hidden layer for va (and vb), kept in registers."""
    r = tl.arange(0, BLOCK_R)
    r_ok = r < CR
    hpa = tl.zeros([BLOCK_R], dtype=tl.float32)
    hpb = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        va, vb = _load_vecs(pooled_ptr, n, C, c, c_ok, POOL)
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        hpa += tl.sum(w1 * va[None, :], axis=1)
        if POOL == 2:
            hpb += tl.sum(w1 * vb[None, :], axis=1)
    if HAS_B1:
        b1 = tl.load(b1_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
        hpa += b1
        hpb += b1
    # padding rows are 0 * v, NaN where v is infinite: zero them
    return tl.where(r_ok, hpa, 0.0), tl.where(r_ok, hpb, 0.0)


@triton.jit
def _mlp_logits(w2_ptr, b2_ptr, ha, hb, c, c_ok, CR, POOL: tl.constexpr, HAS_B2: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """Logits at channels c: w2 @ ha + b2 (+ w2 @ hb + b2 for avg+max), and the w2 tile."""
    r = tl.arange(0, BLOCK_R)
    w2 = tl.load(w2_ptr + c[:, None] * CR + r[None, :], mask=c_ok[:, None] & (r < CR)[None, :],
                 other=0.0).to(tl.float32)
    z = tl.sum(w2 * ha[None, :], axis=1)
    if HAS_B2:
        b2 = tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        z += b2
    if POOL == 2:
        zb = tl.sum(w2 * hb[None, :], axis=1)
        if HAS_B2:
            zb += b2
        z += zb
    return z, w2


@triton.jit
def _channel_mlp_fwd_kernel(pooled_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr, C, CR,
                            POOL: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr,
                            HAS_B2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One sample per program: s = gate(f(pooled))."""
    n = tl.program_id(0).to(tl.int64)
    hpa, hpb = _mlp_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, CR, POOL, HAS_B1, BLOCK_C, BLOCK_R)
    ha = act_fn(hpa, ACT)
    hb = act_fn(hpb, ACT)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        z, _ = _mlp_logits(w2_ptr, b2_ptr, ha, hb, c, c_ok, CR, POOL, HAS_B2, BLOCK_R)
        tl.store(s_ptr + n * C + c, gate_fn(z, GATE), mask=c_ok)


@triton.jit
def _store_dpooled(dpooled_ptr, n, C, c, ok, dva, dvb, POOL: tl.constexpr):
    """Gradients of (avg, max) from those of the vectors f saw."""
    if POOL == 0:
        davg = dva
        dmax = tl.zeros_like(dva)
    elif POOL == 1:
        davg = tl.zeros_like(dva)
        dmax = dva
    elif POOL == 2:
        davg = dva
        dmax = dvb
    else:
        davg = 0.5 * dva
        dmax = 0.5 * dva
    tl.store(dpooled_ptr + n * 2 * C + c, davg, mask=ok)
    tl.store(dpooled_ptr + n * 2 * C + C + c, dmax, mask=ok)


@triton.jit
def _channel_mlp_bwd_kernel(pooled_ptr, dot_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                            dlog_ptr, h_ptr, dhp_ptr, vecs_ptr, dpooled_ptr, C, CR, NV,
                            POOL: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr,
                            HAS_B2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One sample per program: back through gate and MLP from dot = sum_p(dy * x).
    Writes dlogits, the hidden activations, their gradients and the input vectors (for the
    weight gradients, summed over samples in a fixed order by _outer_sum_kernel) and dpooled."""
    n = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < CR
    hpa, hpb = _mlp_hidden(pooled_ptr, w1_ptr, b1_ptr, n, C, CR, POOL, HAS_B1, BLOCK_C, BLOCK_R)
    ha = act_fn(hpa, ACT)
    hb = act_fn(hpb, ACT)
    dh = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        z, w2 = _mlp_logits(w2_ptr, b2_ptr, ha, hb, c, c_ok, CR, POOL, HAS_B2, BLOCK_R)
        d = tl.load(dot_ptr + n * C + c, mask=c_ok, other=0.0) * gate_grad_fn(z, GATE)
        d = tl.where(c_ok, d, 0.0)
        tl.store(dlog_ptr + n * C + c, d, mask=c_ok)
        dh += tl.sum(w2 * d[:, None], axis=0)
    dhpa = tl.where(r_ok, dh * act_grad_fn(hpa, ACT), 0.0)
    dhpb = tl.where(r_ok, dh * act_grad_fn(hpb, ACT), 0.0)
    tl.store(h_ptr + n * NV * CR + r, ha, mask=r_ok)
    tl.store(dhp_ptr + n * NV * CR + r, dhpa, mask=r_ok)
    if POOL == 2:
        tl.store(h_ptr + n * NV * CR + CR + r, hb, mask=r_ok)
        tl.store(dhp_ptr + n * NV * CR + CR + r, dhpb, mask=r_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        dva = tl.sum(w1 * dhpa[:, None], axis=0)
        dvb = tl.sum(w1 * dhpb[:, None], axis=0)
        va, vb = _load_vecs(pooled_ptr, n, C, c, c_ok, POOL)
        tl.store(vecs_ptr + n * NV * C + c, va, mask=c_ok)
        if POOL == 2:
            tl.store(vecs_ptr + n * NV * C + C + c, vb, mask=c_ok)
        _store_dpooled(dpooled_ptr, n, C, c, c_ok, dva, dvb, POOL)


@triton.jit
def _outer_sum_kernel(a_ptr, b_ptr, out_ptr, sum_ptr, N, NV, RA, RB, a_sn, a_sv, b_sn, b_sv,
                      HAS_SUM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[i, j] = sum_n sum_v a[n, v, i] * b[n, v, j] (and sum[i] = sum_n sum_v a[n, v, i]),
    a weight gradient summed over the batch in a fixed order."""
    i = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    j = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    i_ok = i < RA
    j_ok = j < RB
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_A], dtype=tl.float32)
    for n in range(0, N):
        n64 = n + tl.zeros([1], dtype=tl.int64)  # 64-bit offsets
        for v in range(0, NV):
            a = tl.load(a_ptr + n64 * a_sn + v * a_sv + i, mask=i_ok, other=0.0)
            b = tl.load(b_ptr + n64 * b_sn + v * b_sv + j, mask=j_ok, other=0.0)
            acc += a[:, None] * b[None, :]
            acc_s += a
    tl.store(out_ptr + i[:, None] * RB + j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    if HAS_SUM:
        tl.store(sum_ptr + i, acc_s, mask=i_ok & (tl.program_id(1) == 0))


@triton.jit
def _conv1d_logits(pooled_ptr, w_ptr, n, C, c, c_ok, K, POOL: tl.constexpr, CIRCULAR: tl.constexpr):
    """z[c] = sum_j w[j] * v[c + j - (K-1)/2], zero or circular padding; f(va) + f(vb)."""
    pad = (K - 1) // 2
    za = tl.zeros(c.shape, dtype=tl.float32)
    zb = tl.zeros(c.shape, dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + j).to(tl.float32)
        i = c + j - pad
        if CIRCULAR:
            i = ((i % C) + C) % C  # correct for C's and Python's sign of %
            ok = c_ok
        else:
            ok = c_ok & (i >= 0) & (i < C)
        va, vb = _load_vecs(pooled_ptr, n, C, i, ok, POOL)
        za += w * va
        zb += w * vb
    if POOL == 2:
        za += zb
    return za


@triton.jit
def _channel_conv_fwd_kernel(pooled_ptr, w_ptr, dot_ptr, out_ptr, C, K, n_cblk, BWD: tl.constexpr,
                             POOL: tl.constexpr, GATE: tl.constexpr, CIRCULAR: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """s = gate(conv1d(pooled)); with BWD, dlogits = dot * gate'(conv1d(pooled)) instead."""
    pid = tl.program_id(0)
    n = (pid // n_cblk).to(tl.int64)
    c = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    z = _conv1d_logits(pooled_ptr, w_ptr, n, C, c, c_ok, K, POOL, CIRCULAR)
    if BWD:
        out = tl.load(dot_ptr + n * C + c, mask=c_ok, other=0.0) * gate_grad_fn(z, GATE)
    else:
        out = gate_fn(z, GATE)
    tl.store(out_ptr + n * C + c, out, mask=c_ok)


@triton.jit
def _channel_conv_bwd_dv_kernel(dlog_ptr, w_ptr, dpooled_ptr, C, K, n_cblk, POOL: tl.constexpr,
                                CIRCULAR: tl.constexpr, BLOCK_C: tl.constexpr):
    """dv[c] = sum_j w[j] * dlogits[c + (K-1)/2 - j] (the conv's transpose), then dpooled."""
    pid = tl.program_id(0)
    n = (pid // n_cblk).to(tl.int64)
    c = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    pad = (K - 1) // 2
    dv = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(w_ptr + j).to(tl.float32)
        i = c + pad - j
        if CIRCULAR:
            i = ((i % C) + C) % C
            ok = c_ok
        else:
            ok = c_ok & (i >= 0) & (i < C)
        dv += w * tl.load(dlog_ptr + n * C + i, mask=ok, other=0.0)
    _store_dpooled(dpooled_ptr, n, C, c, c_ok, dv, dv, POOL)


@triton.jit
def _channel_conv_bwd_dw_kernel(pooled_ptr, dlog_ptr, part_ptr, C, K, POOL: tl.constexpr,
                                CIRCULAR: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr):
    """Per-sample partial tap gradients, all taps at once:
    part[n, j] = sum_c dlogits[n, c] * (va + vb)[n, c + j - (K-1)/2], channels in a fixed order."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_PAD)
    j_ok = j < K
    pad = (K - 1) // 2
    acc = tl.zeros([K_PAD, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        i = c[None, :] + j[:, None] - pad
        if CIRCULAR:
            i = ((i % C) + C) % C
            ok = c_ok[None, :] & j_ok[:, None]
        else:
            ok = c_ok[None, :] & j_ok[:, None] & (i >= 0) & (i < C)
        va, vb = _load_vecs(pooled_ptr, n, C, i, ok, POOL)
        if POOL == 2:
            va = va + vb
        acc += tl.load(dlog_ptr + n * C + c, mask=c_ok, other=0.0)[None, :] * va
    tl.store(part_ptr + n * K + j, tl.sum(acc, axis=1), mask=j_ok)


# ----------------------------------------------------------------------------- launchers

def _cfg_c(C: int) -> int:
    return 16 if INTERPRET else min(1024, triton.next_power_of_2(C))


def _mlp_blocks(C: int, CR: int):
    """BLOCK_R holds the whole hidden layer; BLOCK_C keeps the weight tile near 8K elements."""
    br = triton.next_power_of_2(CR)
    if INTERPRET:
        return 16, br
    return max(16, min(triton.next_power_of_2(C), 8192 // br)), br


def _contig(w):
    return None if w is None else w.contiguous()


def channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding):
    """s = gate(f(pooled)) as (N, C) float32."""
    N, _, C = pooled.shape
    s = torch.empty((N, C), dtype=torch.float32, device=pooled.device)
    if N == 0:
        return s
    POOL, GATE = code(POOLS, "pool", pool), code(GATES, "gate", gate)
    w1 = w1.contiguous()
    if kind == "mlp":
        CR = w1.shape[0]
        bc, br = _mlp_blocks(C, CR)
        b1, w2, b2 = _contig(b1), w2.contiguous(), _contig(b2)
        _channel_mlp_fwd_kernel[(N,)](pooled, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2,
                                      s, C, CR, POOL=POOL, ACT=code(ACTS, "act", act), GATE=GATE,
                                      HAS_B1=b1 is not None, HAS_B2=b2 is not None, BLOCK_C=bc, BLOCK_R=br)
    else:
        bc = _cfg_c(C)
        ncb = triton.cdiv(C, bc)
        _channel_conv_fwd_kernel[(N * ncb,)](pooled, w1, s, s, C, w1.shape[-1], ncb, BWD=False, POOL=POOL,
                                             GATE=GATE, CIRCULAR=code(PADDINGS, "padding", padding) == 1,
                                             BLOCK_C=bc)
    return s


def channel_small_backward(dot, pooled, w1, b1, w2, b2, kind, pool, act, gate, padding):
    """Back through gate and f from dot = sum_p(dy * x): (dpooled [N, 2, C] float32,
    [dw1, db1, dw2, db2] in float32, None where a weight is absent)."""
    N, _, C = pooled.shape
    dev = pooled.device
    f32 = dict(dtype=torch.float32, device=dev)
    dpooled = torch.empty((N, 2, C), **f32)
    POOL, GATE = code(POOLS, "pool", pool), code(GATES, "gate", gate)
    w1 = w1.contiguous()
    dw1 = torch.zeros(w1.shape, **f32)
    if kind == "mlp":
        CR = w1.shape[0]
        db1 = torch.zeros(CR, **f32) if b1 is not None else None
        dw2 = torch.zeros((C, CR), **f32)
        db2 = torch.zeros(C, **f32) if b2 is not None else None
        if N == 0:
            return dpooled, [dw1, db1, dw2, db2]
        NV = 2 if pool == "avg+max" else 1
        dlog = torch.empty((N, C), **f32)
        h, dhp = torch.empty((N, NV, CR), **f32), torch.empty((N, NV, CR), **f32)
        vecs = torch.empty((N, NV, C), **f32)
        bc, br = _mlp_blocks(C, CR)
        b1c, w2c, b2c = _contig(b1), w2.contiguous(), _contig(b2)
        _channel_mlp_bwd_kernel[(N,)](pooled, dot, w1, b1c if b1c is not None else w1, w2c,
                                      b2c if b2c is not None else w2c, dlog, h, dhp, vecs, dpooled, C, CR, NV,
                                      POOL=POOL, ACT=code(ACTS, "act", act), GATE=GATE, HAS_B1=b1 is not None,
                                      HAS_B2=b2 is not None, BLOCK_C=bc, BLOCK_R=br)
        outer_sum(dhp, vecs, dw1, db1)  # dw1 [CR, C], db1
        outer_sum(dlog.view(N, 1, C).expand(N, NV, C), h, dw2, db2)  # dw2 [C, CR], db2
        return dpooled, [dw1, db1, dw2, db2]
    if N == 0:
        return dpooled, [dw1, None, None, None]
    K = w1.shape[-1]
    circular = code(PADDINGS, "padding", padding) == 1
    bc = _cfg_c(C)
    ncb = triton.cdiv(C, bc)
    dlog = torch.empty((N, C), **f32)
    _channel_conv_fwd_kernel[(N * ncb,)](pooled, w1, dot, dlog, C, K, ncb, BWD=True, POOL=POOL, GATE=GATE,
                                         CIRCULAR=circular, BLOCK_C=bc)
    _channel_conv_bwd_dv_kernel[(N * ncb,)](dlog, w1, dpooled, C, K, ncb, POOL=POOL, CIRCULAR=circular,
                                            BLOCK_C=bc)
    part = torch.empty((N, K), **f32)
    kp = triton.next_power_of_2(K)
    _channel_conv_bwd_dw_kernel[(N,)](pooled, dlog, part, C, K, POOL=POOL, CIRCULAR=circular,
                                      BLOCK_C=16 if INTERPRET else max(16, min(bc, 4096 // kp)), K_PAD=kp)
    sum_over_batch(part, dw1.view(K))
    return dpooled, [dw1, None, None, None]


def outer_sum(a, b, out, out_sum=None):
    """out = sum over (n, v) of a[n, v, :, None] * b[n, v, None, :]; out_sum = sum of a."""
    N, NV, RA = a.shape
    RB = b.shape[2]
    ba, bb = (16, 16) if INTERPRET else (32, 64)
    _outer_sum_kernel[(triton.cdiv(RA, ba), triton.cdiv(RB, bb))](
        a, b, out, out if out_sum is None else out_sum, N, NV, RA, RB, a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), HAS_SUM=out_sum is not None, BLOCK_A=ba, BLOCK_B=bb)


def weight_grads(weights, grads):
    """Gradients in their weights' dtypes; an empty tensor for an absent weight."""
    ref = weights[0]
    return [ref.new_empty(0) if w is None else g.to(w.dtype) for w, g in zip(weights, grads)]


def channel_pool(x):
    """(pooled [N, 2, C] float32 = (avg, max), argmax [N, C] int64 flat h*W+w)."""
    N, C = x.shape[:2]
    pooled = torch.empty((N, 2, C), dtype=torch.float32, device=x.device)
    argmax = torch.empty((N, C), dtype=torch.int64, device=x.device)
    if N:
        reduce(x, True, pooled_out=(pooled[:, 0], pooled[:, 1], argmax))
    return pooled, argmax


def channel_attention_forward(x, w1, b1, w2, b2, kind, pool, act, gate, padding):
    with device_guard(x):
        pooled, argmax = channel_pool(x)
        y = torch.empty_like(x)
        if x.shape[0]:
            s = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
            apply(x, y, s=s)
        return y, pooled, argmax


def channel_attention_backward(grad_y, x, pooled, argmax, w1, b1, w2, b2, kind, pool, act, gate, padding):
    with device_guard(x):
        dx = torch.empty_like(x)
        pooled = pooled.float().contiguous()
        if x.shape[0]:
            dot = reduce(x, True, dy=grad_y)
            s = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        else:
            dot = pooled.new_empty((0, x.shape[1]))
        dpooled, grads = channel_small_backward(dot, pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if x.shape[0]:
            apply(x, dx, dy=grad_y, s=s, ch_grad=(dpooled, argmax.contiguous()), bwd=True)
        return (dx, *weight_grads((w1, b1, w2, b2), grads))
