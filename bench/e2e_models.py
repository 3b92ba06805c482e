"""The models and providers `python -m bench.e2e` times.

Models: torchvision's ResNet-50 with an attention block after every bottleneck's bn3 (`tv` family,
attnfused's reference blocks), and timm models built with `timm.create_model(..., pretrained=False)`
(`timm` family, timm's own attention layers). Both are converted with `attnfused.convert`.

Providers: how a model runs. Each is the original or the converted model, eager or under
`torch.compile` in some mode. A provider may pass extra keyword arguments to `attnfused.convert`
(`convert_kwargs`), so a variant of the conversion is one more entry in `PROVIDERS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from . import blocks

# ----------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    name: str
    fused: bool  # runs the converted model (else the original)
    compile_mode: str | None = None  # torch.compile's mode ("default", "reduce-overhead", ...); None: eager
    gpu_only: bool = False  # CUDA graphs: nothing to gain (nor to run) on CPU
    convert_kwargs: tuple[tuple[str, object], ...] = ()  # extra keyword arguments of attnfused.convert
    default: bool = True  # run when --providers is not given

    @property
    def compiles(self) -> bool:
        return self.compile_mode is not None

    def unavailable(self, device: torch.device) -> str | None:
        if self.gpu_only and device.type != "cuda":
            return f"torch.compile(mode={self.compile_mode!r}) records CUDA graphs: GPU only"
        return None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("eager", fused=False),
    Provider("compile", fused=False, compile_mode="default"),
    Provider("fused", fused=True),
    Provider("fused+compile", fused=True, compile_mode="default"),
    # torch.compile sees the converted blocks' original code (attnfused.set_compile_as)
    Provider("fused+compile-orig", fused=True, compile_mode="default", convert_kwargs=(("compile_as", "original"),)),
    Provider("compile-ro", fused=False, compile_mode="reduce-overhead", gpu_only=True),
    Provider("fused+compile-ro", fused=True, compile_mode="reduce-overhead", gpu_only=True),
    # the residual blocks keep their own add and relu (what the tail in the attention's pass saves)
    Provider("fused-untailed", fused=True, convert_kwargs=(("fuse_tail", False),), default=False),
    Provider("fused+compile-untailed", fused=True, compile_mode="default", convert_kwargs=(("fuse_tail", False),),
             default=False),
    # the eval-mode BatchNorm before the attention read as its prologue (convert's fuse_norm)
    Provider("fused-bn-prologue", fused=True, convert_kwargs=(("fuse_norm", True),), default=False),
    Provider("fused+compile-bn-prologue", fused=True, compile_mode="default", convert_kwargs=(("fuse_norm", True),),
             default=False),
)}
DEFAULT_PROVIDERS = [name for name, p in PROVIDERS.items() if p.default]


def baseline(p: Provider) -> str:
    """The provider that runs the original model the same way (fused+compile -> compile): what a
    user who does not convert would run instead."""
    return next((q.name for q in PROVIDERS.values() if not q.fused and q.compile_mode == p.compile_mode), "eager")


def with_convert_kwargs(p: Provider, extra: dict) -> Provider:
    """`p` with `extra` added to its convert keyword arguments (its own win where both name one)."""
    if not p.fused or not extra:
        return p
    return dataclasses.replace(p, convert_kwargs=tuple(sorted({**extra, **dict(p.convert_kwargs)}.items())))


# ----------------------------------------------------------------------------- models

# torchvision ResNet-50: the attention of each variant, as a bench block (None: the plain network)
TV_ATTN = {"plain": None, "se": "se", "eca": "eca", "cbam": "cbam_fc"}

# timm models: the name in the results -> (timm.create_model name, its keyword arguments, attention, why)
TIMM = {
    "seresnet50": ("seresnet50", {}, "se", ""),
    "ecaresnet50d": ("ecaresnet50d", {}, "eca", ""),
    "efficientnet_b0": ("efficientnet_b0", {}, "se", ""),
    "resnet50_cbam": ("resnet50", {"block_args": {"attn_layer": "cbam"}}, "cbam", ""),
}


@dataclass
class ModelSpec:
    name: str  # the `model` column
    family: str  # "tv" or "timm"
    attn: str  # the `attn` column: plain / se / eca / cbam, or the timm model's layer
    build: Callable[[], nn.Module]  # the original model (weights drawn from the global RNG)
    default_res: int | None = None  # the model's own image size (timm's default_cfg)
    note: str = ""


RESNET50_LAYERS = (3, 4, 6, 3)


def resnet50(attn: str | None, backend: str | None = None, num_classes: int = 1000,
             layers: tuple[int, ...] = RESNET50_LAYERS) -> nn.Module:
    """torchvision's ResNet-50 with `attn` (a bench block) after every bottleneck's bn3:
    reference blocks when backend is None, else fused ones on `backend`. `layers`: bottlenecks
    per stage (fewer make a small network of the same structure, for tests)."""
    try:
        from torchvision.models.resnet import Bottleneck, ResNet
    except ImportError as e:
        raise SystemExit(f"bench.e2e needs torchvision (pip install torchvision): {e}")
    model = ResNet(Bottleneck, list(layers), num_classes=num_classes)
    if attn is not None:
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for bottleneck in stage:
                c = bottleneck.bn3.num_features
                bottleneck.bn3 = nn.Sequential(bottleneck.bn3, blocks.make(attn, c, backend))
    return model


def tv_spec(attn: str, layers: tuple[int, ...] = RESNET50_LAYERS, num_classes: int = 1000) -> ModelSpec:
    if attn not in TV_ATTN:
        raise SystemExit(f"--attn: choose from {list(TV_ATTN)}, got {attn!r}")
    name = "resnet50" if tuple(layers) == RESNET50_LAYERS else "resnet_" + "-".join(map(str, layers))
    return ModelSpec(name, "tv", attn, lambda: resnet50(TV_ATTN[attn], num_classes=num_classes, layers=layers))


def timm_spec(name: str, num_classes: int = 1000) -> ModelSpec | str:
    """The spec of a timm model (a name of TIMM, or any timm model name), or why it cannot be built."""
    name = name.removeprefix("timm:")
    try:
        import timm
    except ImportError:
        return f"timm is not installed (pip install timm); skipping the timm model {name}"
    arch, kwargs, attn, note = TIMM.get(name, (name, {}, "", ""))
    if not timm.is_model(arch):
        return f"timm has no model {arch!r}; skipping {name}"
    cfg = timm.get_pretrained_cfg(arch)
    res = (getattr(cfg, "input_size", None) or (3, 224, 224))[-1] if cfg is not None else 224
    return ModelSpec(name, "timm", attn, lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                                                    **kwargs), res, note)


def convert(model: nn.Module, backend: str, convert_kwargs: dict) -> tuple[nn.Module, str, int]:
    """A converted copy of `model`, a note of what was fused, and how many modules were."""
    import attnfused

    fused, entries = attnfused.convert(model, backend=backend, report=True, **convert_kwargs)
    attention = [e for e in entries if not e.tail]
    done = sum(e.converted for e in attention)
    note = f"attnfused.convert: {done}/{len(attention)} attention modules fused"
    tails = [e for e in entries if e.tail]
    if tails:
        note += f", {sum(e.converted for e in tails)}/{len(tails)} block tails"
        norms = sum("as the prologue" in e.fuses for e in tails)
        note += f" ({norms} with the BatchNorm before the attention as its prologue in eval mode)" if norms else ""
    left = next((e for e in entries if not e.converted), None)
    if left is not None:
        note += f" (left: {left})"
    return fused, note, done
