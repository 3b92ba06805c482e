"""Generic fused modules for the attention blocks of models people already have (docs/contract.md §2).

Each class takes over an existing module (`source`): its children, parameters, buffers and
plain attributes under the same names, so the model's `state_dict` keeps its keys and values
and checkpoints load before or after. The forward reads the weights where they live (paths
such as ``"fc1"`` or ``"spatial.conv.conv"``) and runs the fused ops; `attnfused.convert`
builds these from timm and torchvision modules.

- `FusedChannelMLP`: ``x * gate(MLP(pool(x)))``; the MLP's layers are `nn.Linear` or 1x1
  `nn.Conv2d` (biases optional). `fc2=None` is a single layer (timm's EffectiveSE).
- `FusedChannelConv`: ``x * gate(conv1d(pool(x)))`` along channels, zero or circular padding.
- `FusedSpatial`: ``x * gate(bn(conv2d(maps(x))))``, `bn` optional.
- `FusedCbam`: channel attention, then spatial attention, in one op where it can.

A BatchNorm on the spatial conv folds into its weight and bias when it uses running
statistics (eval mode); when it uses batch statistics (training mode), the module itself
runs on the small (N, 1, H, W) logits between the `spatial_pool` and `spatial_scale` ops,
so gradients and running statistics are exactly the original's. Under `torch.onnx.export`
the original module's forward runs (standard operators only).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import _checks, functional as F
from ._options import (CHANNEL_POOLS, CONV_PADDINGS, GATES, HIDDEN_ACTS, SPATIAL_MAPS, TIE_RULES, check_choice,
                       spatial_in_channels)
from .modules import _compile_as_repr, check_backend, compiles_original, refuse_script
from .reference import functional as R

__all__ = ["FusedChannelMLP", "FusedChannelConv", "FusedSpatial", "FusedCbam", "ChannelConfig", "SpatialConfig"]


# ----------------------------------------------------------------------------- weight readers

def _dense(m: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """(weight [out, in], bias) of an `nn.Linear` or a 1x1 `nn.Conv2d` (a view, no copy)."""
    w = m.weight
    return (w if w.dim() == 2 else w.flatten(1)), m.bias


def _check_dense(m: nn.Module, path: str) -> tuple[int, int]:
    """(out, in) features of a layer `_dense` can read; ValueError naming `path` otherwise."""
    if type(m) is nn.Linear:
        return m.out_features, m.in_features
    if type(m) is nn.Conv2d:
        if m.kernel_size != (1, 1) or m.groups != 1 or m.padding not in ((0, 0), "valid"):
            raise ValueError(f"{path} must be a 1x1 Conv2d without groups or padding, got kernel_size="
                             f"{m.kernel_size}, groups={m.groups}, padding={m.padding}")
        return m.out_channels, m.in_channels
    raise ValueError(f"{path} must be an nn.Linear or a 1x1 nn.Conv2d, got {type(m).__name__}")


def _check_conv(m: nn.Module, path: str, cls, in_channels: int) -> int:
    """Kernel size of a plain stride-1 conv with one output channel and no groups."""
    if type(m) is not cls:
        raise ValueError(f"{path} must be an nn.{cls.__name__}, got {type(m).__name__}")
    k = m.kernel_size[0]
    dims = len(m.kernel_size)
    if m.in_channels != in_channels or m.out_channels != 1 or m.groups != 1 or \
            any(s != 1 for s in m.stride) or any(d != 1 for d in m.dilation) or k % 2 == 0 or \
            any(kk != k for kk in m.kernel_size):
        raise ValueError(f"{path} must map {in_channels} channel(s) to 1 with an odd {'x'.join(['k'] * dims)} "
                         f"kernel, stride 1, dilation 1 and no groups; got {m}")
    return k


def _uses_batch_stats(bn: nn.Module) -> bool:
    """What `nn.BatchNorm2d.forward` decides: batch statistics in training mode or without running ones."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _sub(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ValueError(f"no submodule {path!r} in {type(root).__name__}: {e}") from None


def _is_identity(m) -> bool:
    return m is None or type(m) is nn.Identity or (type(m) is nn.Sequential and len(m) == 0)


# ----------------------------------------------------------------------------- configurations

