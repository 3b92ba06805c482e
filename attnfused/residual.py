"""Residual blocks whose attention module also computes the block's tail.

A ResNet block ends `relu(attention(out) + shortcut)`: eager PyTorch runs the add and the relu as two
more passes over an activation-sized tensor. `attnfused.convert(model, fuse_tail=True)` gives each such
block whose attention it converted a forward that hands the shortcut and the relu to the fused module
(`attention(out, residual=shortcut, activation="relu")`), which computes them in the pass that writes
its output. With `convert(..., fuse_norm=True)`, while the BatchNorm that feeds the attention module
(bn3, bn2) is in eval mode (running statistics), the forward also hands that BatchNorm's per-channel
affine to the fused module as its prologue (`in_scale`, `in_shift`), which reads the conv's output
through it, so that the BatchNorm needs no pass of its own. In training mode the BatchNorm runs as
it is. Only the block's class changes, to a subclass defined here with that forward (and an
attribute of the block says whether it reads the BatchNorm so): every submodule, parameter and
buffer stays where it was (the `state_dict` is unchanged), and the model still deep-copies, pickles
and `torch.save`s (a subclass is made on first use, also when pickle asks for it by name in a new
process).

The blocks (exact types; a subclass of them may change the forward, so it is left alone):

- timm's ResNet `Bottleneck` and `BasicBlock` (`timm.models.resnet`), with any attention layer
  `convert` fuses as `se`, `act3` / `act2` an `nn.ReLU`, and `drop_path` None, `nn.Identity` or timm's
  `DropPath`: while a DropPath drops (training, drop_prob > 0) the block runs its own code for that
  call (the add and relu unfused, the random draws timm's own);
- torchvision's ResNet `Bottleneck` whose `bn3` is `nn.Sequential(BatchNorm2d, attention)` (the
  placement `bench.e2e` uses), `relu` an `nn.ReLU`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import modules as fused_modules
from .variants import _FusedVariant

__all__ = ["fuse_tail"]


def is_fused_attention(m) -> bool:
    return isinstance(m, (_FusedVariant, fused_modules._FusedMixin))


def _drop_path_is_off(dp) -> bool:
    """Whether a block's drop_path leaves its input as it is this call (timm's DropPath: not training,
    or drop_prob 0)."""
    return dp is None or type(dp) is nn.Identity or not dp.training or getattr(dp, "drop_prob", 1.0) == 0.0


def batchnorm_affine(bn: nn.Module) -> Optional[tuple[Tensor, Tensor]]:
    """An eval-mode `nn.BatchNorm2d`'s output as a per-channel affine of its input, (scale, shift) in
    float32, or float64 for a float64 BatchNorm (`weight / sqrt(running_var + eps)`, `bias -
    running_mean * scale`; gradients flow to the weight and bias), or None where it normalises by
    batch statistics (training mode, or no running statistics) or is not a plain BatchNorm2d."""
    if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None:
        return None
    acc = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * scale
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = bn.bias.to(acc) + shift
    return scale, shift


# the attribute convert sets on a block it gives the fused forward: whether that forward hands an
# eval-mode BatchNorm to the attention as its prologue (convert's `fuse_norm`)
FUSE_NORM = "_attnfused_fuse_norm"


def _norm_attend(self, bn: nn.Module, attn: nn.Module, x: Tensor, **tail) -> Tensor:
    """`attn(bn(x), **tail)`, the BatchNorm read by attn's passes (its prologue) while in eval mode."""
    affine = batchnorm_affine(bn) if getattr(self, FUSE_NORM, False) else None
    if affine is None:
        return attn(bn(x), **tail)
    return attn(x, **tail, in_scale=affine[0], in_shift=affine[1])


def _timm_tail(self, x, shortcut, bn, attn, act):
    """timm's `x = bn(x); x = attn(x); x = drop_path(x); x += shortcut; x = act(x)`, the tail inside
    attn's pass unless drop_path drops this call (and, with fuse_norm, an eval-mode bn read as attn's
    prologue)."""
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    if not _drop_path_is_off(self.drop_path):
        x = self.drop_path(_norm_attend(self, bn, attn, x))
        x += shortcut
        return act(x)
    # `x += shortcut` rounds the sum to x's dtype: so does the fused op, given the shortcut in it
    return _norm_attend(self, bn, attn, x, residual=shortcut.to(x.dtype), activation="relu")


def _timm_bottleneck_forward(self, x):
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    return _timm_tail(self, self.conv3(x), shortcut, self.bn3, self.se, self.act3)


