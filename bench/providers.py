"""Providers: the ways a block can run. `eager` and `compile*` run the reference module;
the fused ones run `attnfused.<Name>(..., backend=name)`, and `<name>+compile` the same module
under `torch.compile` (asked for by name: not in `all`). Each runs only where it can; the fused
backends are found through `attnfused.available_backends`, so a new backend is benchmarked as
soon as it reports available.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from . import blocks

# the fused providers are the attnfused backends of these names
FUSED = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Provider:
    name: str
    # (block, channels, reference module) -> the module to time, with the reference's weights
    build: Callable[[str, int, nn.Module], nn.Module]
    # (device, dtype) -> why it cannot run there, or None
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    # providers whose first call compiles (their compile time is not timed)
    compiles: bool = False
    # part of `--providers all` (the compiled fused modules are asked for by name)
    in_all: bool = True


def _eager(block, channels, ref):
    return copy.deepcopy(ref)


def _compiled(mode: str | None):
    def build(block, channels, ref):
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale dynamic shapes
        return torch.compile(copy.deepcopy(ref), mode=mode, dynamic=False)

    return build


def _always(device, dtype):
    return None


def _compile_max_unavailable(device, dtype):
    # max-autotune on CPU spends minutes benchmarking templates for a pointwise-bound block
    return None if device.type == "cuda" else "max-autotune is benchmarked on GPU only"


def _fused(backend: str, compiled: bool = False) -> Provider:
    def build(block, channels, ref):
        p = next(iter(ref.parameters()))
        mod = blocks.make(block, channels, backend=backend).to(device=p.device, dtype=p.dtype)
        mod.load_state_dict(ref.state_dict())
        return _compiled(None)(block, channels, mod) if compiled else mod

    def unavailable(device, dtype):
        import attnfused.backends as B

        return B.unavailable_reason(backend, device, dtype)

    if compiled:
        return Provider(f"{backend}+compile", build, unavailable, compiles=True, in_all=False)
    return Provider(backend, build, unavailable)


PROVIDERS: dict[str, Provider] = {
    "eager": Provider("eager", _eager, _always),
    "compile": Provider("compile", _compiled(None), _always, compiles=True),
    "compile-max": Provider("compile-max", _compiled("max-autotune"), _compile_max_unavailable, compiles=True),
    **{b: _fused(b) for b in FUSED},
    **{f"{b}+compile": _fused(b, compiled=True) for b in FUSED},
}
