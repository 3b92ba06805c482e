"""The oracle: every computation the fused ops do, in plain PyTorch with autograd.

Written for clarity, not speed. The gradient of a max follows `tie`: "first" sends it to one
maximal element (the index `torch.max(dim)` returns), as `AdaptiveMaxPool2d` does; "split"
divides it evenly among all maximal elements, as `amax` does. Reductions and the small MLP/conv
math run in float32 (float64 for float64 input), like the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of reductions and small math: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "hardsigmoid":
        # relu6(z + 3) / 6, as timm writes it: torch's own hardsigmoid backward scales by a
        # float32 1/6 even for float64 input, which would blur the float64 oracle
        return F.relu6(z + 3) / 6
    raise ValueError(f"gate must be 'sigmoid' or 'hardsigmoid', got {kind!r}")


def hidden_act(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(z)
    if kind == "silu":
        return F.silu(z)
    raise ValueError(f"act must be 'relu' or 'silu', got {kind!r}")


def max_over(t: torch.Tensor, dim: int, tie: str = "first") -> torch.Tensor:
    """The max over `dim`, its gradient per the tie rule ("first": `torch.max`, "split": `amax`)."""
    if tie == "first":
        return t.max(dim).values
    if tie == "split":
        return t.amax(dim)
    raise ValueError(f"tie must be 'first' or 'split', got {tie!r}")


def pool_space(x: torch.Tensor, tie: str = "first"):
    """avg and max over (H, W): two (N, C) tensors in the accumulation dtype."""
    flat = x.flatten(2).to(acc_dtype(x.dtype))
    return flat.mean(2), max_over(flat, 2, tie)


def pool_channels(x: torch.Tensor, tie: str = "first"):
    """mean and max over C: two (N, H, W) maps in the accumulation dtype."""
    xa = x.to(acc_dtype(x.dtype))
    return xa.mean(1), max_over(xa, 1, tie)


def mlp(v, w1, b1, w2, b2, act: str):
    """Linear(C, C//r) -> act -> Linear(C//r, C) on (N, C) vectors."""
    h = hidden_act(F.linear(v, w1.to(v.dtype), None if b1 is None else b1.to(v.dtype)), act)
    return F.linear(h, w2.to(v.dtype), None if b2 is None else b2.to(v.dtype))


def channel_conv1d(v, weight, padding: str):
    """ECA's 1D cross-correlation along channels, one in/out channel, no bias.

    `weight` is (1, 1, k). Zero padding or circular (CecaModule) padding of (k-1)//2.
    """
    k = weight.shape[-1]
    p = (k - 1) // 2
    C = v.shape[1]
    if C == 0:  # an empty batch's 0 channels: torch's conv1d takes no empty input (still tied to weight)
        return v * weight.sum()
    if padding == "zeros":
        return F.conv1d(v.unsqueeze(1), weight.to(v.dtype), padding=p).squeeze(1)
    if padding == "circular":
        # index form of circular padding: works for any C, also when p > C
        idx = (torch.arange(C + 2 * p, device=v.device) - p) % C
        return F.conv1d(v[:, idx].unsqueeze(1), weight.to(v.dtype)).squeeze(1)
    raise ValueError(f"padding must be 'zeros' or 'circular', got {padding!r}")


def channel_logits(avg, mx, w1, b1, w2, b2, *, kind: str, pool: str, act: str, padding: str):
    """Logits of channel attention from the pooled (N, C) vectors."""
    if kind == "mlp":
        f = lambda v: mlp(v, w1, b1, w2, b2, act)  # noqa: E731
    elif kind == "conv":
        f = lambda v: channel_conv1d(v, w1, padding)  # noqa: E731
    else:
        raise ValueError(f"kind must be 'mlp' or 'conv', got {kind!r}")
    if pool == "avg":
        return f(avg)
    if pool == "max":
        return f(mx)
    if pool == "avg+max":
        return f(avg) + f(mx)
    if pool == "mix":
        return f(0.5 * avg + 0.5 * mx)
    raise ValueError(f"pool must be one of avg, max, avg+max, mix, got {pool!r}")


def tail(v: torch.Tensor, residual=None, activation=None) -> torch.Tensor:
    """The block's tail on the attention output v (accumulation dtype): activation(v + residual),
    activation None, "none" or "relu"."""
    if residual is not None:
        v = v + residual.to(v.dtype)
    if activation in (None, "none"):
        return v
    if activation == "relu":
        return F.relu(v)
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def prologue(x: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
    """The input's per-channel affine `x * scale[c] + shift[c]` (an eval-mode BatchNorm's), computed in
    the accumulation dtype, a product then a sum, and rounded to x's dtype, as a BatchNorm's output
    is: what the fused ops read where they take `in_scale` and `in_shift`. x itself without them."""
    if scale is None:
        return x
    acc = acc_dtype(x.dtype)
    return (x.to(acc) * scale.to(acc)[:, None, None] + shift.to(acc)[:, None, None]).to(x.dtype)


def channel_attention(x, w1, b1=None, w2=None, b2=None, *, kind="mlp", pool="avg", act="relu",
                      gate_kind="sigmoid", padding="zeros", tie="first", residual=None, activation=None,
                      in_scale=None, in_shift=None):
    """y = activation(x' * gate(f(pool(x')))[n, c] + residual), x' = prologue(x, in_scale, in_shift)
    (the prologue and the tail optional)."""
    x = prologue(x, in_scale, in_shift)
    avg, mx = pool_space(x, tie)
    s = gate(channel_logits(avg, mx, w1, b1, w2, b2, kind=kind, pool=pool, act=act, padding=padding),
             gate_kind)
    return tail(x.to(s.dtype) * s[:, :, None, None], residual, activation).to(x.dtype)


def spatial_maps(mean, mx, maps: str):
    """The conv's input (N, 1 or 2, H, W) from the mean and max maps."""
    if maps == "max_mean":
        return torch.stack((mx, mean), 1)
    if maps == "mean_max":
        return torch.stack((mean, mx), 1)
    if maps == "mix":
        return (0.5 * mean + 0.5 * mx).unsqueeze(1)
    raise ValueError(f"maps must be one of max_mean, mean_max, mix, got {maps!r}")


def spatial_logits(mean, mx, weight, bias, maps: str):
    k = weight.shape[-1]
    m = spatial_maps(mean, mx, maps)
    b = None if bias is None else bias.to(m.dtype)
    return F.conv2d(m, weight.to(m.dtype), b, padding=(k - 1) // 2).squeeze(1)


def spatial_attention(x, weight, bias=None, *, maps="max_mean", gate_kind="sigmoid", tie="first", residual=None,
                      activation=None, in_scale=None, in_shift=None):
    """y = activation(x' * gate(conv2d(maps(x')))[n, h, w] + residual), x' as in `channel_attention`
    (the prologue and the tail optional)."""
    x = prologue(x, in_scale, in_shift)
    mean, mx = pool_channels(x, tie)
    t = gate(spatial_logits(mean, mx, weight, bias, maps), gate_kind)
    return tail(x.to(t.dtype) * t[:, None], residual, activation).to(x.dtype)


def cbam(x, w1, b1, w2, b2, spatial_weight, spatial_bias=None, *, kind="mlp", pool="avg+max",
         act="relu", gate_kind="sigmoid", padding="zeros", maps="max_mean", spatial_gate="sigmoid", tie="first",
         residual=None, activation=None, in_scale=None, in_shift=None):
    """The prologue (optional), channel attention, then spatial attention on its output (one tie rule for
    both maxima), then the tail (optional)."""
    x1 = channel_attention(x, w1, b1, w2, b2, kind=kind, pool=pool, act=act, gate_kind=gate_kind,
                           padding=padding, tie=tie, in_scale=in_scale, in_shift=in_shift)
    return spatial_attention(x1, spatial_weight, spatial_bias, maps=maps, gate_kind=spatial_gate, tie=tie,
                             residual=residual, activation=activation)