def _timm_basic_forward(self, x):
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return _timm_tail(self, self.conv2(x), shortcut, self.bn2, self.se, self.act2)


def _torchvision_bottleneck_forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    if self.downsample is not None:
        identity = self.downsample(x)
    out = self.conv3(out)
    return _norm_attend(self, self.bn3[0], self.bn3[1], out, residual=identity.to(out.dtype), activation="relu")


def _timm_check(attn: str, act: str) -> Callable[[nn.Module], Optional[str]]:
    def check(block):
        if not is_fused_attention(getattr(block, attn, None)):
            return f"its attention module {attn!r} was not converted"
        if type(getattr(block, act)) is not nn.ReLU:
            return f"its activation {act!r} is {type(getattr(block, act)).__name__}, not nn.ReLU"
        dp = block.drop_path
        if not (dp is None or type(dp) is nn.Identity or type(dp).__name__ == "DropPath"):
            return f"its drop_path is a {type(dp).__name__}"
        return None
    return check


def _torchvision_check(block) -> Optional[str]:
    bn3 = block.bn3
    if type(bn3) is not nn.Sequential or len(bn3) != 2 or not isinstance(bn3[0], nn.BatchNorm2d):
        return "its bn3 is not nn.Sequential(BatchNorm2d, attention)"
    if not is_fused_attention(bn3[1]):
        return "its attention module 'bn3.1' was not converted"
    if type(block.relu) is not nn.ReLU:
        return f"its relu is {type(block.relu).__name__}, not nn.ReLU"
    return None


@dataclasses.dataclass(frozen=True)
class _Block:
    module: str  # where the original class lives
    cls: str
    forward: Callable
    check: Callable[[nn.Module], Optional[str]]  # why a block cannot take the fused forward (None: it can)
    attention: str  # the path of its attention module
    norm: str  # the path of the BatchNorm before it (read as its prologue in eval mode)


_BLOCKS = {
    "TimmBottleneckTail": _Block("timm.models.resnet", "Bottleneck", _timm_bottleneck_forward,
                                 _timm_check("se", "act3"), "se", "bn3"),
    "TimmBasicBlockTail": _Block("timm.models.resnet", "BasicBlock", _timm_basic_forward,
                                 _timm_check("se", "act2"), "se", "bn2"),
    "TorchvisionBottleneckTail": _Block("torchvision.models.resnet", "Bottleneck", _torchvision_bottleneck_forward,
                                        _torchvision_check, "bn3.1", "bn3.0"),
}


def _tail_class(name: str) -> type:
    """The subclass `name` of `_BLOCKS`, made once (importing the original's package)."""
    cls = globals().get(name)
    if cls is None:
        spec = _BLOCKS[name]
        base = getattr(importlib.import_module(spec.module), spec.cls)
        doc = f"{spec.module}.{spec.cls} with the tail (residual add, relu) in its attention module's output pass."
        cls = type(name, (base,), {"forward": spec.forward, "__module__": __name__, "__qualname__": name,
                                   "__doc__": doc})
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # pickle finds the block classes by name, also in a new process
    if name in _BLOCKS:
        return _tail_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _originals() -> dict[type, str]:
    """The supported block classes of the packages already imported -> their subclass's name."""
    from .convert import _classes  # (convert imports this module)
    return {cls: name for name, spec in _BLOCKS.items() for cls in _classes({spec.module: (spec.cls,)})}


def fuse_tail(model: nn.Module, fuse_norm: bool = False) -> list[tuple[str, type, Optional[str], str, str]]:
    """Gives every supported block of `model` (whose attention was converted) the fused forward, in
    place; with `fuse_norm`, that forward reads an eval-mode BatchNorm before the attention as its
    prologue (an attribute of the block says so: it pickles with it). Returns (path, the block's
    original class, the new class name or None, why not, what the new forward fuses) per supported
    block met."""
    originals = _originals()
    out = []
    for path, m in model.named_modules():
        name = originals.get(type(m))
        if name is None:
            continue
        spec = _BLOCKS[name]
        why = spec.check(m)
        norm = m.get_submodule(spec.norm)
        read = fuse_norm and type(norm) is nn.BatchNorm2d
        fuses = "tail fused" + (f"; {spec.norm} in eval mode as the prologue" if read
                                else f"; {spec.norm} ({type(norm).__name__}) runs as it is")
        out.append((path, type(m), None if why else name, why or "", "" if why else fuses))
        if why is None:
            m.__class__ = _tail_class(name)
            setattr(m, FUSE_NORM, fuse_norm)
    return out
