"""Backend registry: which kernels run each op, and which backend `auto` picks.

A backend is a module under `attnfused.backends` that registers one kernel per op with
`@register(name, op)` when imported, and exposes `unavailable_reason(device, dtype)`
(None when it can run there). Adding a backend is registering kernels; the ops, the
functional layer and the modules stay as they are.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable

import torch

from .._options import BACKENDS

ENV_VAR = "ATTNFUSED_BACKEND"

# the ops every backend implements (forward and backward); see attnfused.ops for contracts
OPS = ("channel_attention", "channel_attention_backward", "spatial_attention", "spatial_attention_backward",
       "cbam", "cbam_backward", "spatial_pool", "spatial_pool_backward", "spatial_scale",
       "spatial_scale_backward")

# the order `auto` tries, by device type (docs/contract.md §3)
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_MODULES = {"reference": "attnfused.backends.reference", "cpu": "attnfused.backends.cpu",
            "cuda": "attnfused.backends.cuda", "triton": "attnfused.backends.triton"}
_KERNELS: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for where it cannot run."""


def register(backend: str, op: str):
    """Decorator: `fn` is `backend`'s kernel for `op` (same arguments as the op, less `backend`)."""
    if backend not in _KERNELS or op not in OPS:
        raise ValueError(f"unknown backend {backend!r} or op {op!r}")

    def deco(fn):
        _KERNELS[backend][op] = fn
        return fn

    return deco


def _module(backend: str):
    return importlib.import_module(_MODULES[backend])


# Per backend: whether its backward kernels of the ops that take a tie rule (attnfused.ops.TIE_OPS)
# compute the "split" rule themselves: for all of them, or as a function of the op's name. Every
# backend's kernels take the `tie` argument (last).
_SPLITS: dict[str, bool | Callable[[str], bool]] = {}


def declare_ties(backend: str, *, split: bool | Callable[[str], bool]) -> None:
    """Called by a backend module as it registers its kernels."""
    _SPLITS[backend] = split


def computes_split(backend: str, op: str) -> bool:
    """Whether `backend`'s backward kernel of `op` computes the "split" rule (see declare_ties); the
    backend is imported on first use."""
    found = _SPLITS.get(backend)
    if found is None:
        _module(backend)
        found = _SPLITS.setdefault(backend, False)
    return found(op) if callable(found) else found


@contextlib.contextmanager
def _untraced():
    """Nothing inside is recorded by torch.jit.trace or by a dispatch mode (torch.export's tracing): the
    availability checks call the extension's own ops (its build information, a string), which are
    no part of the model, and which the jit tracer cannot even record (it has no string outputs)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.utils._python_dispatch._disable_current_modes():
            yield
    finally:
        torch._C._set_tracing_state(state)


def unavailable_reason(backend: str, device, dtype: torch.dtype | None = None) -> str | None:
    """Why `backend` cannot run on `device` (and `dtype`), or None if it can."""
    if backend not in _MODULES:
        return f"unknown backend {backend!r}; the backends are {list(BACKENDS)}"
    device = torch.device(device)
    with _untraced():
        try:
            mod = _module(backend)
        except ImportError as e:  # e.g. triton not installed
            return f"cannot import {_MODULES[backend]}: {e}"
        return mod.unavailable_reason(device, dtype)


def available_backends(device="cpu", dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run on `device` (and `dtype`, if given), in `auto`'s order first."""
    return [b for b in BACKENDS if unavailable_reason(b, device, dtype) is None]


def resolve(backend: str, x: torch.Tensor) -> str:
    """The concrete backend for input `x`: `auto` (or $ATTNFUSED_BACKEND) picks, a name is checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return _resolve(backend, x.device, x.dtype)


# Backends found able to run, per (requested, $ATTNFUSED_BACKEND, device, dtype): a backend that
# could run stays able to, and eager calls then skip the checks (a failure is checked each time).
_RESOLVED: dict[tuple, str] = {}


# A constant to torch.compile: traced once per (backend, device, dtype), so the imports and the
# environment lookup below never break a graph (fullgraph=True).
@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    key = (backend, os.environ.get(ENV_VAR), device, dtype)
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve_uncached(backend, device, dtype)
    return found


def _resolve_uncached(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    requested = backend
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            backend, requested = env, f"{env} (from ${ENV_VAR})"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device, dtype) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {requested!r}")
    why = unavailable_reason(backend, device, dtype)
    if why is not None:
        can = available_backends(device, dtype)
        raise BackendUnavailableError(
            f"backend {requested!r} cannot run on {device.type} tensors of dtype {dtype}: {why}. "
            f"Backends that can: {can}")
    return backend


def kernel(backend: str, op: str) -> Callable:
    """The kernel of `backend` for `op` (imports the backend module on first use)."""
    table = _KERNELS.get(backend)
    if table is None:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if op not in table:
        _module(backend)
    if op not in table:
        raise NotImplementedError(f"backend {backend!r} has no kernel for op {op!r}")
    return table[op]
