"""Channel attention: y = x * gate(f(pool(x)))[n, c], f the small MLP or the 1D conv along
channels, forward and backward. Forward: one pooling pass and one scaling pass over x
(2R + 1W); the small f runs in small kernels on the pooled (N, 2, C) vectors: the MLP as
matmuls over blocks of 16 samples (each weight tile read once per block), the 1D conv per
sample and channel block. Weight gradients are summed over the batch in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._options import pool_inputs
from ._common import (ACTS, GATES, INNER_T, INTERPRET, PADDINGS, POOLS, act_fn, act_grad_fn, code, device_guard,
                      gate_fn, gate_grad_fn, is_split, launch, programs_wanted, run_push, splits_for)
from .reduce import apply, prologue, reduce, sum_over_batch, tail


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
def _dot(a, b):
    # float32 products and sums (no TF32): the small math keeps full float32 accuracy
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mlp_hidden_kernel(pooled_ptr, w1_ptr, b1_ptr, hp_ptr, N, C, CR, NV, C_SPLIT, POOL: tl.constexpr,
                       HAS_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """Hidden pre-activations hp[n, v] = w1 @ vec_v[n] + b1 for a block of samples and of
    hidden units: a small matmul, each w1 tile read once per block of samples. Program axis 2
    splits the sum over channels (C_SPLIT channels each, a multiple of BLOCK_C): split j writes
    its partial sums to hp_ptr + j * N * NV * CR, the bias in split 0."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    n_ok = n < N
    r_ok = r < CR
    acc_a = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for c0 in range(split * C_SPLIT, tl.minimum(C, split * C_SPLIT + C_SPLIT), BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        va, vb = _load_vecs(pooled_ptr, n[:, None], C, c[None, :], n_ok[:, None] & c_ok[None, :], POOL)
        w1t = tl.load(w1_ptr + r[None, :] * C + c[:, None], mask=c_ok[:, None] & r_ok[None, :],
                      other=0.0).to(tl.float32)
        acc_a += _dot(va, w1t)
        if POOL == 2:
            acc_b += _dot(vb, w1t)
    if HAS_B1:
        b1 = tl.load(b1_ptr + r, mask=r_ok & (split == 0), other=0.0).to(tl.float32)[None, :]
        acc_a += b1
        acc_b += b1
    out = hp_ptr + split.to(tl.int64) * N * NV * CR + n[:, None] * NV * CR + r[None, :]
    ok = n_ok[:, None] & r_ok[None, :]
    tl.store(out, acc_a, mask=ok)
    if POOL == 2:
        tl.store(out + CR, acc_b, mask=ok)


@triton.jit
def _mlp_out_kernel(hp_ptr, w2_ptr, b2_ptr, dot_ptr, out_ptr, N, C, CR, NV, BWD: tl.constexpr,
                    POOL: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, HAS_B2: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Logits z = sum_v (w2 @ act(hp_v) + b2) for a block of samples and channels; writes
    s = gate(z), or with BWD dlogits = dot * gate'(z)."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    c_ok = c < C
    za = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    zb = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, CR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < CR
        hrow = hp_ptr + n[:, None] * NV * CR + r[None, :]
        hok = n_ok[:, None] & r_ok[None, :]
        w2t = tl.load(w2_ptr + c[None, :] * CR + r[:, None], mask=r_ok[:, None] & c_ok[None, :],
                      other=0.0).to(tl.float32)
        za += _dot(act_fn(tl.load(hrow, mask=hok, other=0.0), ACT), w2t)
        if POOL == 2:
            zb += _dot(act_fn(tl.load(hrow + CR, mask=hok, other=0.0), ACT), w2t)
    if HAS_B2:
        b2 = tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        za += b2
        zb += b2
    if POOL == 2:
        za += zb
    ok = n_ok[:, None] & c_ok[None, :]
    o = n[:, None] * C + c[None, :]
    if BWD:
        res = tl.load(dot_ptr + o, mask=ok, other=0.0) * gate_grad_fn(za, GATE)
    else:
        res = gate_fn(za, GATE)
    tl.store(out_ptr + o, res, mask=ok)


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
def _mlp_dh_kernel(dlog_ptr, w2_ptr, hp_ptr, h_ptr, dhp_ptr, N, C, CR, NV, POOL: tl.constexpr,
                   ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """dh = dlogits @ w2 for a block of samples and hidden units; writes h_v = act(hp_v) and
    dhp_v = dh * act'(hp_v) (for the weight gradients and dv)."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = n < N
    r_ok = r < CR
    dh = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        d = tl.load(dlog_ptr + n[:, None] * C + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        w2 = tl.load(w2_ptr + c[:, None] * CR + r[None, :], mask=c_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)
        dh += _dot(d, w2)
    ok = n_ok[:, None] & r_ok[None, :]
    o = n[:, None] * NV * CR + r[None, :]
    hp = tl.load(hp_ptr + o, mask=ok, other=0.0)
    tl.store(h_ptr + o, act_fn(hp, ACT), mask=ok)
    tl.store(dhp_ptr + o, dh * act_grad_fn(hp, ACT), mask=ok)
    if POOL == 2:
        hp = tl.load(hp_ptr + o + CR, mask=ok, other=0.0)
        tl.store(h_ptr + o + CR, act_fn(hp, ACT), mask=ok)
        tl.store(dhp_ptr + o + CR, dh * act_grad_fn(hp, ACT), mask=ok)


@triton.jit
def _mlp_dv_kernel(dhp_ptr, w1_ptr, pooled_ptr, vecs_ptr, dpooled_ptr, N, C, CR, NV, POOL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """dv_v = dhp_v @ w1 for a block of samples and channels, routed to dpooled; writes the
    input vectors too (for the weight gradient of w1)."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    c_ok = c < C
    dva = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, CR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < CR
        hrow = dhp_ptr + n[:, None] * NV * CR + r[None, :]
        hok = n_ok[:, None] & r_ok[None, :]
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        dva += _dot(tl.load(hrow, mask=hok, other=0.0), w1)
        if POOL == 2:
            dvb += _dot(tl.load(hrow + CR, mask=hok, other=0.0), w1)
    ok = n_ok[:, None] & c_ok[None, :]
    va, vb = _load_vecs(pooled_ptr, n[:, None], C, c[None, :], ok, POOL)
    vrow = vecs_ptr + n[:, None] * NV * C + c[None, :]
    tl.store(vrow, va, mask=ok)
    if POOL == 2:
        tl.store(vrow + C, vb, mask=ok)
    _store_dpooled(dpooled_ptr, n[:, None], C, c[None, :], ok, dva, dvb, POOL)


@triton.jit
def _outer_sum_kernel(a_ptr, b_ptr, out_ptr, sum_ptr, N, NV, RA, RB, a_sn, a_sv, b_sn, b_sv, PER,
                      HAS_SUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """out[split, i, j] = sum_n sum_v a[n, v, i] * b[n, v, j] (and sum[split, i] = sum_n sum_v
    a[n, v, i]) over one split of PER samples, a weight gradient's partial: blocks of samples in
    a fixed order, each a small matmul, blocked (reduce.py): runs of INNER blocks, two levels
    of runs."""
    i = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    j = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(2)
    n_start = split * PER
    n_end = n_start + tl.minimum(PER, N - n_start)
    i_ok = i < RA
    j_ok = j < RB
    a1 = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_A], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_A], dtype=tl.float32)
    r = 0
    for r0 in range(n_start, n_end, INNER_T * BLOCK_N):
        run = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        run_s = tl.zeros([BLOCK_A], dtype=tl.float32)
        for n0 in range(r0, r0 + tl.minimum(INNER_T * BLOCK_N, n_end - r0), BLOCK_N):
            n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = n < n_end
            for v in range(0, NV):
                a = tl.load(a_ptr + n[:, None] * a_sn + v * a_sv + i[None, :], mask=n_ok[:, None] & i_ok[None, :],
                            other=0.0)
                b = tl.load(b_ptr + n[:, None] * b_sn + v * b_sv + j[None, :], mask=n_ok[:, None] & j_ok[None, :],
                            other=0.0)
                run += _dot(tl.trans(a), b)
                run_s += tl.sum(a, axis=0)
        a1, a2 = run_push(run, r, a1, a2)
        if HAS_SUM:
            s1, s2 = run_push(run_s, r, s1, s2)
        r += 1
    out = out_ptr + split.to(tl.int64) * RA * RB
    tl.store(out + i[:, None] * RB + j[None, :], a1 + a2, mask=i_ok[:, None] & j_ok[None, :])
    if HAS_SUM:
        tl.store(sum_ptr + split * RA + i, s1 + s2, mask=i_ok & (tl.program_id(1) == 0))


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
def _channel_conv_bwd_dw_kernel(pooled_ptr, dlog_ptr, part_ptr, C, K, PER, POOL: tl.constexpr,
                                CIRCULAR: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr):
    """Partial tap gradients of one sample over one split of PER channels, all taps at once (row
    n * splits + split of part): sum_c dlogits[n, c] * (va + vb)[n, c + j - (K-1)/2], channels
    in a fixed order, blocked (reduce.py): runs of INNER tiles, a tree across the tile's
    channels, two levels of runs."""
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    c_start = split * PER
    c_end = c_start + tl.minimum(PER, C - c_start)
    j = tl.arange(0, K_PAD)
    j_ok = j < K
    pad = (K - 1) // 2
    a1 = tl.zeros([K_PAD], dtype=tl.float32)
    a2 = tl.zeros([K_PAD], dtype=tl.float32)
    i = 0
    for r0 in range(c_start, c_end, INNER_T * BLOCK_C):
        run = tl.zeros([K_PAD, BLOCK_C], dtype=tl.float32)
        for c0 in range(r0, r0 + tl.minimum(INNER_T * BLOCK_C, c_end - r0), BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < c_end
            ic = c[None, :] + j[:, None] - pad
            if CIRCULAR:
                ic = ((ic % C) + C) % C
                ok = c_ok[None, :] & j_ok[:, None]
            else:
                ok = c_ok[None, :] & j_ok[:, None] & (ic >= 0) & (ic < C)
            va, vb = _load_vecs(pooled_ptr, n, C, ic, ok, POOL)
            if POOL == 2:
                va = va + vb
            run += tl.load(dlog_ptr + n * C + c, mask=c_ok, other=0.0)[None, :] * va
        a1, a2 = run_push(tl.sum(run, axis=1), i, a1, a2)
        i += 1
    tl.store(part_ptr + (n * tl.num_programs(1) + split) * K + j, a1 + a2, mask=j_ok)


# ----------------------------------------------------------------------------- launchers

def _cfg_c(C: int) -> int:
    return 16 if INTERPRET else min(1024, triton.next_power_of_2(C))


def _mlp_blocks(C: int, CR: int):
    """(BLOCK_N, BLOCK_C, BLOCK_R) of the small matmuls (tl.dot wants 16 or more)."""
    if INTERPRET:
        return 16, 16, 16
    return 16, min(64, max(16, triton.next_power_of_2(C))), min(64, max(16, triton.next_power_of_2(CR)))


def _mlp_splits(pooled, C: int, bc: int, programs: int) -> tuple[int, int]:
    """(splits, channels per split) of the hidden layer's sum over channels. Over samples and
    hidden units alone the grid is small (16 programs at 128 x 2048 -> 128, 56% of a CBAM
    training step's time on an H100 at 7 x 7); the splits bring it to a few programs per SM.
    Each split is a whole number of BLOCK_C chunks."""
    chunks = triton.cdiv(C, bc)
    want = 4 * programs if INTERPRET else programs_wanted(pooled)
    per = triton.cdiv(chunks, max(1, min(chunks, want // max(1, programs)))) * bc
    return triton.cdiv(C, per), per


def _mlp_forward(pooled, w1, b1, w2, b2, pool, act, gate, dot=None, out=None):
    """Hidden pre-activations hp [N, NV, CR] and out = s (or dlogits, given dot) [N, C]."""
    N, _, C = pooled.shape
    CR = w1.shape[0]
    NV = pool_inputs(pool)
    bn, bc, br = _mlp_blocks(C, CR)
    POOL = code(POOLS, "pool", pool)
    b1, w2, b2 = _contig(b1), w2.contiguous(), _contig(b2)
    grid = (triton.cdiv(N, bn), triton.cdiv(CR, br))
    splits, c_split = _mlp_splits(pooled, C, bc, grid[0] * grid[1])
    hp = torch.empty((splits, N, NV, CR), dtype=torch.float32, device=pooled.device)
    launch(_mlp_hidden_kernel)[grid + (splits,)](
        pooled, w1, w1 if b1 is None else b1, hp, N, C, CR, NV, c_split, POOL=POOL, HAS_B1=b1 is not None,
        BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=br)
    hp = hp.sum(0) if splits > 1 else hp[0]  # the splits in a fixed order (no atomics)
    launch(_mlp_out_kernel)[(triton.cdiv(N, bn), triton.cdiv(C, bc))](
        hp, w2, w2 if b2 is None else b2, hp if dot is None else dot, out, N, C, CR, NV, BWD=dot is not None,
        POOL=POOL, ACT=code(ACTS, "act", act), GATE=code(GATES, "gate", gate), HAS_B2=b2 is not None,
        BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=br)
    return hp


def _contig(w):
    return None if w is None else w.contiguous()


def channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding):
    """(s = gate(f(pooled)) as (N, C) float32, hidden): hidden is the ops' `hidden` output, the MLP's
    pre-activations [N, P * Cr] (empty for the conv)."""
    N, _, C = pooled.shape
    s = torch.empty((N, C), dtype=torch.float32, device=pooled.device)
    hidden = pooled.new_empty((N, pool_inputs(pool) * w1.shape[0]) if kind == "mlp" else 0)
    if N * C == 0:  # launch no empty grid
        return s, hidden
    POOL, GATE = code(POOLS, "pool", pool), code(GATES, "gate", gate)
    w1 = w1.contiguous()
    if kind == "mlp":
        hidden = _mlp_forward(pooled, w1, b1, w2, b2, pool, act, gate, out=s).reshape(N, -1)
    else:
        bc = _cfg_c(C)
        ncb = triton.cdiv(C, bc)
        launch(_channel_conv_fwd_kernel)[(N * ncb,)](
            pooled, w1, pooled, s, C, w1.shape[-1], ncb, BWD=False, POOL=POOL, GATE=GATE,
            CIRCULAR=code(PADDINGS, "padding", padding) == 1, BLOCK_C=bc)
    return s, hidden


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
        if N * C == 0:  # launch no empty grid: the weight gradients are sums over nothing
            return dpooled, [dw1, db1, dw2, db2]
        NV = pool_inputs(pool)
        dlog = torch.empty((N, C), **f32)
        hp = _mlp_forward(pooled, w1, b1, w2, b2, pool, act, gate, dot=dot, out=dlog)
        h, dhp = torch.empty_like(hp), torch.empty_like(hp)
        vecs = torch.empty((N, NV, C), **f32)
        bn, bc, br = _mlp_blocks(C, CR)
        ACT, w2c = code(ACTS, "act", act), w2.contiguous()
        launch(_mlp_dh_kernel)[(triton.cdiv(N, bn), triton.cdiv(CR, br))](
            dlog, w2c, hp, h, dhp, N, C, CR, NV, POOL=POOL, ACT=ACT, BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=br)
        launch(_mlp_dv_kernel)[(triton.cdiv(N, bn), triton.cdiv(C, bc))](
            dhp, w1, pooled, vecs, dpooled, N, C, CR, NV, POOL=POOL, BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=br)
        outer_sum(dhp, vecs, dw1, db1)  # dw1 [CR, C], db1
        outer_sum(dlog.view(N, 1, C).expand(N, NV, C), h, dw2, db2)  # dw2 [C, CR], db2
        return dpooled, [dw1, db1, dw2, db2]
    if N * C == 0:
        return dpooled, [dw1, None, None, None]
    K = w1.shape[-1]
    circular = code(PADDINGS, "padding", padding) == 1
    bc = _cfg_c(C)
    ncb = triton.cdiv(C, bc)
    dlog = torch.empty((N, C), **f32)
    launch(_channel_conv_fwd_kernel)[(N * ncb,)](
        pooled, w1, dot, dlog, C, K, ncb, BWD=True, POOL=POOL, GATE=GATE, CIRCULAR=circular, BLOCK_C=bc)
    launch(_channel_conv_bwd_dv_kernel)[(N * ncb,)](
        dlog, w1, dpooled, C, K, ncb, POOL=POOL, CIRCULAR=circular, BLOCK_C=bc)
    sum_over_batch(conv_weight_grad_parts(pooled, dlog, K, POOL, circular), dw1.view(K))
    return dpooled, [dw1, None, None, None]


def conv_weight_grad_parts(pooled, dlog, K: int, pool_code: int, circular: bool):
    """Partial tap gradients of the 1D conv, [N * splits, K] float32 (their sum over rows is the
    gradient), from pooled [N, 2, C] and dlogits [N, C]."""
    N, _, C = pooled.shape
    kp = triton.next_power_of_2(K)
    bc = 16 if INTERPRET else max(16, min(_cfg_c(C), 4096 // kp))
    per = triton.cdiv(triton.cdiv(C, splits_for(C, bc)), bc) * bc
    splits = triton.cdiv(C, per)
    part = torch.empty((N * splits, K), dtype=torch.float32, device=pooled.device)
    launch(_channel_conv_bwd_dw_kernel)[(N, splits)](
        pooled, dlog, part, C, K, per, POOL=pool_code, CIRCULAR=circular, BLOCK_C=bc, K_PAD=kp)
    return part


def outer_sum(a, b, out, out_sum=None):
    """out = sum over (n, v) of a[n, v, :, None] * b[n, v, None, :]; out_sum = sum of a. Long
    batches are split over programs, whose partials are then summed in split order."""
    N, NV, RA = a.shape
    RB = b.shape[2]
    ba, bb, bn = (16, 16, 16) if INTERPRET else (32, 64, 16)
    per = triton.cdiv(triton.cdiv(N, splits_for(N, bn)), bn) * bn
    splits = triton.cdiv(N, per)
    f32 = dict(dtype=torch.float32, device=a.device)
    part = out if splits == 1 else torch.empty((splits, RA, RB), **f32)
    part_s = out_sum if splits == 1 or out_sum is None else torch.empty((splits, RA), **f32)
    launch(_outer_sum_kernel)[(triton.cdiv(RA, ba), triton.cdiv(RB, bb), splits)](
        a, b, part, a if part_s is None else part_s, N, NV, RA, RB, a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), per, HAS_SUM=out_sum is not None, BLOCK_N=bn, BLOCK_A=ba, BLOCK_B=bb)
    if splits > 1:
        sum_over_batch(part.view(splits, RA * RB), out.view(RA * RB))
        if out_sum is not None:
            sum_over_batch(part_s, out_sum)


def weight_grads(weights, grads):
    """Gradients in their weights' dtypes; an empty tensor for an absent weight."""
    ref = weights[0]
    return [ref.new_empty(0) if w is None else g.to(w.dtype) for w, g in zip(weights, grads)]


def channel_pool(x, pool):
    """(pooled [N, 2, C] float32 = (avg, max), argmax [N, C] int64 flat h*W+w); for pool "avg" the
    max half and argmax are zeros (the ops' contract: nothing reads them), written by the pooling
    pass, which computes no max."""
    N, C = x.shape[:2]
    pooled = torch.empty((N, 2, C), dtype=torch.float32, device=x.device)
    argmax = torch.empty((N, C), dtype=torch.int64, device=x.device)
    if N:
        reduce(x, True, pooled_out=(pooled[:, 0], pooled[:, 1], argmax), maxed=pool != "avg")
    return pooled, argmax


def channel_attention_forward(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie="first", residual=None,
                              activation="none", in_scale=None, in_shift=None):
    is_split(tie)  # checked; the forward is the same under both rules
    x = prologue(x, in_scale, in_shift)
    out_tail = tail(x, residual, activation)
    with device_guard(x):
        pooled, argmax = channel_pool(x, pool)
        y = torch.empty_like(x)
        s, hidden = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if x.shape[0]:
            apply(x, y, s=s, **out_tail)
        return y, pooled, argmax, hidden  # the backward recomputes hidden


def channel_attention_backward(grad_y, x, pooled, argmax, _hidden, w1, b1, w2, b2, kind, pool, act, gate,
                               padding, tie="first"):
    # "split" (where the max is read: pool is not "avg"): the pass that reduces dy * x also counts the
    # elements equal to each (n, c)'s max; the dx pass gives each of them dmax / count
    split = is_split(tie) and pool != "avg"
    with device_guard(x):
        dx = torch.empty_like(x)
        pooled = pooled.float().contiguous()
        ccnt = None
        if x.shape[0]:
            if split:
                dot, ccnt = reduce(x, True, dy=grad_y, count_max=pooled[:, 1])
            else:
                dot = reduce(x, True, dy=grad_y)
            s, _ = channel_gate(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        else:
            dot = pooled.new_empty((0, x.shape[1]))
        dpooled, grads = channel_small_backward(dot, pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
        if x.shape[0]:
            apply(x, dx, dy=grad_y, s=s, ch_grad=(dpooled, argmax.contiguous()), bwd=True,
                  ch_split=(pooled, ccnt) if split else None)
        return (dx, *weight_grads((w1, b1, w2, b2), grads))
