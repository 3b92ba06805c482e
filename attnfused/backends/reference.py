"""The `reference` backend: every op's forward and backward as plain PyTorch math.

This is the explicit decomposition the C++, CUDA and Triton kernels implement; it is
checked against autograd of the oracle (`attnfused.reference.functional`). Everything
runs in the accumulation dtype (float32, float64 for float64 input); outputs of x's
size take x's dtype and strides.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from ..reference import functional as R
from . import declare_ties, register as _register


def register(name: str, op: str):
    """`backends.register`, with autocast off inside the kernel: its math runs in the accumulation
    dtype it chooses (under autocast, torch's conv and linear would run the small math in half)."""
    def deco(fn):
        @functools.wraps(fn)
        def kernel(x, *args):
            if not torch.amp.is_autocast_available(x.device.type):
                return fn(x, *args)
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, *args)

        _register(name, op)(kernel)
        return fn
    return deco


NAME = "reference"
declare_ties(NAME, split=True)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


# ----------------------------------------------------------------------------- helpers

def like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in x's dtype and exact strides (what the fake implementations promise)."""
    return torch.empty_like(x).copy_(value)


def empty_grad(w):
    """Gradient slot of an absent optional weight: an empty tensor."""
    return w.new_empty(0)


def gate_grad(z: torch.Tensor, kind: str) -> torch.Tensor:
    """d gate(z) / dz, with torch's conventions at the kinks."""
    if kind == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    return ((z > -3) & (z < 3)).to(z.dtype) / 6


