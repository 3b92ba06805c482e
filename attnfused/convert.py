"""`attnfused.convert`: swap the attention modules of an existing model for fused ones.

Supported (exact types; a subclass may change the forward, so it is left alone):
timm `SEModule`, `EffectiveSEModule`, `EcaModule`, `CecaModule`, `CbamModule`,
`LightCbamModule` (and their halves `ChannelAttn`, `LightChannelAttn`, `SpatialAttn`,
`LightSpatialAttn` where they stand alone), timm's EfficientNet `SqueezeExcite`, torchvision's
`ops.SqueezeExcitation`, and attnfused's reference classes (to their `attnfused.<Name>` twins).
The fused module keeps the original's parameters and buffers under the same names: the
model's `state_dict` is unchanged, so checkpoints load before or after. A configuration the
fused ops cannot run (another gate or activation, a norm layer in the MLP, ...) is left in
place, with the reason in the report. Hooks registered on a replaced module run on its fused
replacement (their handles still remove them); a module with hooks on its submodules stays, as
the fused forward does not call them. A module used at several places is replaced by one fused
module, shared the same way.

Residual blocks (timm's ResNet `Bottleneck` and `BasicBlock`, torchvision's `Bottleneck` with the
attention after bn3) whose attention was converted also get the block's tail, `relu(out + shortcut)`,
computed in the attention's output pass (`fuse_tail`, `attnfused.residual`), and on request
(`fuse_norm`) the eval-mode BatchNorm before the attention read by the attention's passes: the
report has an entry for each such block too.

timm and torchvision are not dependencies: their classes are looked up only when the package
has already been imported (a model made of their modules has imported it).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
from typing import Callable, Optional

import torch
from torch import nn

from . import modules as fused_modules, residual
from .modules import check_backend, check_compile_as
from .reference import modules as ref
from .variants import (ChannelConfig, FusedCbam, FusedChannelConv, FusedChannelMLP, FusedSpatial, SpatialConfig,
                       _FusedVariant)

__all__ = ["convert", "set_compile_as", "ConvertEntry", "Unsupported"]


class Unsupported(Exception):
    """A module of a supported type whose configuration the fused ops cannot run."""


@dataclasses.dataclass(frozen=True)
class ConvertEntry:
    """One attention module `convert` met (or, `tail` true, one residual block whose tail it could fuse):
    where, what, and what became of it."""
    path: str  # "" for the model itself
    type: str  # qualified class name of the original module
    replaced_by: Optional[str]  # class name of the fused module (a block's new class), or None when left in place
    reason: str = ""  # why it was left in place
    tie: Optional[str] = None  # the fused module's max-gradient rule ("first", "split"; None: no max)
    tail: bool = False  # an entry of a residual block (fuse_tail), not of an attention module
    fuses: str = ""  # a residual block's entry: what its new forward fuses (the tail; its BatchNorm)

    @property
    def converted(self) -> bool:
        return self.replaced_by is not None

    def __str__(self) -> str:
        where = self.path or "<model>"
        if self.converted:
            rule = f" (max gradient: {_TIE_WORDS[self.tie]})" if self.tie else ""
            fuses = f" ({self.fuses})" if self.fuses else ""
            return f"{where}: {self.type} -> {self.replaced_by}{rule}{fuses}"
        return f"{where}: {self.type} left in place: {self.reason}"


_TIE_WORDS = {"first": "to one maximal element, as torch.max", "split": "split among ties, as amax"}


# ----------------------------------------------------------------------------- layer kinds

def _classes(spec: dict[str, tuple[str, ...]]) -> tuple[type, ...]:
    """Classes `module: (names)` of the packages already imported (no import of timm here)."""
    found = []
    for mod_name, names in spec.items():
        if mod_name.split(".")[0] not in sys.modules and not mod_name.startswith("torch."):
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


_GATE_CLASSES = {
    "sigmoid": {"torch.nn": ("Sigmoid",), "timm.layers.activations": ("Sigmoid",)},
    "hardsigmoid": {"torch.nn": ("Hardsigmoid",), "timm.layers.activations": ("HardSigmoid",),
                    "timm.layers.activations_me": ("HardSigmoidMe",)},
}
_ACT_CLASSES = {
    "relu": {"torch.nn": ("ReLU",)},
    "silu": {"torch.nn": ("SiLU",), "timm.layers.activations": ("Swish",), "timm.layers.activations_me": ("SwishMe",)},
}


def _kind(m: nn.Module, table: dict, what: str) -> str:
    for name, spec in table.items():
        if type(m) in _classes(spec):
            return name
    raise Unsupported(f"{what} {type(m).__name__} is not one of {list(table)}")


def gate_kind(m: nn.Module) -> str:
    """"sigmoid" or "hardsigmoid" for a gate layer; Unsupported for anything else."""
    return _kind(m, _GATE_CLASSES, "gate")


def act_kind(m: nn.Module) -> str:
    """"relu" or "silu" for a hidden activation layer; Unsupported for anything else."""
    return _kind(m, _ACT_CLASSES, "activation")


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise Unsupported(reason)


# ----------------------------------------------------------------------------- adapters
# Each takes the original module and the backend, and returns the fused module or raises
# Unsupported. They state what the original's forward computes; the variants check the layers.

# timm takes its maxima with `amax`, whose gradient is split evenly among tied elements
_AMAX = "split"


def _se_module(m, backend):  # timm.layers.SEModule
    _require(type(m.bn) is nn.Identity, f"norm_layer on the hidden vector ({type(m.bn).__name__}) is not supported")
    return FusedChannelMLP(m, fc1="fc1", fc2="fc2", pool="mix" if m.add_maxpool else "avg", act=act_kind(m.act),
                           gate=gate_kind(m.gate), tie=_AMAX, backend=backend)


def _effective_se(m, backend):  # timm.layers.EffectiveSEModule: one 1x1 conv with bias
    return FusedChannelMLP(m, fc1="fc", fc2=None, pool="mix" if m.add_maxpool else "avg", gate=gate_kind(m.gate),
                           tie=_AMAX, backend=backend)


def _eca_conv_padding(conv: nn.Conv1d) -> str:
    p = (conv.kernel_size[0] - 1) // 2
    _require(conv.padding == (p,), f"conv padding {conv.padding} is not (k-1)//2 = {p}")
    _require(conv.padding_mode in ("zeros", "circular"), f"conv padding_mode {conv.padding_mode!r} is not supported")
    return conv.padding_mode


def _eca(m, backend):  # timm.layers.EcaModule
    _require(m.conv2 is None, "use_mlp (a conv, an activation and a second conv) is not supported")
    _require(type(m.conv) is nn.Conv1d, f"conv {type(m.conv).__name__} is not an nn.Conv1d")
    _require(m.conv.bias is None, "a conv bias is not supported")
    return FusedChannelConv(m, conv="conv", pool="avg", padding=_eca_conv_padding(m.conv), gate=gate_kind(m.gate),
                            backend=backend)


def _ceca(m, backend):  # timm.layers.CecaModule: circular F.pad of m.padding, then an unpadded conv
    _require(type(m.conv) is nn.Conv1d, f"conv {type(m.conv).__name__} is not an nn.Conv1d")
    _require(m.conv.bias is None, "a conv bias (act_layer set) is not supported")
    k = m.conv.kernel_size[0]
    _require(m.conv.padding == (0,) and m.padding == (k - 1) // 2,
             f"circular padding {m.padding} with conv padding {m.conv.padding} is not (k-1)//2 = {(k - 1) // 2}")
    return FusedChannelConv(m, conv="conv", pool="avg", padding="circular", gate=gate_kind(m.gate), backend=backend)


def _channel_attn_config(m, prefix: str, light: bool) -> ChannelConfig:
    """timm ChannelAttn: gate(mlp(avg) + mlp(max)); LightChannelAttn: sigmoid(mlp(avg/2 + max/2))
    (its forward calls F.sigmoid whatever its gate layer)."""
    return ChannelConfig("mlp", prefix + "fc1", prefix + "fc2", pool="mix" if light else "avg+max",
                         act=act_kind(m.act), gate="sigmoid" if light else gate_kind(m.gate), tie=_AMAX)


def _spatial_attn_config(m, prefix: str, light: bool) -> SpatialConfig:
    """timm SpatialAttn: gate(bn(conv([mean, max]))); LightSpatialAttn: one map mean/2 + max/2.
    The conv is a timm ConvNormAct: .conv, .bn (BatchNormAct2d without act, or empty), .aa."""
    cna = m.conv
    _require(getattr(cna, "aa", None) is None, "an anti-aliasing layer after the spatial conv is not supported")
    _require(set(cna._modules) <= {"conv", "bn", "aa"}, f"extra layers in the spatial ConvNormAct: "
             f"{sorted(set(cna._modules) - {'conv', 'bn', 'aa'})}")
    bn = None if type(cna.bn) is nn.Sequential and len(cna.bn) == 0 else prefix + "conv.bn"
    return SpatialConfig(prefix + "conv.conv", bn, maps="mix" if light else "mean_max", gate=gate_kind(m.gate),
                         tie=_AMAX)


def _timm_cbam(light: bool):
    def adapt(m, backend):  # timm.layers.CbamModule / LightCbamModule
        want_c, want_s = ("LightChannelAttn", "LightSpatialAttn") if light else ("ChannelAttn", "SpatialAttn")
        _require(type(m.channel).__name__ == want_c and type(m.spatial).__name__ == want_s,
                 f"halves {type(m.channel).__name__}, {type(m.spatial).__name__} are not {want_c}, {want_s}")
        return FusedCbam(m, channel=_channel_attn_config(m.channel, "channel.", light),
                         spatial=_spatial_attn_config(m.spatial, "spatial.", light), backend=backend)
    return adapt


def _timm_channel_attn(light: bool):
    def adapt(m, backend):
        cfg = _channel_attn_config(m, "", light)
        return FusedChannelMLP(m, fc1=cfg.w1, fc2=cfg.w2, pool=cfg.pool, act=cfg.act, gate=cfg.gate, tie=cfg.tie,
                               backend=backend)
    return adapt


def _timm_spatial_attn(light: bool):
    def adapt(m, backend):
        cfg = _spatial_attn_config(m, "", light)
        return FusedSpatial(m, conv=cfg.conv, bn=cfg.bn, maps=cfg.maps, gate=cfg.gate, tie=cfg.tie, backend=backend)
    return adapt


def _efficientnet_se(m, backend):  # timm.models._efficientnet_blocks.SqueezeExcite
    return FusedChannelMLP(m, fc1="conv_reduce", fc2="conv_expand", pool="avg", act=act_kind(m.act1),
                           gate=gate_kind(m.gate), backend=backend)


def _torchvision_se(m, backend):  # torchvision.ops.SqueezeExcitation
    _require(type(m.avgpool) is nn.AdaptiveAvgPool2d and m.avgpool.output_size in (1, (1, 1)),
             f"pooling {m.avgpool} is not a global average")
    return FusedChannelMLP(m, fc1="fc1", fc2="fc2", pool="avg", act=act_kind(m.activation),
                           gate=gate_kind(m.scale_activation), backend=backend)


# attnfused's reference classes -> their fused twins, built with the same constructor
# arguments (on the meta device: no memory, no draw from the RNG), then given the
# original's own tensors.
_REFERENCE_ARGS: dict[type, Callable] = {
    ref.SEBlock: lambda m: (m.mode, m.channels, m.ratio),
    ref.ECABlock: lambda m: (m.channels, m.gamma, m.b),
    ref.ChannelAttentionFC: lambda m: (m.channels, m.ratio),
    ref.ChannelAttentionConv: lambda m: (m.channels, m.gamma, m.b),
    ref.SpatialAttention: lambda m: (m.k,),
    ref.CBAMBlock: lambda m: (m.channel_attention_mode, m.spatial_attention_block.k,
                              m.channel_attention_block.channels, getattr(m.channel_attention_block, "ratio", None),
                              getattr(m.channel_attention_block, "gamma", None),
                              getattr(m.channel_attention_block, "b", None)),
}


def _reference(m, backend):
    cls = getattr(fused_modules, type(m).__name__)
    with torch.device("meta"):
        fused = cls(*_REFERENCE_ARGS[type(m)](m), backend=backend)
    theirs, ours = dict(m.named_modules()), dict(fused.named_modules())
    _require(theirs.keys() == ours.keys(), f"submodules {sorted(theirs)} differ from the class's {sorted(ours)}")
    for name, sub in theirs.items():
        # the fused halves subclass the reference ones; every other layer must be the same class
        _require(isinstance(ours[name], type(sub)) and (type(sub) in _REFERENCE_ARGS or type(ours[name]) is type(sub)),
                 f"submodule {name or '<self>'} is a {type(sub).__name__}, the class has {type(ours[name]).__name__}")
        mine = ours[name]
        for table in ("_parameters", "_buffers"):
            src, dst = getattr(sub, table), getattr(mine, table)
            _require(src.keys() == dst.keys(), f"{name or '<self>'} holds {sorted(src)}, the class {sorted(dst)}")
            for key, t in src.items():
                shapes = [None if v is None else tuple(v.shape) for v in (t, dst[key])]
                _require(shapes[0] == shapes[1], f"{name}.{key} has shape {shapes[0]}, the class {shapes[1]}")
                dst[key] = t
        mine.training = sub.training
    return fused


def _adapters() -> dict[type, Callable]:
    table: dict[type, Callable] = {cls: _reference for cls in _REFERENCE_ARGS}
    specs = [
        ("timm.layers.squeeze_excite", "SEModule", _se_module),
        ("timm.layers.squeeze_excite", "EffectiveSEModule", _effective_se),
        ("timm.layers.eca", "EcaModule", _eca),
        ("timm.layers.eca", "CecaModule", _ceca),
        ("timm.layers.cbam", "CbamModule", _timm_cbam(light=False)),
        ("timm.layers.cbam", "LightCbamModule", _timm_cbam(light=True)),
        ("timm.layers.cbam", "ChannelAttn", _timm_channel_attn(light=False)),
        ("timm.layers.cbam", "LightChannelAttn", _timm_channel_attn(light=True)),
        ("timm.layers.cbam", "SpatialAttn", _timm_spatial_attn(light=False)),
        ("timm.layers.cbam", "LightSpatialAttn", _timm_spatial_attn(light=True)),
        ("timm.models._efficientnet_blocks", "SqueezeExcite", _efficientnet_se),
        ("torchvision.ops.misc", "SqueezeExcitation", _torchvision_se),
    ]
    for mod_name, cls_name, adapt in specs:
        for cls in _classes({mod_name: (cls_name,)}):
            table[cls] = adapt
    return table


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


# nn.Module's hook tables (forward, backward, state_dict); a replacement takes the original's over
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
                "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _check_no_hooked_submodule(m: nn.Module) -> None:
    """The fused forward never calls the original's submodules: hooks on them would silently stop
    running (an old-style weight_norm, a feature-extraction hook), so such a module stays."""
    for name, sub in m.named_modules():
        hooked = [t for t in _HOOK_TABLES if name and getattr(sub, t, None)]
        _require(not hooked, f"its submodule {name!r} has hooks ({', '.join(hooked)}) that the fused module "
                             f"would not run")


def _take_hooks(original: nn.Module, fused: nn.Module) -> None:
    """`fused` runs `original`'s hooks: the very tables, so the handles the user holds still remove them."""
    for table in _HOOK_TABLES:
        object.__setattr__(fused, table, getattr(original, table))


