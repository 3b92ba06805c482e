"""Wrong kernels on purpose, to show that the suite can fail.

With $ATTNFUSED_MUTANT set to one of `MUTANTS`, tests/conftest.py installs this plugin: every
kernel the `cpu` backend registered (attnfused.backends' registry, which the eager path and the
custom ops both call) is wrapped to return a result wrong in one way, and the tests run against
it must fail. tests/test_mutation.py runs a fast subset of the suite once per mutant; by hand:

    ATTNFUSED_MUTANT=grad_x_3x python -m pytest tests/test_ops.py -q -k cpu
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

ENV_VAR = "ATTNFUSED_MUTANT"
BACKEND = "cpu"
HALF = (torch.float16, torch.bfloat16)

# the ops whose first output is y, shaped and laid out like x (their first argument)
FORWARD = ("channel_attention", "spatial_attention", "cbam", "spatial_scale")
# the backward ops: (grad_y, x, ...) -> grad_x first, then one gradient per weight (or t)
BACKWARD = ("channel_attention_backward", "spatial_attention_backward", "cbam_backward",
            "spatial_pool_backward", "spatial_scale_backward")
# where the backward ops take the saved index of a max: (argument position, what it indexes)
ARGMAX_ARGS = {"channel_attention_backward": ((3, "space"),), "spatial_attention_backward": ((3, "channels"),),
               "cbam_backward": ((3, "space"), (5, "channels")), "spatial_pool_backward": ((2, "channels"),)}


def _first(out, f):
    """`out` (a tensor or a sequence of them) with f applied to its first tensor."""
    if isinstance(out, Tensor):
        return f(out)
    out = list(out)
    out[0] = f(out[0])
    return tuple(out)


def half_output_1pct(op: str, kernel: Callable) -> Callable:
    """The output 1% too large in float16 and bfloat16."""
    if op not in FORWARD:
        return kernel
    return lambda x, *a: _first(kernel(x, *a), lambda y: y * 1.01) if x.dtype in HALF else kernel(x, *a)


def grad_x_3x(op: str, kernel: Callable) -> Callable:
    """The input gradient 3 times too large."""
    if op not in BACKWARD:
        return kernel
    return lambda *a: _first(kernel(*a), lambda g: g * 3)


def float64_in_float32(op: str, kernel: Callable) -> Callable:
    """float64 calls computed in float32, the results cast back to float64."""
    def cast(t, src, dst):
        return t.to(dst) if isinstance(t, Tensor) and t.dtype == src else t

    def run(*a):
        if not any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in a):
            return kernel(*a)
        out = kernel(*(cast(t, torch.float64, torch.float32) for t in a))
        if isinstance(out, Tensor):
            return cast(out, torch.float32, torch.float64)
        return tuple(cast(t, torch.float32, torch.float64) for t in out)
    return run


def weight_grad_zeroed(op: str, kernel: Callable) -> Callable:
    """The first weight's gradient (w1, the spatial conv's weight, or t) all zeros."""
    if op not in BACKWARD or op == "spatial_pool_backward":  # it has no weight
        return kernel

    def run(*a):
        out = list(kernel(*a))
        out[1] = torch.zeros_like(out[1])
        return tuple(out)
    return run


def max_grad_wrong_index(op: str, kernel: Callable) -> Callable:
    """The gradient of every max sent to the next position (over space or channels) instead of the
    one the forward found."""
    if op not in ARGMAX_ARGS:
        return kernel

    def run(*a):
        a, x = list(a), a[1]
        for i, over in ARGMAX_ARGS[op]:
            n = x.shape[2] * x.shape[3] if over == "space" else x.shape[1]
            a[i] = (a[i] + 1) % max(n, 1)
        return kernel(*a)
    return run


def channels_last_as_nchw(op: str, kernel: Callable) -> Callable:
    """A channels_last x gets its output in NCHW (right values, wrong strides)."""
    if op not in FORWARD:
        return kernel

    def run(x, *a):
        out = kernel(x, *a)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = _first(out, lambda y: y.contiguous())
        return out
    return run


# the forward ops whose last two arguments are the prologue's (in_scale, in_shift), after the tail's
PROLOGUE = ("channel_attention", "spatial_attention", "cbam")


def tail_ignored(op: str, kernel: Callable) -> Callable:
    """A forward's tail (the residual and the activation, its last arguments but the prologue's) not
    applied."""
    if op not in FORWARD:
        return kernel
    at = -4 if op in PROLOGUE else -2
    return lambda *a: kernel(*a[:at], None, "none", *a[len(a) + at + 2:])


def prologue_ignored(op: str, kernel: Callable) -> Callable:
    """A forward's prologue (in_scale and in_shift, its last two arguments) not applied: x read as it is."""
    if op not in PROLOGUE:
        return kernel
    return lambda *a: kernel(*a[:-2], None, None)


def half_output_zeros(op: str, kernel: Callable) -> Callable:
    """The output all zeros in float16 and bfloat16."""
    if op not in FORWARD:
        return kernel
    return lambda x, *a: _first(kernel(x, *a), torch.zeros_like) if x.dtype in HALF else kernel(x, *a)


# the mutants tests/test_mutation.py runs; BY_HAND, more to run by hand against other tests
MUTANTS = {f.__name__: f for f in (half_output_1pct, grad_x_3x, float64_in_float32, weight_grad_zeroed,
                                   max_grad_wrong_index, channels_last_as_nchw, tail_ignored, prologue_ignored)}
BY_HAND = {f.__name__: f for f in (half_output_zeros,)}


def install(name: str) -> None:
    """Wrap every kernel of the cpu backend in mutant `name` ("none": leave them right)."""
    if name == "none":
        return
    mutant = MUTANTS.get(name) or BY_HAND.get(name)
    if mutant is None:
        raise ValueError(f"${ENV_VAR} must be 'none' or one of {list(MUTANTS) + list(BY_HAND)}, got {name!r}")
    from attnfused import backends
    from attnfused.backends import cpu  # noqa: F401 (registers the cpu kernels)

    table = backends._KERNELS[BACKEND]
    for op in backends.OPS:
        table[op] = mutant(op, table[op])


def pytest_configure(config):
    install(os.environ[ENV_VAR])


def pytest_report_header(config):
    return f"mutation check: {ENV_VAR}={os.environ[ENV_VAR]} (the {BACKEND} backend's kernels)"
