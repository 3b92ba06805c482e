"""Functional forms of the fused blocks: check arguments, pick the backend, call the op.

Every function takes `backend="auto"` (docs/contract.md §3) and returns a tensor shaped, typed and
laid out (NCHW or channels_last) like `x`. Weights have x's dtype, as torch's layers require;
under `torch.autocast` they may be float32 while `x` is half precision. All reductions and
small math run in float32 (float64 for float64 x).

Under torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap, ...) and forward-mode AD the
functions compute the same result with plain PyTorch ops (the reference backend's), whatever
the backend: the fused kernels have a backward formula only (see `ops.needs_decomposition`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backends, ops
from .reference import functional as R
from ._options import (CHANNEL_KINDS, CHANNEL_POOLS, CONV_PADDINGS, GATES, HIDDEN_ACTS, SPATIAL_MAPS,
                       TAIL_ACTIVATIONS, TIE_RULES, check_choice, spatial_in_channels)


def _onnx_flags():
    """The two flags torch.onnx.is_in_onnx_export reads (it imports their modules on every call: about
    1 us, a tenth of a small block's kernel); None where this torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return GLOBALS, _flags


_ONNX = _onnx_flags()


def onnx_exporting() -> bool:
    """torch.onnx.is_in_onnx_export(), cheaper in eager mode (torch.compile traces the original)."""
    if _ONNX is None or torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _ONNX[0].in_onnx_export or _ONNX[1]._is_onnx_exporting


def native_layout(x: Tensor) -> Tensor:
    """x itself if NCHW- or channels_last-contiguous, else one copy to NCHW (docs/contract.md §4)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _tail_args(x: Tensor, residual, activation) -> tuple[Tensor | None, str]:
    """(residual laid out like x, or None; the op's activation name) after checking both. x is already
    in its native layout: a residual in another one is copied once (its gradient flows back)."""
    if activation is None:
        activation = "none"
    check_choice("activation", activation, TAIL_ACTIVATIONS)
    if residual is None:
        return None, activation
    _checks.check_weight("residual", residual, x, tuple(x.shape))
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the input's dtype {x.dtype}, got {residual.dtype}")
    return ops.same_strides_as(residual, x), activation


def _prologue_args(x: Tensor, in_scale, in_shift) -> tuple[Tensor | None, Tensor | None]:
    """(in_scale, in_shift) as the ops take them (contiguous, in the accumulation dtype; gradients flow
    back through the conversion), or (None, None), after checking both: given together, each of
    shape (C,) on x's device, any floating dtype."""
    if in_scale is None and in_shift is None:
        return None, None
    for name, t, other in (("in_scale", in_scale, "in_shift"), ("in_shift", in_shift, "in_scale")):
        if t is None:
            raise ValueError(f"{name} must be given with {other} (the input's per-channel affine), got None")
        _checks.check_weight(name, t, x, (x.shape[1],))
    acc = R.acc_dtype(x.dtype)
    return in_scale.to(acc).contiguous(), in_shift.to(acc).contiguous()


def unfused_prologue(x: Tensor, in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> Tensor:
    """The prologue as plain PyTorch ops (`x * in_scale + in_shift` per channel, rounded to x's dtype):
    where a fused module runs its original's forward."""
    return R.prologue(x, in_scale, in_shift)


def unfused_tail(y: Tensor, residual: Tensor | None = None, activation: str | None = None) -> Tensor:
    """The tail as plain PyTorch ops after an output computed without it (`activation(y + residual)`):
    where a fused module runs its original's forward (torch.onnx.export, compile_as="original")."""
    return R.tail(y, residual, activation)


_CHANNEL_WEIGHTS = ("w1", "b1", "w2", "b2")


def _channel_args(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie):
    _checks.check_input(x)
    check_choice("tie", tie, TIE_RULES)
    check_choice("kind", kind, CHANNEL_KINDS)
    check_choice("pool", pool, CHANNEL_POOLS)
    check_choice("act", act, HIDDEN_ACTS)
    check_choice("gate", gate, GATES)
    check_choice("padding", padding, CONV_PADDINGS)
    C = x.shape[1]
    _checks.check_weight("w1", w1, x)
    if kind == "mlp":
        if w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] < 1:
            raise ValueError(f"w1 must have shape (hidden, {C}) with hidden >= 1, got {tuple(w1.shape)}")
        hidden = w1.shape[0]
        _checks.check_weight("w2", w2, x, (C, hidden))
        _checks.check_weight("b1", b1, x, (hidden,), optional=True)
        _checks.check_weight("b2", b2, x, (C,), optional=True)
    else:
        if w1.dim() != 3 or w1.shape[:2] != (1, 1) or w1.shape[2] % 2 == 0:
            raise ValueError(f"w1 (the 1D conv weight) must have shape (1, 1, k) with k odd, got {tuple(w1.shape)}")
        for name, w in (("b1", b1), ("w2", w2), ("b2", b2)):
            if w is not None:
                raise ValueError(f"{name} must be None for kind='conv', got a tensor")
    _checks.check_dtypes(x, _CHANNEL_WEIGHTS, (w1, b1, w2, b2))


def _spatial_args(x, weight, bias, maps, gate, tie, weight_name="weight", bias_name="bias", gate_name="gate"):
    check_choice("tie", tie, TIE_RULES)
    check_choice("maps", maps, SPATIAL_MAPS)
    check_choice(gate_name, gate, GATES)
    _checks.check_weight(weight_name, weight, x)
    m = spatial_in_channels(maps)
    if weight.dim() != 4 or weight.shape[:2] != (1, m) or weight.shape[2] != weight.shape[3] \
            or weight.shape[2] % 2 == 0:
        raise ValueError(f"{weight_name} must have shape (1, {m}, k, k) with k odd for maps={maps!r}, "
                         f"got {tuple(weight.shape)}")
    _checks.check_weight(bias_name, bias, x, (1,), optional=True)
    _checks.check_dtypes(x, (weight_name, bias_name), (weight, bias))


def channel_attention(x: Tensor, w1: Tensor, b1: Tensor | None = None, w2: Tensor | None = None,
                      b2: Tensor | None = None, *, kind: str = "mlp", pool: str = "avg", act: str = "relu",
                      gate: str = "sigmoid", padding: str = "zeros", tie: str = "first",
                      residual: Tensor | None = None, activation: str | None = None,
                      in_scale: Tensor | None = None, in_shift: Tensor | None = None,
                      backend: str = "auto") -> Tensor:
    """`activation(x * gate(f(pool(x))) + residual)`: f is the MLP `w2 @ act(w1 @ v + b1) + b2`
    (kind "mlp") or the 1D conv of weight `w1` (1, 1, k) along channels (kind "conv"). `tie`: where
    the gradient of the max pool goes among equal elements, "first" (one, as `AdaptiveMaxPool2d`) or
    "split" (evenly, as `amax`). The tail (a residual block's `relu(out + shortcut)`) is optional:
    `residual` None or a tensor of x's shape and dtype, `activation` None or "relu"; it runs in the
    pass that writes the output. The prologue is optional too: with `in_scale` and `in_shift` (C,)
    the block reads `x * in_scale[c] + in_shift[c]` (rounded to x's dtype) in x's place, so that an
    eval-mode BatchNorm before the block needs no pass of its own."""
    _channel_args(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie)
    if pool == "avg":  # no max: one rule, the one every backend computes itself
        tie = "first"
    if onnx_exporting():  # the exported graph is the reference math: standard operators
        _tail_args(x, residual, activation)
        _prologue_args(x, in_scale, in_shift)
        return R.channel_attention(x, w1, b1, w2, b2, kind=kind, pool=pool, act=act, gate_kind=gate,
                                   padding=padding, tie=tie, residual=residual, activation=activation,
                                   in_scale=in_scale, in_shift=in_shift)
    x = native_layout(x)
    residual, activation = _tail_args(x, residual, activation)
    return ops.call(ops.channel_attention, x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie, residual,
                    activation, *_prologue_args(x, in_scale, in_shift), backends.resolve(backend, x))[0]


def spatial_attention(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, maps: str = "max_mean",
                      gate: str = "sigmoid", tie: str = "first", residual: Tensor | None = None,
                      activation: str | None = None, in_scale: Tensor | None = None,
                      in_shift: Tensor | None = None, backend: str = "auto") -> Tensor:
    """`activation(x * gate(conv2d(maps(x), weight, bias))[n, h, w] + residual)` with a k x k conv,
    padding (k-1)//2; `tie`, the tail and the prologue as in `channel_attention`, for the max over
    channels."""
    _checks.check_input(x)
    _spatial_args(x, weight, bias, maps, gate, tie)
    if onnx_exporting():
        _tail_args(x, residual, activation)
        _prologue_args(x, in_scale, in_shift)
        return R.spatial_attention(x, weight, bias, maps=maps, gate_kind=gate, tie=tie, residual=residual,
                                   activation=activation, in_scale=in_scale, in_shift=in_shift)
    x = native_layout(x)
    residual, activation = _tail_args(x, residual, activation)
    return ops.call(ops.spatial_attention, x, weight, bias, maps, gate, tie, residual, activation,
                    *_prologue_args(x, in_scale, in_shift), backends.resolve(backend, x))[0]


def cbam(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None,
         spatial_weight: Tensor, spatial_bias: Tensor | None = None, *, kind: str = "mlp",
         pool: str = "avg+max", act: str = "relu", gate: str = "sigmoid", padding: str = "zeros",
         maps: str = "max_mean", spatial_gate: str = "sigmoid", tie: str = "first",
         residual: Tensor | None = None, activation: str | None = None, in_scale: Tensor | None = None,
         in_shift: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Channel attention then spatial attention, fused: the channel-scaled tensor is never stored.
    `tie` (as in `channel_attention`) rules both maxima; the tail and the prologue as in
    `channel_attention`."""
    _channel_args(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie)
    _spatial_args(x, spatial_weight, spatial_bias, maps, spatial_gate, tie, "spatial_weight", "spatial_bias",
                  "spatial_gate")
    if onnx_exporting():
        _tail_args(x, residual, activation)
        _prologue_args(x, in_scale, in_shift)
        return R.cbam(x, w1, b1, w2, b2, spatial_weight, spatial_bias, kind=kind, pool=pool, act=act, gate_kind=gate,
                      padding=padding, maps=maps, spatial_gate=spatial_gate, tie=tie, residual=residual,
                      activation=activation, in_scale=in_scale, in_shift=in_shift)
    x = native_layout(x)
    residual, activation = _tail_args(x, residual, activation)
    return ops.call(ops.cbam, x, w1, b1, w2, b2, spatial_weight, spatial_bias, kind, pool, act, gate, padding,
                    maps, spatial_gate, tie, residual, activation, *_prologue_args(x, in_scale, in_shift),
                    backends.resolve(backend, x))[0]


def spatial_pool(x: Tensor, *, tie: str = "first", backend: str = "auto") -> Tensor:
    """The max and mean over channels as one (N, 2, H, W) float32 tensor ([max, mean]); the max's
    gradient goes to one maximal channel (`tie` "first") or evenly to all ("split")."""
    _checks.check_input(x)
    check_choice("tie", tie, TIE_RULES)
    if onnx_exporting():
        mean, mx = R.pool_channels(x, tie)
        return torch.stack((mx, mean), 1)
    x = native_layout(x)
    return ops.call(ops.spatial_pool, x, tie, backends.resolve(backend, x))[0]


def spatial_scale(x: Tensor, t: Tensor, *, residual: Tensor | None = None, activation: str | None = None,
                  backend: str = "auto") -> Tensor:
    """`activation(x * t[:, None] + residual)` for a map t of shape (N, H, W) (the tail as in
    `channel_attention`)."""
    _checks.check_input(x)
    # t is an activation map, not a layer's weight: any floating dtype (spatial_pool's maps are float32)
    _checks.check_weight("t", t, x, (x.shape[0], x.shape[2], x.shape[3]))
    if onnx_exporting():
        _tail_args(x, residual, activation)
        return R.tail(x.to(R.acc_dtype(x.dtype)) * t[:, None], residual, activation).to(x.dtype)
    x = native_layout(x)
    residual, activation = _tail_args(x, residual, activation)
    return ops.call(ops.spatial_scale, x, t.contiguous(), residual, activation, backends.resolve(backend, x))