def act_grad(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return (z > 0).to(z.dtype)
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def max_grad(t: torch.Tensor, dim: int, index: torch.Tensor, value: torch.Tensor, tie: str) -> torch.Tensor:
    """The gradient `value` of the max of `t` over `dim`, spread per the tie rule: "first", all of
    it at `index` (the forward's); "split", `value / count` at each of the `count` elements equal to
    the max, computed as torch's `amax` backward does (a NaN max: NaN everywhere along `dim`)."""
    if tie == "first":
        return t.new_zeros(t.shape).scatter(dim, index.unsqueeze(dim), value.unsqueeze(dim))
    if t.shape[dim] == 0:
        return t.new_zeros(t.shape)
    mask = t == t.amax(dim, keepdim=True)
    return (value.unsqueeze(dim) / mask.sum(dim, keepdim=True)) * mask


def max_and_index(t: torch.Tensor, dim: int, tie: str = "first"):
    """(max, index of a max) over `dim`, the max's autograd per the tie rule; also over an empty
    `dim` (C, or H*W, of an empty batch): empty results then."""
    if t.shape[dim] == 0:
        shape = t.shape[:dim] + t.shape[dim + 1:]
        return t.new_zeros(shape), torch.zeros(shape, dtype=torch.int64, device=t.device)
    values, index = t.max(dim)
    return (R.max_over(t, dim, tie) if tie == "split" else values), index


def shifted(v: torch.Tensor, offsets, circular: bool) -> torch.Tensor:
    """V[n, c, j] = v[n, c + offsets[j]], wrapped (circular) or zero outside [0, C)."""
    C = v.shape[1]
    idx = torch.arange(C, device=v.device)[:, None] + torch.as_tensor(offsets, device=v.device)[None, :]
    if circular:
        return v[:, idx % C]
    inside = (idx >= 0) & (idx < C)
    return v[:, idx.clamp(0, C - 1)] * inside.to(v.dtype)


def pooled_inputs(avg, mx, pool):
    """The vectors the channel function f sees, each with its weights on (avg, max)."""
    if pool == "avg":
        return [(avg, 1.0, 0.0)]
    if pool == "max":
        return [(mx, 0.0, 1.0)]
    if pool == "avg+max":
        return [(avg, 1.0, 0.0), (mx, 0.0, 1.0)]
    return [(0.5 * avg + 0.5 * mx, 0.5, 0.5)]


def mlp_backward(v, dout, w1, b1, w2, act):
    """Gradients of Linear -> act -> Linear at input v: (dv, dw1, db1, dw2, db2)."""
    w1, w2 = w1.to(v.dtype), w2.to(v.dtype)
    hp = F.linear(v, w1, None if b1 is None else b1.to(v.dtype))
    h = R.hidden_act(hp, act)
    dw2 = dout.t() @ h
    db2 = dout.sum(0)
    dhp = (dout @ w2) * act_grad(hp, act)
    return dhp @ w1, dhp.t() @ v, dhp.sum(0), dw2, db2


def conv1d_backward(v, dout, weight, padding):
    """Gradients of the channel 1D conv at input v: (dv, dweight)."""
    k = weight.shape[-1]
    p = (k - 1) // 2
    w = weight.reshape(k).to(v.dtype)
    circular = padding == "circular"
    dw = torch.einsum("nc,ncj->j", dout, shifted(v, [j - p for j in range(k)], circular))
    dv = torch.einsum("ncj,j->nc", shifted(dout, [p - j for j in range(k)], circular), w)
    return dv, dw.reshape(weight.shape)


def channel_small_backward(dlogits, pooled, w1, b1, w2, b2, kind, pool, act, padding):
    """Back through f(pool): (dpooled [N, 2, C], dw1, db1, dw2, db2) in the accumulation dtype."""
    avg, mx = pooled[:, 0], pooled[:, 1]
    davg, dmax = torch.zeros_like(avg), torch.zeros_like(mx)
    dw1 = torch.zeros(w1.shape, dtype=pooled.dtype, device=pooled.device)
    db1 = dw2 = db2 = None
    if kind == "mlp":
        db1 = torch.zeros(w1.shape[0], dtype=pooled.dtype, device=pooled.device)
        dw2 = torch.zeros(w2.shape, dtype=pooled.dtype, device=pooled.device)
        db2 = torch.zeros(w2.shape[0], dtype=pooled.dtype, device=pooled.device)
    for v, ca, cm in pooled_inputs(avg, mx, pool):
        if kind == "mlp":
            dv, g1, gb1, g2, gb2 = mlp_backward(v, dlogits, w1, b1, w2, act)
            dw1 += g1
            db1 += gb1
            dw2 += g2
            db2 += gb2
        else:
            dv, g1 = conv1d_backward(v, dlogits, w1, padding)
            dw1 += g1
        # only the vectors this input is made of: 0 * dv would carry a NaN of dv where the oracle has none
        if ca:
            davg += ca * dv
        if cm:
            dmax += cm * dv
    return torch.stack((davg, dmax), 1), dw1, db1, dw2, db2


def channel_gate_values(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding):
    """(logits, s) of channel attention from the saved pooled vectors."""
    z = R.channel_logits(pooled[:, 0], pooled[:, 1], w1, b1, w2, b2, kind=kind, pool=pool, act=act,
                         padding=padding)
    return z, R.gate(z, gate)


def hidden_output(pooled, w1, b1, kind, pool):
    """The forward's `hidden` output (attnfused.ops): the MLP's first-layer pre-activations of each
    pooled input, [N, P * Cr]; empty for the conv."""
    if kind != "mlp":
        return pooled.new_empty(0)
    w1a, b1a = w1.to(pooled.dtype), None if b1 is None else b1.to(pooled.dtype)
    return torch.cat([F.linear(v, w1a, b1a) for v, _, _ in pooled_inputs(pooled[:, 0], pooled[:, 1], pool)], 1)


def spatial_gate_values(smaps, weight, bias, maps, gate):
    """(conv input, logits, t) of spatial attention from the saved [max, mean] maps."""
    m_in = R.spatial_maps(smaps[:, 1], smaps[:, 0], maps)
    k = weight.shape[-1]
    if m_in.numel() == 0:  # an empty batch, maybe H or W = 0, where conv2d refuses the kernel size
        z = m_in.new_zeros((m_in.shape[0], *m_in.shape[2:]))
    else:
        z = F.conv2d(m_in, weight.to(m_in.dtype), None if bias is None else bias.to(m_in.dtype),
                     padding=(k - 1) // 2).squeeze(1)
    return m_in, z, R.gate(z, gate)


# ----------------------------------------------------------------------------- cores (acc dtype)

def channel_pool(xa, pool, tie="first"):
    """(pooled [N, 2, C] = (mean, max), argmax [N, C]) over space; for pool "avg" nothing reads the
    max, and it and argmax are zeros (the ops' contract)."""
    flat = xa.flatten(2)
    if pool == "avg":
        avg = flat.mean(2)
        return torch.stack((avg, torch.zeros_like(avg)), 1), torch.zeros(avg.shape, dtype=torch.int64,
                                                                             device=avg.device)
    mx, idx = max_and_index(flat, 2, tie)
    return torch.stack((flat.mean(2), mx), 1), idx


def spatial_pool_core(xa, tie="first"):
    mx, idx = max_and_index(xa, 1, tie)
    return torch.stack((mx, xa.mean(1)), 1), idx


def channel_backward_core(dya, xa, pooled, argmax, w1, b1, w2, b2, kind, pool, act, gate, padding, tie):
    N, C, H, W = xa.shape
    z, s = channel_gate_values(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
    dlogits = (dya * xa).sum((2, 3)) * gate_grad(z, gate)
    dpooled, dw1, db1, dw2, db2 = channel_small_backward(dlogits, pooled, w1, b1, w2, b2, kind, pool, act,
                                                         padding)
    dmax = max_grad(xa.flatten(2), 2, argmax, dpooled[:, 1], tie).view(N, C, H, W)
    dx = dya * s[:, :, None, None] + (dpooled[:, 0] / (H * W))[:, :, None, None] + dmax
    return dx, dw1, db1, dw2, db2


def spatial_backward_core(dya, xa, smaps, sargmax, weight, bias, maps, gate, tie):
    N, C, H, W = xa.shape
    m_in, z, t = spatial_gate_values(smaps, weight, bias, maps, gate)
    dlogits = ((dya * xa).sum(1) * gate_grad(z, gate)).unsqueeze(1)
    p = (weight.shape[-1] - 1) // 2
    if m_in.numel() == 0:  # an empty batch (see spatial_gate_values)
        dw, dm_in = m_in.new_zeros(weight.shape), torch.zeros_like(m_in)
    else:
        dw = conv2d_weight(m_in, weight.shape, dlogits, padding=p)
        dm_in = conv2d_input(m_in.shape, weight.to(m_in.dtype), dlogits, padding=p)
    db = dlogits.sum().reshape(1)
    if maps == "max_mean":
        dmax, dmean = dm_in[:, 0], dm_in[:, 1]
    elif maps == "mean_max":
        dmax, dmean = dm_in[:, 1], dm_in[:, 0]
    else:
        dmax = dmean = 0.5 * dm_in[:, 0]
    dx = dya * t[:, None] + (dmean / C)[:, None] + max_grad(xa, 1, sargmax, dmax, tie)
    return dx, dw, db


def acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(R.acc_dtype(t.dtype))


def grads_out(refs, grads):
    """Cast weight gradients to their weights' dtype; absent weights get empty tensors."""
    out = []
    for w, g in zip(refs, grads):
        out.append(empty_grad(refs[0]) if w is None else g.to(w.dtype))
    return out


# ----------------------------------------------------------------------------- ops

@register(NAME, "channel_attention")
def channel_attention(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie, residual, activation, in_scale,
                      in_shift):
    xa = acc(R.prologue(x, in_scale, in_shift))
    pooled, argmax = channel_pool(xa, pool, tie)
    _, s = channel_gate_values(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
    y = like(x, R.tail(xa * s[:, :, None, None], residual, activation))
    return y, pooled, argmax, hidden_output(pooled, w1, b1, kind, pool)


@register(NAME, "channel_attention_backward")
def channel_attention_backward(grad_y, x, pooled, argmax, _hidden, w1, b1, w2, b2, kind, pool, act, gate, padding,
                               tie):
    xa = acc(x)
    if tie == "split":  # from x itself: also the split rule of the backends that have no own (see ops)
        pooled, argmax = channel_pool(xa, pool)
    dx, *gw = channel_backward_core(acc(grad_y), xa, pooled, argmax, w1, b1, w2, b2, kind, pool, act,
                                    gate, padding, tie)
    return (like(x, dx), *grads_out((w1, b1, w2, b2), gw))


@register(NAME, "spatial_attention")
def spatial_attention(x, weight, bias, maps, gate, tie, residual, activation, in_scale, in_shift):
    xa = acc(R.prologue(x, in_scale, in_shift))
    smaps, sargmax = spatial_pool_core(xa, tie)
    _, _, t = spatial_gate_values(smaps, weight, bias, maps, gate)
    return like(x, R.tail(xa * t[:, None], residual, activation)), smaps, sargmax


@register(NAME, "spatial_attention_backward")
def spatial_attention_backward(grad_y, x, smaps, sargmax, weight, bias, maps, gate, tie):
    xa = acc(x)
    if tie == "split":
        smaps, sargmax = spatial_pool_core(xa)
    dx, *gw = spatial_backward_core(acc(grad_y), xa, smaps, sargmax, weight, bias, maps, gate, tie)
    return (like(x, dx), *grads_out((weight, bias), gw))


@register(NAME, "cbam")
def cbam(x, w1, b1, w2, b2, sweight, sbias, kind, pool, act, gate, padding, maps, sgate, tie, residual, activation,
         in_scale, in_shift):
    xa = acc(R.prologue(x, in_scale, in_shift))
    pooled, argmax = channel_pool(xa, pool, tie)
    _, s = channel_gate_values(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
    x1 = xa * s[:, :, None, None]  # never stored by the fused kernels
    smaps, sargmax = spatial_pool_core(x1, tie)
    _, _, t = spatial_gate_values(smaps, sweight, sbias, maps, sgate)
    return (like(x, R.tail(x1 * t[:, None], residual, activation)), pooled, argmax, smaps, sargmax,
            hidden_output(pooled, w1, b1, kind, pool))


@register(NAME, "cbam_backward")
def cbam_backward(grad_y, x, pooled, argmax, smaps, sargmax, _hidden, w1, b1, w2, b2, sweight, sbias, kind,
                  pool, act, gate, padding, maps, sgate, tie):
    xa = acc(x)
    if tie == "split":
        pooled, argmax = channel_pool(xa, pool)
    _, s = channel_gate_values(pooled, w1, b1, w2, b2, kind, pool, act, gate, padding)
    x1 = xa * s[:, :, None, None]
    if tie == "split":  # the maps of this x1, rounded as compared here
        smaps, sargmax = spatial_pool_core(x1)
    dx1, dsw, dsb = spatial_backward_core(acc(grad_y), x1, smaps, sargmax, sweight, sbias, maps, sgate, tie)
    dx, *gw = channel_backward_core(dx1, xa, pooled, argmax, w1, b1, w2, b2, kind, pool, act, gate, padding,
                                    tie)
    return (like(x, dx), *grads_out((w1, b1, w2, b2, sweight, sbias), (*gw, dsw, dsb)))


@register(NAME, "spatial_pool")
def spatial_pool(x, tie):
    return spatial_pool_core(acc(x), tie)


@register(NAME, "spatial_pool_backward")
def spatial_pool_backward(grad_smaps, x, sargmax, tie):
    N, C, H, W = x.shape
    xa, g = acc(x), acc(grad_smaps)
    dx = (g[:, 1] / C)[:, None].expand(N, C, H, W) + max_grad(xa, 1, sargmax, g[:, 0], tie)
    return like(x, dx)


@register(NAME, "spatial_scale")
def spatial_scale(x, t, residual, activation):
    return like(x, R.tail(acc(x) * acc(t)[:, None], residual, activation))


@register(NAME, "spatial_scale_backward")
def spatial_scale_backward(grad_y, x, t):
    dya = acc(grad_y)
    return like(x, dya * acc(t)[:, None]), (dya * acc(x)).sum(1).to(t.dtype)