@dataclasses.dataclass(frozen=True)
class ChannelConfig:
    """Where a channel attention's weights live (paths from the fused module) and its options.

    kind "mlp": `w1` and `w2` name the two layers (`w2=None`: one layer, EffectiveSE);
    kind "conv": `w1` names the `nn.Conv1d(1, 1, k, bias=False)` along channels. `tie`: the max
    pool's gradient rule, "split" for code that pools with `amax`, "first" for `AdaptiveMaxPool2d`.
    """
    kind: str
    w1: str
    w2: Optional[str] = None
    pool: str = "avg"
    act: str = "relu"
    gate: str = "sigmoid"
    padding: str = "zeros"
    tie: str = "first"

    def validate(self, root: nn.Module) -> None:
        check_choice("pool", self.pool, CHANNEL_POOLS)
        check_choice("tie", self.tie, TIE_RULES)
        check_choice("act", self.act, HIDDEN_ACTS)
        check_choice("gate", self.gate, GATES)
        check_choice("padding", self.padding, CONV_PADDINGS)
        if self.kind == "mlp":
            hidden, c = _check_dense(_sub(root, self.w1), self.w1)
            if self.w2 is None:
                if hidden != c:
                    raise ValueError(f"{self.w1} (a single layer) must map C channels to C, got {c} -> {hidden}")
            else:
                out, inp = _check_dense(_sub(root, self.w2), self.w2)
                if (out, inp) != (c, hidden):
                    raise ValueError(f"{self.w2} must map {hidden} features to {c}, got {inp} -> {out}")
        elif self.kind == "conv":
            conv = _sub(root, self.w1)
            _check_conv(conv, self.w1, nn.Conv1d, 1)
            if conv.bias is not None:
                raise ValueError(f"{self.w1} must have no bias (the fused channel conv has none)")
            if self.w2 is not None:
                raise ValueError("w2 must be None for kind='conv'")
        else:
            raise ValueError(f"kind must be 'mlp' or 'conv', got {self.kind!r}")

    def tensors(self, root: nn.Module):
        """(w1, b1, w2, b2) for the channel op, views of the module's parameters."""
        if self.kind == "conv":
            return root.get_submodule(self.w1).weight, None, None, None
        w1, b1 = _dense(root.get_submodule(self.w1))
        if self.w2 is not None:
            return (w1, b1, *_dense(root.get_submodule(self.w2)))
        # One layer W v + b as the two-layer MLP [W, -W] relu([I; -I] v) + b: exact, since
        # relu(v) - relu(-v) = v (its gradient at v == 0 exactly is 0; the weights' are exact).
        eye = torch.eye(w1.shape[1], dtype=w1.dtype, device=w1.device)
        return torch.cat((eye, -eye)), None, torch.cat((w1, -w1), 1), b1

    def options(self) -> dict:
        act = "relu" if self.w2 is None else self.act
        return dict(kind=self.kind, pool=self.pool, act=act, gate=self.gate, padding=self.padding, tie=self.tie)