# ----------------------------------------------------------------------------- convert

def set_compile_as(model: nn.Module, compile_as: str) -> nn.Module:
    """What torch.compile sees of every fused module in `model` (the model itself included):
    "kernels" (the default) traces each block as its fused op; "original" traces the forward of the
    block it replaced (attnfused.reference's class, or the converted timm/torchvision module), plain
    PyTorch that Inductor fuses with the layers around it (the BatchNorm before a block, the residual
    add and activation after it). Eager calls run the fused kernels either way. Returns `model`."""
    check_compile_as(compile_as)
    for m in model.modules():
        if isinstance(m, (_FusedVariant, fused_modules._FusedMixin)):
            m.compile_as = compile_as
    return model


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False, report: bool = False,
            include: Optional[Callable[[str, nn.Module], bool]] = None, compile_as: str = "kernels",
            fuse_tail: bool = True, fuse_norm: bool = False):
    """Swap every supported attention module of `model` for a fused one with the same weights.

    Args:
        model: any `nn.Module` (the model itself may be an attention module).
        backend: the fused modules' backend, "auto" (docs/contract.md §3) or a name.
        inplace: convert `model` itself (the fused modules hold its very parameters, so an
            optimizer built on them keeps working); otherwise a deep copy is converted.
        report: also return the list of `ConvertEntry`, one per attention module met:
            its path, type, and what replaced it or why nothing did.
        include: `include(path, module)` says whether to convert a supported module (default:
            all). Those it turns down stay in place, with their children still visited, e.g.
            `include=lambda path, m: "cbam" in type(m).__name__.lower()` converts CBAM blocks only
            (on a GPU today the fused SE and ECA blocks are slower than eager: see the README).
        compile_as: what torch.compile sees of the fused modules (`set_compile_as`): "kernels",
            or "original" for models that compile faster with their own attention code.
        fuse_tail: residual blocks whose attention was converted (timm's ResNet `Bottleneck` and
            `BasicBlock`, torchvision's `Bottleneck` with the attention after bn3) hand their
            `relu(out + shortcut)` to the fused module, which computes it in the pass that writes its
            output (`attnfused.residual`); the report lists each such block, what it fuses, and why
            one was not.
        fuse_norm: those blocks also hand the BatchNorm before the attention (bn3, bn2), while it is
            in eval mode, to the fused module as its prologue (`in_scale`, `in_shift`), which reads
            the conv's output through it. Off by default: on the CPU measured so far it is no faster
            than the BatchNorm's own pass (README, Results), and the GPU backends still form it in a
            pass of their own.

    Returns:
        the converted model, or `(model, entries)` when `report` is true.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    check_compile_as(compile_as)
    for name, flag in (("fuse_tail", fuse_tail), ("fuse_norm", fuse_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (path, module) -> bool or None, got {type(include).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    adapters = _adapters()
    entries: list[ConvertEntry] = []
    # a module met before (used at several places): (what replaced it, its entry, if any)
    seen: dict[int, tuple[nn.Module, Optional[ConvertEntry]]] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        """`m` converted (the fused module, or `m` with its children converted)."""
        if id(m) in seen:  # shared: the one replacement everywhere, so it stays shared
            new, entry = seen[id(m)]
            if entry is not None:
                entries.append(dataclasses.replace(entry, path=path))
            return new
        new, entry = convert_one(m, path)
        seen[id(m)] = new, entry
        return new

    def convert_one(m: nn.Module, path: str) -> tuple[nn.Module, Optional[ConvertEntry]]:
        """(what replaces `m`, its entry); a module left in place is reported before its children."""
        adapt = adapters.get(type(m))
        entry = None
        if adapt is not None and include is not None and not include(path, m):
            entry = ConvertEntry(path, _qualname(type(m)), None, "turned down by include")
        elif adapt is not None:
            try:
                _check_no_hooked_submodule(m)
                fused = set_compile_as(adapt(m, backend), compile_as)
            except (Unsupported, ValueError, TypeError, AttributeError) as e:
                entry = ConvertEntry(path, _qualname(type(m)), None, str(e))
            else:
                _take_hooks(m, fused)
                entry = ConvertEntry(path, _qualname(type(m)), type(fused).__name__, tie=fused.max_tie)
                entries.append(entry)
                return fused, entry
        if entry is not None:
            entries.append(entry)
        if isinstance(m, (_FusedVariant, fused_modules._FusedMixin)):
            return m, entry  # already fused
        for name, child in list(m._modules.items()):
            if child is not None:
                new = visit(child, f"{path}.{name}" if path else name)
                if new is not child:
                    m._modules[name] = new
        return m, entry

    model = visit(model, "")
    if fuse_tail:
        for path, cls, new, why, fuses in residual.fuse_tail(model, fuse_norm):
            entries.append(ConvertEntry(path, _qualname(cls), new, f"tail not fused: {why}" if why else "",
                                        tail=True, fuses=fuses))
    return (model, entries) if report else model
