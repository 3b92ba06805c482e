"""The kernels that touch the big tensor: reductions over space or over channels (pooling,
and the dot products of the backward), and one elementwise pass (the forward scale and
every input gradient).

x is addressed as x[n, c, p] with p = h*W + w through its own strides (NCHW and
channels_last natively; any other strides through h and w). Reductions are deterministic:
each program reduces a fixed tile range of one split and writes a partial; a second small
kernel combines the partials in split order.

Accuracy: no float32 sum is one long running sum (a running sum of m terms rounds m times,
and drops every term's low bits that fall below half its ulp). A long sum is blocked: each lane
of a tile sums INNER consecutive terms (a run); a run's lanes are summed as a tree; a program
adds its run sums in two levels of at most INNER each (so it sums at most MAX_RUNS runs: longer
axes take more splits); the splits' partials are combined in tiles of INNER summed as a tree,
then a cascade of levels of at most INNER each. No level adds more than INNER = 16 terms of
like size, whatever the length.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ..._options import TAIL_ACTIVATIONS, check_choice
from ...reference.functional import prologue as prologue_ref
from ._common import (INNER_T, INTERPRET, IDX_NONE_T, argmax_combine, argmax_rows, cascade_push, cascade_total,
                      geometry, launch, programs_wanted, run_push, splits_for)


@triton.jit
def _p_offset(p, W, sh, sw, FLAT: tl.constexpr):
    if FLAT:
        o = p * sw
    else:
        o = (p // W) * sh + (p % W) * sw
    return o


@triton.jit
def _spatial_grad(g, n, c, p, mask, C, P, t_ptr, gmap_ptr, sarg_ptr, HAS_T: tl.constexpr, x, s_ptr, smax_ptr,
                  scnt_ptr, SPLIT: tl.constexpr, MUL_S: tl.constexpr):
    """dx1 of spatial attention from dy: dy * t + dmean / C + the max's share. Tie rule "first"
    (not SPLIT): [c == sargmax] * dmax. "split": (dmax / count) * [x1 == max] with x1 = x (* s[n, c]
    if MUL_S, rounded as the forward's max saw it), max = smax_ptr's [N, 2, P] maps (max first) and
    count = scnt_ptr's [N, P] (the number of channels equal to the max; 0 at a NaN max: NaN then, as
    torch's amax backward)."""
    if HAS_T:
        g = g * tl.load(t_ptr + n * P + p, mask=mask, other=0.0)
    gbase = gmap_ptr + n * 2 * P + p
    dmax = tl.load(gbase, mask=mask, other=0.0)
    dmean = tl.load(gbase + P, mask=mask, other=0.0)
    if SPLIT:
        x1 = x
        if MUL_S:
            x1 = x1 * tl.load(s_ptr + n * C + c, mask=mask, other=0.0)
        m = tl.load(smax_ptr + n * 2 * P + p, mask=mask, other=0.0)
        cnt = tl.load(scnt_ptr + n * P + p, mask=mask, other=1.0)
        share = (dmax / cnt) * (x1 == m).to(tl.float32)
    else:
        sarg = tl.load(sarg_ptr + n * P + p, mask=mask, other=-1)
        share = tl.where(sarg == c, dmax, 0.0)
    return g + dmean / C + share


@triton.jit
def _reduce_partial_kernel(
        x_ptr, dy_ptr, s_ptr, t_ptr, gmap_ptr, sarg_ptr, sum_ptr, sum_sn, max_ptr, max_sn, idx_ptr, idx_sn,
        cmax_ptr, cmax_sn, cnt_ptr, cnt_sn, smax_ptr, scnt_ptr,
        C, P, W, n_kblk, L_PER_SPLIT,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        REDUCE_P: tl.constexpr, DOT: tl.constexpr, HAS_S: tl.constexpr, SP_GRAD: tl.constexpr,
        FINAL: tl.constexpr, FLAT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
        COUNT: tl.constexpr, SP_SPLIT: tl.constexpr, MAXED: tl.constexpr):
    """Partial reductions of one (sample, block of kept indices, split of the reduced axis).

    REDUCE_P: reduce over p, keep c (channel pooling); else reduce over c, keep p.
    pool (not DOT): sum, max and first argmax of v = x (* s[n, c] if HAS_S); without MAXED (pool
    "avg") the sum only, and FINAL stores zeros as the max and argmax (the ops' contract);
    DOT: sum of g * v, g = dy, or dx1 of spatial attention if SP_GRAD (its max's share split
    among equal channels if SP_SPLIT: x1 = x * s[n, c], smax_ptr the maps, scnt_ptr the counts).
    COUNT (with DOT, the tie rule "split"): also the number of l where v equals cmax_ptr[n, k]
    (row stride cmax_sn), a float32 count to cnt_ptr (row stride cnt_sn), as the sums.
    Results go to row n, column split * K + k of each output (n strides *_sn). FINAL (a
    single split): these are the final outputs, the sum a mean for pooling.
    The sums are blocked (module docstring): runs of INNER tiles, a tree across lanes, two levels
    of runs (L_PER_SPLIT is at most MAX_RUNS runs).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = (pid // n_kblk).to(tl.int64)
    kb = pid % n_kblk
    if REDUCE_P:
        K = C
        L = P
    else:
        K = P
        L = C
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    l_start = split * L_PER_SPLIT
    l_end = l_start + tl.minimum(L_PER_SPLIT, L - l_start)  # (no int32 overflow near 2^31)
    a1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    best = tl.full([BLOCK_K, BLOCK_L], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_K, BLOCK_L], IDX_NONE_T, tl.int32)
    if COUNT:
        cmax = tl.load(cmax_ptr + n * cmax_sn + k, mask=k_ok, other=0.0)
        ties = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)  # whole numbers: exact
    i = 0
    for r0 in range(l_start, l_end, INNER_T * BLOCK_L):
        run = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
        for l0 in range(r0, r0 + tl.minimum(INNER_T * BLOCK_L, l_end - r0), BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            mask = k_ok[:, None] & (l < l_end)[None, :]
            if REDUCE_P:
                c = k[:, None].to(tl.int64)
                p = l[None, :].to(tl.int64)
            else:
                c = l[None, :].to(tl.int64)
                p = k[:, None].to(tl.int64)
            v = tl.load(x_ptr + n * sxn + c * sxc + _p_offset(p, W, sxh, sxw, FLAT), mask=mask,
                        other=0.0).to(tl.float32)
            if HAS_S:
                v = v * tl.load(s_ptr + n * C + c, mask=mask, other=0.0)
            if DOT:
                g = tl.load(dy_ptr + n * syn + c * syc + _p_offset(p, W, syh, syw, FLAT), mask=mask,
                            other=0.0).to(tl.float32)
                if SP_GRAD:
                    g = _spatial_grad(g, n, c, p, mask, C, P, t_ptr, gmap_ptr, sarg_ptr, True, v, s_ptr, smax_ptr,
                                      scnt_ptr, SP_SPLIT, True)
                run += g * v
                if COUNT:
                    ties += (mask & (v == cmax[:, None])).to(tl.float32)
            else:
                run += v
                if MAXED:
                    # per lane, l grows over the loop: a strict > keeps the first maximum
                    li = l[None, :]
                    upd = mask & ((v > best) | ((v == best) & (best_i > li)) | ((v != v) & (best == best)))
                    best = tl.where(upd, v, best)
                    best_i = tl.where(upd, li, best_i)
        a1, a2 = run_push(tl.sum(run, axis=1), i, a1, a2)
        i += 1
    col = split * K + k
    total = a1 + a2
    if FINAL and not DOT:
        total = total / L
    tl.store(sum_ptr + n * sum_sn + col, total, mask=k_ok)
    if COUNT:
        tl.store(cnt_ptr + n * cnt_sn + col, tl.sum(ties, axis=1), mask=k_ok)
    if not DOT:
        if MAXED:
            m, i = argmax_rows(best, best_i)
            tl.store(max_ptr + n * max_sn + col, m, mask=k_ok)
            tl.store(idx_ptr + n * idx_sn + col, i.to(idx_ptr.dtype.element_ty), mask=k_ok)
        elif FINAL:
            tl.store(max_ptr + n * max_sn + col, tl.zeros([BLOCK_K], dtype=tl.float32), mask=k_ok)
            tl.store(idx_ptr + n * idx_sn + col, tl.zeros([BLOCK_K], dtype=idx_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _reduce_finalize_kernel(sum_ptr, max_ptr, idx_ptr, mean_ptr, mean_sn, maxo_ptr, maxo_sn, idxo_ptr,
                            K, S, n_kblk, L, POOL: tl.constexpr, BLOCK: tl.constexpr):
    """Combine the S partials of each (n, k) in split order: the plain sum (POOL 0), or the mean,
    max and argmax (POOL 1), or the mean with zeros as max and argmax (POOL 2: pool "avg", the ops'
    contract). Blocked: INNER partials at a time summed as a tree, these into a cascade."""
    pid = tl.program_id(0)
    n = (pid // n_kblk).to(tl.int64)
    k = (pid % n_kblk) * BLOCK + tl.arange(0, BLOCK)
    ok = k < K
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    a1, a2, a3, a4, a5 = zero, zero, zero, zero, zero
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], IDX_NONE_T, tl.int32)
    i = 0
    for s0 in range(0, S, INNER_T):
        s = s0 + tl.arange(0, INNER_T)
        m = ok[:, None] & (s < S)[None, :]
        o = (n * S + s[None, :]) * K + k[:, None]
        a1, a2, a3, a4, a5 = cascade_push(tl.sum(tl.load(sum_ptr + o, mask=m, other=0.0), axis=1), i,
                                          a1, a2, a3, a4, a5)
        i += 1
        if POOL == 1:
            v, vi = argmax_rows(tl.load(max_ptr + o, mask=m, other=float("-inf")),
                                tl.load(idx_ptr + o, mask=m, other=IDX_NONE_T))
            best, best_i = argmax_combine(best, best_i, v, vi)
    total = cascade_total(a1, a2, a3, a4, a5)
    if POOL == 2:
        best, best_i = zero, tl.zeros([BLOCK], dtype=tl.int32)
    if POOL:
        tl.store(mean_ptr + n * mean_sn + k, total / L, mask=ok)
        tl.store(maxo_ptr + n * maxo_sn + k, best, mask=ok)
        tl.store(idxo_ptr + n * K + k, best_i.to(tl.int64), mask=ok)
    else:
        tl.store(mean_ptr + n * mean_sn + k, total, mask=ok)


def _reduce_config(x: torch.Tensor, N: int, K: int, L: int, l_contiguous: bool):
    """(BLOCK_K, BLOCK_L, L_PER_SPLIT, S, num_warps): a fixed function of the shape and the
    device, so the reduction order, hence every bit of the result, is the same run to run."""
    if INTERPRET and L <= 4096:
        bk, bl, warps, per = 16, 16, 1, 32  # small: the tests' shapes still take several splits
    elif INTERPRET:
        # a long axis: wide tiles and as few splits as the blocked sums allow (the interpreter
        # runs each program and loop step in Python): each lane sums hundreds of terms, as on the GPU
        bk, bl, warps = 16, 256, 1
        per = triton.cdiv(triton.cdiv(L, splits_for(L, bl)), bl) * bl
    else:
        bk, bl, warps = (16, 128, 4) if l_contiguous else (64, 32, 4)
        splits = min(triton.cdiv(programs_wanted(x), N * triton.cdiv(K, bk)), triton.cdiv(L, bl), 128)
        per = triton.cdiv(triton.cdiv(L, splits_for(L, bl, splits)), bl) * bl
    return bk, bl, per, triton.cdiv(L, per), warps


def _finalize(r_sum, r_max, r_idx, mean, mean_sn, mx, mx_sn, idx, N, K, S, L, pool: int):
    """Launch _reduce_finalize_kernel over N rows of K outputs, S partials each (pool: its POOL)."""
    fb = 16 if INTERPRET else min(128, triton.next_power_of_2(K))  # tiles of fb x INNER partials
    nfb = triton.cdiv(K, fb)
    launch(_reduce_finalize_kernel)[(N * nfb,)](
        r_sum, r_max, r_idx, mean, mean_sn, mx, mx_sn, idx, K, S, nfb, L, POOL=pool, BLOCK=fb)


def reduce(x: torch.Tensor, reduce_p: bool, *, dy=None, s=None, sp_grad=None, pooled_out=None, count_max=None,
           sp_split=None, maxed=True):
    """Reduce x (N, C, H, W) over p (reduce_p) or over c.

    pool (dy None): writes pooled_out = (mean view, max view, argmax), each (N, K) with unit
    stride along K (views into the op's saved tensors); maxed=False (pool "avg"): zeros as the max
    and argmax, none computed. dot (dy given): returns the (N, K)
    float32 sums of g * v. v = x * s[n, c] if s is given; g = dx1 of spatial attention if
    sp_grad = (t [N, P], gmap [N, 2, P] (dmax, dmean), sargmax [N, P]) is given, its max's
    gradient split among equal channels (tie rule "split") if sp_split = (smaps [N, 2, P] (max,
    mean) of x1 = x * s[n, c], counts [N, P], s [N, C]) is given.
    count_max (dot only, the tie rule "split"): the (N, K) max (unit stride along K) of v over the
    reduced axis; then returns (sums, counts): counts (N, K) float32 = how many v equal it.
    """
    N, C, H, W = x.shape
    P = H * W
    K, L = (C, P) if reduce_p else (P, C)
    f32 = dict(dtype=torch.float32, device=x.device)
    dot = dy is not None
    count = count_max is not None
    if N * K == 0:  # nothing to compute: launch no empty grid
        return ((torch.empty((N, K), **f32),) * (1 + count) if count else torch.empty((N, K), **f32)) if dot else None
    if L == 0:  # a sum over nothing is 0; a max over nothing has no value
        if dot:
            return (torch.zeros((N, K), **f32), torch.zeros((N, K), **f32)) if count else torch.zeros((N, K), **f32)
        raise ValueError(f"x: pooling over {'H * W' if reduce_p else 'C'} needs a nonempty axis, got shape "
                         f"{tuple(x.shape)}")
    sxn, sxc, sxh, sxw, flat = geometry(x)
    l_contiguous = (sxw if reduce_p else sxc) == 1 and (flat or not reduce_p)
    bk, bl, per, S, warps = _reduce_config(x, N, K, L, l_contiguous)
    n_kblk = triton.cdiv(K, bk)
    final = S == 1  # one split: the partials are the results, no second kernel
    if dot:
        syn, syc, syh, syw, yflat = geometry(dy)
        flat = flat and yflat  # the (h, w) addressing serves every stride pattern
        out = torch.empty((N, K), **f32)
        results = (out if final else torch.empty((N, S, K), **f32), x, x)  # only the sums are written
    else:
        dy, (syn, syc, syh, syw) = x, (0, 0, 0, 0)
        results = pooled_out if final else (
            (torch.empty((N, S, K), **f32), torch.empty((N, S, K), **f32),
             torch.empty((N, S, K), dtype=torch.int32, device=x.device)) if maxed
            else (torch.empty((N, S, K), **f32), x, x))  # no max: only the sums are written
    t, gmap, sarg = sp_grad if sp_grad is not None else (x, x, x)
    r_sum, r_max, r_idx = results
    # (the pointers and strides of what a launch does not read: x and 0, no new specializations)
    cmax, cmax_sn, cnt, r_cnt, cnt_sn, smax, scnt = x, 0, x, x, 0, x, x
    if count:
        assert dot and count_max.stride(-1) == 1
        cmax, cmax_sn = count_max, count_max.stride(0)
        cnt = torch.empty((N, K), **f32)
        r_cnt = cnt if final else torch.empty((N, S, K), **f32)
        cnt_sn = r_cnt.stride(0)
    if sp_split is not None:
        assert sp_grad is not None and s is None  # x1 = x * s: the s of sp_split
        smax, scnt, s = sp_split
    launch(_reduce_partial_kernel)[(N * n_kblk, S)](
        x, dy, x if s is None else s, t, gmap, sarg, r_sum, r_sum.stride(0), r_max, r_max.stride(0), r_idx,
        r_idx.stride(0), cmax, cmax_sn, r_cnt, cnt_sn, smax, scnt,
        C, P, W, n_kblk, per, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        REDUCE_P=reduce_p, DOT=dot, HAS_S=s is not None and sp_split is None, SP_GRAD=sp_grad is not None,
        FINAL=final, FLAT=flat, BLOCK_K=bk, BLOCK_L=bl, COUNT=count, SP_SPLIT=sp_split is not None,
        MAXED=maxed and not dot, num_warps=warps)
    if final:
        return ((out, cnt) if count else out) if dot else None
    if dot:
        _finalize(r_sum, r_sum, r_sum, out, K, r_sum, K, r_sum, N, K, S, L, 0)
        if count:
            _finalize(r_cnt, r_cnt, r_cnt, cnt, K, r_cnt, K, r_cnt, N, K, S, L, 0)
            return out, cnt
        return out
    mean, mx, idx = pooled_out
    _finalize(r_sum, r_max, r_idx, mean, mean.stride(0), mx, mx.stride(0), idx, N, K, S, L, 1 if maxed else 2)
    return None


def sum_over_batch(part: torch.Tensor, out: torch.Tensor):
    """out[k] = sum_n part[n, k], blocked in sample order (per-sample partials of a weight
    gradient)."""
    N, K = part.shape
    if N == 0 or K == 0:
        return out.zero_()
    _finalize(part, part, part, out, 0, part, 0, part, 1, K, N, 1, 0)
    return out


# ----------------------------------------------------------------------------- elementwise pass

@triton.jit
def _apply_kernel(x_ptr, dy_ptr, out_ptr, s_ptr, t_ptr, cgrad_ptr, carg_ptr, gmap_ptr, sarg_ptr,
                  pooled_ptr, ccnt_ptr, smax_ptr, scnt_ptr, res_ptr,
                  C, P, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, son, soc, soh, sow,
                  BWD: tl.constexpr, HAS_DY: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
                  CH_GRAD: tl.constexpr, SP_GRAD: tl.constexpr, FLAT: tl.constexpr,
                  CH_SPLIT: tl.constexpr, SP_SPLIT: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Forward: out = x * s[n, c] * t[n, p], then the tail: + residual (HAS_RES, laid out like the
    output), relu (RELU; NaN stays NaN, as torch.relu). Backward: out = dx, from dy through the spatial
    gradient (dy * t + dmean / C + dmax's share, SP_GRAD) and then the channel gradient
    (g * s + davg / P + dmax's share, CH_GRAD). A max's share: one-hot at the saved index (tie
    rule "first"), or with CH_SPLIT / SP_SPLIT (tie rule "split") dmax / count at each element
    equal to the max (the channel max: pooled_ptr [N, 2, C], counts ccnt_ptr [N, C]; the spatial
    max of x1 = x (* s if HAS_S): smax_ptr [N, 2, P], counts scnt_ptr [N, P]); x is read then."""
    pid = tl.program_id(0)
    n_pblk = tl.cdiv(P, BLOCK_P)
    n = (pid // n_pblk).to(tl.int64)
    p = ((pid % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[None, :]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None]
    mask = (c < C) & (p < P)
    if BWD:
        if CH_SPLIT or SP_SPLIT:
            xv = tl.load(x_ptr + n * sxn + c * sxc + _p_offset(p, W, sxh, sxw, FLAT), mask=mask,
                         other=0.0).to(tl.float32)
        else:
            xv = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        if HAS_DY:
            v = tl.load(dy_ptr + n * syn + c * syc + _p_offset(p, W, syh, syw, FLAT), mask=mask,
                        other=0.0).to(tl.float32)
        else:
            v = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        if SP_GRAD:
            v = _spatial_grad(v, n, c, p, mask, C, P, t_ptr, gmap_ptr, sarg_ptr, HAS_T, xv, s_ptr, smax_ptr, scnt_ptr,
                              SP_SPLIT, HAS_S)
        elif HAS_T:
            v = v * tl.load(t_ptr + n * P + p, mask=mask, other=0.0)
        if CH_GRAD:
            cbase = cgrad_ptr + n * 2 * C + c
            davg = tl.load(cbase, mask=mask, other=0.0)
            dmax = tl.load(cbase + C, mask=mask, other=0.0)
            if CH_SPLIT:
                m = tl.load(pooled_ptr + n * 2 * C + C + c, mask=mask, other=0.0)
                cnt = tl.load(ccnt_ptr + n * C + c, mask=mask, other=1.0)
                share = (dmax / cnt) * (xv == m).to(tl.float32)
            else:
                carg = tl.load(carg_ptr + n * C + c, mask=mask, other=-1)
                share = tl.where(carg == p, dmax, 0.0)
            v = v * tl.load(s_ptr + n * C + c, mask=mask, other=0.0) + davg / P + share
    else:
        v = tl.load(x_ptr + n * sxn + c * sxc + _p_offset(p, W, sxh, sxw, FLAT), mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_S:
            v = v * tl.load(s_ptr + n * C + c, mask=mask, other=0.0)
        if HAS_T:
            v = v * tl.load(t_ptr + n * P + p, mask=mask, other=0.0)
        if HAS_RES:
            v = v + tl.load(res_ptr + n * son + c * soc + _p_offset(p, W, soh, sow, FLAT), mask=mask,
                            other=0.0).to(tl.float32)
        if RELU:
            v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + n * son + c * soc + _p_offset(p, W, soh, sow, FLAT), v.to(out_ptr.dtype.element_ty),
             mask=mask)


# the pass is bit-exact whatever the tile, so the GPU may autotune it (per shape and layout);
# the interpreter takes one fixed configuration
_APPLY_CONFIGS = [triton.Config({"BLOCK_C": bc, "BLOCK_P": bp}, num_warps=w)
                  for bc, bp, w in ((4, 256, 4), (8, 256, 8), (16, 128, 4), (64, 16, 4), (128, 16, 8),
                                    (32, 32, 4))]
# cache_results: keep the choice on disk across processes (where this Triton has it)
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_apply_autotuned = triton.autotune(_APPLY_CONFIGS, key=["C", "P", "sxc", "FLAT", "BWD", "CH_SPLIT", "SP_SPLIT",
                                                        "HAS_RES"],
                                   **_CACHE)(_apply_kernel)


def prologue(x: torch.Tensor, in_scale, in_shift) -> torch.Tensor:
    """x' = x * in_scale[c] + in_shift[c] (attnfused.ops' prologue; not fused here: one pass), laid out
    like x, after checking both: given together, (C,) float32 on x's device."""
    if in_scale is None and in_shift is None:
        return x
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is None or t.shape != (x.shape[1],) or t.dtype != torch.float32 or t.device != x.device \
                or not t.is_contiguous():
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
            raise ValueError(f"{name} must be a contiguous ({x.shape[1]},) float32 tensor on {x.device} with its "
                             f"partner (the input's per-channel affine), got {got}")
    v = prologue_ref(x, in_scale, in_shift)
    return v if v.stride() == x.stride() else torch.empty_like(x).copy_(v)


def tail(x: torch.Tensor, residual, activation: str) -> dict:
    """apply's keyword arguments for a forward's tail (attnfused.ops), after checking it: the residual
    has x's shape, dtype, device and strides (the output's)."""
    check_choice("activation", activation, TAIL_ACTIVATIONS)
    if residual is not None and (residual.shape != x.shape or residual.stride() != x.stride()
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must have x's shape, strides, dtype and device ({tuple(x.shape)}, {x.stride()}, "
                         f"{x.dtype}, {x.device}), got {tuple(residual.shape)}, {residual.stride()}, "
                         f"{residual.dtype}, {residual.device}")
    return {"residual": residual, "relu": activation == "relu"}


def apply(x: torch.Tensor, out: torch.Tensor, *, dy=None, s=None, t=None, ch_grad=None, sp_grad=None,
          bwd=False, ch_split=None, sp_split=None, residual=None, relu=False):
    """The elementwise pass (see _apply_kernel); out is written, x or dy read once each (both under
    the tie rule "split"), and a forward's residual (out's strides) once.

    ch_grad = (dpooled [N, 2, C], argmax [N, C]); sp_grad = (gmap [N, 2, P], sargmax [N, P]).
    The tie rule "split": ch_split = (pooled [N, 2, C], counts [N, C]) splits the channel max's
    gradient, sp_split = (smaps [N, 2, P], counts [N, P]) the spatial max's (of x * s if s is given).
    """
    N, C, H, W = x.shape
    P = H * W
    if x.numel() == 0:  # launch no empty grid
        return out
    sxn, sxc, sxh, sxw, flat = geometry(x)
    son, soc, soh, sow, oflat = geometry(out)
    y = dy if dy is not None else x
    syn, syc, syh, syw, yflat = geometry(y)
    flat = flat and oflat and yflat  # the (h, w) addressing serves every stride pattern
    cgrad, carg = ch_grad if ch_grad is not None else (x, x)
    gmap, sarg = sp_grad if sp_grad is not None else (x, x)
    pooled, ccnt = ch_split if ch_split is not None else (x, x)
    smax, scnt = sp_split if sp_split is not None else (x, x)
    assert (ch_split is None or ch_grad is not None) and (sp_split is None or sp_grad is not None)
    assert not bwd or (residual is None and not relu), "the tail is a forward's"
    assert residual is None or residual.stride() == out.stride()
    args = (x, y, out, x if s is None else s, x if t is None else t, cgrad, carg, gmap, sarg, pooled, ccnt, smax, scnt,
            x if residual is None else residual, C, P, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, son, soc, soh, sow)
    flags = dict(BWD=bwd, HAS_DY=dy is not None, HAS_S=s is not None, HAS_T=t is not None,
                 CH_GRAD=ch_grad is not None, SP_GRAD=sp_grad is not None, FLAT=flat,
                 CH_SPLIT=ch_split is not None, SP_SPLIT=sp_split is not None, HAS_RES=residual is not None,
                 RELU=relu)
    if INTERPRET:
        bc, bp = 16, 16
        launch(_apply_kernel)[(N * triton.cdiv(P, bp), triton.cdiv(C, bc))](
            *args, **flags, BLOCK_C=bc, BLOCK_P=bp, num_warps=1)
    else:
        grid = lambda meta: (N * triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        launch(_apply_autotuned)[grid](*args, **flags)
    return out