@dataclasses.dataclass(frozen=True)
class SpatialConfig:
    """Where a spatial attention's `nn.Conv2d` (and optional BatchNorm) live, and its options."""
    conv: str
    bn: Optional[str] = None
    maps: str = "max_mean"
    gate: str = "sigmoid"
    tie: str = "first"

    def validate(self, root: nn.Module) -> None:
        check_choice("maps", self.maps, SPATIAL_MAPS)
        check_choice("tie", self.tie, TIE_RULES)
        check_choice("gate", self.gate, GATES)
        conv = _sub(root, self.conv)
        k = _check_conv(conv, self.conv, nn.Conv2d, spatial_in_channels(self.maps))
        if conv.padding != ((k - 1) // 2,) * 2 or conv.padding_mode != "zeros":
            raise ValueError(f"{self.conv} must zero-pad (k-1)//2 = {(k - 1) // 2} on each side, got padding="
                             f"{conv.padding}, padding_mode={conv.padding_mode!r}")
        if self.bn is not None:
            bn = _sub(root, self.bn)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != 1:
                raise ValueError(f"{self.bn} must be a BatchNorm of 1 feature, got {bn}")
            extra = [n for n in ("act", "drop") if not _is_identity(getattr(bn, n, None))]
            if extra:
                raise ValueError(f"{self.bn} must apply no {' or '.join(extra)} after the normalisation")

    def uses_batch_stats(self, root: nn.Module) -> bool:
        return self.bn is not None and _uses_batch_stats(root.get_submodule(self.bn))

    def folded(self, root: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
        """(weight, bias) of the conv with an eval-mode BatchNorm folded in (differentiable)."""
        conv = root.get_submodule(self.conv)
        if self.bn is None:
            return conv.weight, conv.bias
        bn = root.get_submodule(self.bn)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        return conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype), bias.to(conv.weight.dtype)

    def apply_unfolded(self, root: nn.Module, x1: Tensor, backend: str, residual: Optional[Tensor] = None,
                       activation: Optional[str] = None) -> Tensor:
        """Spatial attention with the BatchNorm module run on the logits (batch statistics), then the
        tail (if any) in the scaling pass."""
        smaps = F.spatial_pool(x1, tie=self.tie, backend=backend)  # (N, 2, H, W): [max, mean]
        m = R.spatial_maps(smaps[:, 1], smaps[:, 0], self.maps)
        conv = root.get_submodule(self.conv)
        b = None if conv.bias is None else conv.bias.to(m.dtype)
        z = TF.conv2d(m, conv.weight.to(m.dtype), b, padding=conv.padding)
        # the BatchNorm sees the dtype it would in the original (the conv's: half models stay half)
        z = root.get_submodule(self.bn)(z.to(conv.weight.dtype))
        return F.spatial_scale(x1, R.gate(z, self.gate)[:, 0], residual=residual, activation=activation,
                               backend=backend)


# ----------------------------------------------------------------------------- modules

class _FusedVariant(nn.Module):
    """Takes over `source`'s children, parameters, buffers and public attributes."""

    __prepare_scriptable__ = refuse_script
    compile_as = "kernels"  # as attnfused.modules' blocks: set_compile_as

    def __init__(self, source: nn.Module, backend: str):
        super().__init__()
        if not isinstance(source, nn.Module):
            raise TypeError(f"source must be an nn.Module, got {type(source).__name__}")
        self._modules.update(source._modules)
        self._parameters.update(source._parameters)
        self._buffers.update(source._buffers)
        self._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
        for k, v in vars(source).items():
            if not k.startswith("_") and k != "training" and k not in vars(self):
                setattr(self, k, v)
        self.training = source.training
        self.backend = check_backend(backend)
        self.source_type = f"{type(source).__module__}.{type(source).__qualname__}"
        # The original module (sharing these children) runs under torch.onnx.export (the
        # exported graph is the unconverted model's, standard operators only) and under
        # torch.compile with compile_as="original". Kept out of _modules: no state_dict keys.
        object.__setattr__(self, "_source", source)

    @property
    def max_tie(self) -> Optional[str]:
        """The tie rule of the maxima this module takes (None: it takes none)."""
        ch, sp = getattr(self, "channel_config", None), getattr(self, "spatial_config", None)
        if sp is not None:
            return sp.tie
        return ch.tie if ch is not None and ch.pool != "avg" else None

    def _original_forward(self, x: Tensor, residual=None, activation=None, in_scale=None, in_shift=None) -> Tensor:
        """The prologue (if any), the original module's forward, then the tail (if any) in plain PyTorch."""
        self._source.training = self.training
        # not __call__: its hooks are this module's, and run once
        return F.unfused_tail(self._source.forward(F.unfused_prologue(x, in_scale, in_shift)), residual, activation)

    def _runs_original(self) -> bool:
        """Under torch.onnx.export (standard operators only), and under torch.compile with
        `compile_as="original"`, the original module's forward runs."""
        return F.onnx_exporting() or compiles_original(self)

    def extra_repr(self) -> str:
        return f"from={self.source_type}, backend={self.backend!r}" + _compile_as_repr(self)


class _FusedChannel(_FusedVariant):
    def __init__(self, source: nn.Module, config: ChannelConfig, backend: str):
        super().__init__(source, backend)
        config.validate(self)
        self.channel_config = config

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None,
                in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None) -> Tensor:
        if self._runs_original():
            return self._original_forward(x, residual, activation, in_scale, in_shift)
        cfg = self.channel_config
        return F.channel_attention(x, *cfg.tensors(self), **cfg.options(), residual=residual, activation=activation,
                                   in_scale=in_scale, in_shift=in_shift, backend=self.backend)


