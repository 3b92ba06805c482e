"""The fused blocks: the reference classes' structure (same constructor, submodules and
`state_dict`), with a forward that runs one fused op. Extra keyword: `backend="auto"`.

Every fused block's forward also takes the tail of a residual block, `block(x, residual=shortcut,
activation="relu")` = `relu(block(x) + shortcut)`, computed in the pass that writes the output
(`attnfused.functional.channel_attention`), and the prologue, `block(x, in_scale=, in_shift=)` =
`block(x * in_scale[c] + in_shift[c])`, an eval-mode BatchNorm before the block read in x's place.
"""
from __future__ import annotations

import torch

from . import _checks, functional as F
from ._options import BACKENDS, COMPILE_AS, check_choice
from .reference import modules as ref


def check_backend(backend) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    return backend


def check_compile_as(compile_as) -> str:
    check_choice("compile_as", compile_as, COMPILE_AS)
    return compile_as


def compiles_original(module) -> bool:
    """Whether `module` is being traced by torch.compile with `compile_as="original"`: its forward is
    then the original block's (the reference class's, or the converted module's), plain PyTorch that
    Inductor fuses with the layers around it. Its attribute is guarded: changing it recompiles."""
    return module.compile_as == "original" and torch.compiler.is_compiling()


def _compile_as_repr(module) -> str:
    return "" if module.compile_as == "kernels" else f", compile_as={module.compile_as!r}"


def refuse_script(module) -> None:
    """torch.jit.script calls this (as `__prepare_scriptable__`) on every module it is given: a clear
    error instead of TorchScript's own about the Python it cannot compile (backend choice, options)."""
    raise RuntimeError(
        f"torch.jit.script does not support attnfused's fused modules ({type(module).__name__}: its forward "
        f"picks a backend in Python); use torch.compile or torch.export (torch.jit.trace works too), or "
        f"script the model with the unfused modules (before attnfused.convert, or attnfused.reference)")


class _FusedMixin:
    backend: str
    # what torch.compile sees of this block: "kernels" (its fused op) or "original" (the reference
    # class's forward); set it on a whole model with attnfused.set_compile_as
    compile_as: str = "kernels"
    # where a max's gradient goes among equal elements: one of them, as the article's
    # AdaptiveMaxPool2d and torch.max send it (None: the block takes no max)
    max_tie: str | None = "first"

    __prepare_scriptable__ = refuse_script

    def _set_backend(self, backend):
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}" + _compile_as_repr(self)


class SEBlock(_FusedMixin, ref.SEBlock):
    def __init__(self, mode: str, channels: int, ratio: int, *, backend: str = "auto"):
        super().__init__(mode, channels, ratio)
        self._set_backend(backend)

    @property
    def max_tie(self):
        return None if self.mode == "avg" else "first"

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        _checks.check_input(x, self.channels)
        return F.channel_attention(x, self.fc_layers[0].weight, None, self.fc_layers[2].weight, None,
                                   kind="mlp", pool=self.mode, residual=residual, activation=activation,
                                   in_scale=in_scale, in_shift=in_shift,
                                   backend=self.backend)


class ECABlock(_FusedMixin, ref.ECABlock):
    max_tie = None

    def __init__(self, channels: int, gamma=2, b=1, *, backend: str = "auto"):
        super().__init__(channels, gamma, b)
        self._set_backend(backend)

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        _checks.check_input(x, self.channels)
        return F.channel_attention(x, self.conv.weight, kind="conv", pool="avg", residual=residual,
                                   activation=activation, in_scale=in_scale, in_shift=in_shift,
                                   backend=self.backend)


class ChannelAttentionFC(_FusedMixin, ref.ChannelAttentionFC):
    def __init__(self, channels: int, ratio: int, *, backend: str = "auto"):
        super().__init__(channels, ratio)
        self._set_backend(backend)

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        _checks.check_input(x, self.channels)
        return F.channel_attention(x, self.fc_layers[0].weight, None, self.fc_layers[2].weight, None,
                                   kind="mlp", pool="avg+max", residual=residual, activation=activation,
                                   in_scale=in_scale, in_shift=in_shift,
                                   backend=self.backend)


class ChannelAttentionConv(_FusedMixin, ref.ChannelAttentionConv):
    def __init__(self, channels: int, gamma=2, b=1, *, backend: str = "auto"):
        super().__init__(channels, gamma, b)
        self._set_backend(backend)

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        _checks.check_input(x, self.channels)
        return F.channel_attention(x, self.conv.weight, kind="conv", pool="avg+max", residual=residual,
                                   activation=activation, in_scale=in_scale, in_shift=in_shift,
                                   backend=self.backend)


class SpatialAttention(_FusedMixin, ref.SpatialAttention):
    def __init__(self, k: int, *, backend: str = "auto"):
        super().__init__(k)
        self._set_backend(backend)

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        _checks.check_input(x)
        return F.spatial_attention(x, self.conv.weight, maps="max_mean", residual=residual, activation=activation,
                                   in_scale=in_scale, in_shift=in_shift,
                                   backend=self.backend)


class CBAMBlock(_FusedMixin, ref.CBAMBlock):
    _channel_classes = {"FC": ChannelAttentionFC, "Conv": ChannelAttentionConv}
    _spatial_class = SpatialAttention

    def __init__(self, channel_attention_mode: str, spatial_attention_kernel_size: int, channels: int = None,
                 ratio: int = None, gamma: int = None, b: int = None, *, backend: str = "auto"):
        super().__init__(channel_attention_mode, spatial_attention_kernel_size, channels, ratio, gamma, b)
        self._set_backend(backend)
        for child in (self.channel_attention_block, self.spatial_attention_block):
            child.backend = self.backend

    def extra_repr(self) -> str:
        return (f"channel_attention_mode={self.channel_attention_mode!r}, backend={self.backend!r}"
                + _compile_as_repr(self))

    def forward(self, x, residual=None, activation=None, in_scale=None, in_shift=None):
        if compiles_original(self):  # (its children are fused modules: set_compile_as sets them alike)
            return F.unfused_tail(super().forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)
        ch = self.channel_attention_block
        _checks.check_input(x, ch.channels)
        if self.channel_attention_mode == "FC":
            w1, w2, kind = ch.fc_layers[0].weight, ch.fc_layers[2].weight, "mlp"
        else:
            w1, w2, kind = ch.conv.weight, None, "conv"
        return F.cbam(x, w1, None, w2, None, self.spatial_attention_block.conv.weight, kind=kind,
                      pool="avg+max", maps="max_mean", residual=residual, activation=activation, in_scale=in_scale,
                      in_shift=in_shift, backend=self.backend)