class FusedChannelMLP(_FusedChannel):
    """`x * gate(fc2(act(fc1(pool(x)))))` with `source`'s layers at paths `fc1`, `fc2`.

    `fc2=None`: one layer `x * gate(fc1(pool(x)))`, run as a C -> 2C -> C MLP (see
    `ChannelConfig.tensors`): exact, at four times the small math of the single layer."""

    def __init__(self, source: nn.Module, *, fc1: str = "fc1", fc2: Optional[str] = "fc2", pool: str = "avg",
                 act: str = "relu", gate: str = "sigmoid", tie: str = "first", backend: str = "auto"):
        super().__init__(source, ChannelConfig("mlp", fc1, fc2, pool=pool, act=act, gate=gate, tie=tie), backend)


class FusedChannelConv(_FusedChannel):
    """`x * gate(conv1d(pool(x)))` along channels, with `source`'s `nn.Conv1d` at path `conv`.

    The conv pads (k-1)//2 on each side as `padding` says (zeros or circular); its own
    `padding` attribute is not read (timm's CecaModule pads before an unpadded conv)."""

    def __init__(self, source: nn.Module, *, conv: str = "conv", pool: str = "avg", padding: str = "zeros",
                 gate: str = "sigmoid", tie: str = "first", backend: str = "auto"):
        super().__init__(source, ChannelConfig("conv", conv, pool=pool, gate=gate, padding=padding, tie=tie), backend)


class FusedSpatial(_FusedVariant):
    """`x * gate(bn(conv2d(maps(x))))` with `source`'s conv (and BatchNorm) at paths `conv`, `bn`."""

    def __init__(self, source: nn.Module, *, conv: str = "conv", bn: Optional[str] = None, maps: str = "max_mean",
                 gate: str = "sigmoid", tie: str = "first", backend: str = "auto"):
        super().__init__(source, backend)
        self.spatial_config = SpatialConfig(conv, bn, maps, gate, tie)
        self.spatial_config.validate(self)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None,
                in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None) -> Tensor:
        if self._runs_original():
            return self._original_forward(x, residual, activation, in_scale, in_shift)
        cfg = self.spatial_config
        if cfg.uses_batch_stats(self):
            _checks.check_input(x)
            return cfg.apply_unfolded(self, F.unfused_prologue(x, in_scale, in_shift), self.backend, residual,
                                      activation)
        w, b = cfg.folded(self)
        return F.spatial_attention(x, w, b, maps=cfg.maps, gate=cfg.gate, tie=cfg.tie, residual=residual,
                                   activation=activation, in_scale=in_scale, in_shift=in_shift, backend=self.backend)


class FusedCbam(_FusedVariant):
    """Channel attention (`channel`) then spatial attention (`spatial`) on its output."""

    def __init__(self, source: nn.Module, *, channel: ChannelConfig, spatial: SpatialConfig, backend: str = "auto"):
        super().__init__(source, backend)
        channel.validate(self)
        spatial.validate(self)
        if channel.tie != spatial.tie:
            raise ValueError(f"the channel and spatial halves must have one tie rule, got {channel.tie!r} and "
                             f"{spatial.tie!r}")
        self.channel_config, self.spatial_config = channel, spatial

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None,
                in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None) -> Tensor:
        if self._runs_original():
            return self._original_forward(x, residual, activation, in_scale, in_shift)
        ch, sp = self.channel_config, self.spatial_config
        if sp.uses_batch_stats(self):
            x1 = F.channel_attention(x, *ch.tensors(self), **ch.options(), in_scale=in_scale, in_shift=in_shift,
                                     backend=self.backend)
            return sp.apply_unfolded(self, x1, self.backend, residual, activation)
        opts = ch.options()
        sw, sb = sp.folded(self)
        return F.cbam(x, *ch.tensors(self), sw, sb, **opts, maps=sp.maps, spatial_gate=sp.gate, residual=residual,
                      activation=activation, in_scale=in_scale, in_shift=in_shift, backend=self.backend)
