"""Shared pieces of the Triton kernels: option codes, scalar math, the max-with-index
combine, launch configurations and the device guard.

Under TRITON_INTERPRET=1 (CPU tests) every launcher uses one fixed, small configuration
whose tiles and splits are small enough that the test shapes run the same multi-block,
multi-split reductions as the GPU does.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# option name -> the integer the kernels take as a constexpr
GATES = {"sigmoid": 0, "hardsigmoid": 1}
ACTS = {"relu": 0, "silu": 1}
POOLS = {"avg": 0, "max": 1, "avg+max": 2, "mix": 3}
MAPS = {"max_mean": 0, "mean_max": 1, "mix": 2}
PADDINGS = {"zeros": 0, "circular": 1}
TIES = {"first": 0, "split": 1}  # where a max's gradient goes among equal elements (attnfused.ops)


def is_split(tie: str) -> bool:
    """Whether the tie rule is "split" (checked: "first" or "split")."""
    return code(TIES, "tie", tie) == 1

IDX_NONE = 2**31 - 1  # index of a lane that has seen no element yet (loses every tie)
IDX_NONE_T = tl.constexpr(IDX_NONE)  # the same, visible inside kernels


# blocked float32 sums (reduce.py's docstring): a lane sums runs of INNER terms; a program sums at
# most INNER * INNER runs (MAX_RUNS), in two levels of INNER; longer axes are split over programs
INNER = 16
INNER_T = tl.constexpr(INNER)
MAX_RUNS = INNER * INNER


def splits_for(length: int, width: int, at_least: int = 1) -> int:
    """How many programs share an axis of `length` terms taken `width` at a time (a tile's lanes),
    at least `at_least`: enough that none sums more than MAX_RUNS runs per lane."""
    return max(at_least, triton.cdiv(length, width * INNER * MAX_RUNS), 1)


def code(table: dict, name: str, value: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name} must be one of {list(table)}, got {value!r}") from None


def device_guard(x: torch.Tensor):
    """Launch on x's device (Triton launches on the current device and stream). Nothing while
    launches are traced: the compiled code sets the device itself."""
    if not x.is_cuda or _LAUNCHES.traced:
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


class _Launches(threading.local):
    traced = False  # inside `traced_launches` on this thread


_LAUNCHES = _Launches()


@contextlib.contextmanager
def traced_launches():
    """Inside, every launch goes through `torch.library.wrap_triton`: a tracer (torch.compile's
    AOTAutograd) records the kernels themselves, with their grids and arguments, and the compiled
    code launches them with no Python launcher of ours (attnfused.ops decomposes the Triton
    backend's ops this way under torch.compile). Outside, `launch` returns the kernel as it is: in
    eager mode the wrapper would only add its own dispatch cost to every launch."""
    before = _LAUNCHES.traced
    _LAUNCHES.traced = True
    try:
        yield
    finally:
        _LAUNCHES.traced = before


def launch(kernel):
    """`kernel`, or its traceable wrapper inside `traced_launches`: every launch is `launch(k)[grid](...)`."""
    if _LAUNCHES.traced:
        from torch.library import wrap_triton
        return wrap_triton(kernel)
    return kernel


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_wanted(x: torch.Tensor) -> int:
    """How many programs a reduction over x should spread over (a few per SM)."""
    if not x.is_cuda:
        return 0
    return 4 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())


def geometry(t: torch.Tensor):
    """(stride_n, stride_c, stride_h, stride_w, FLAT) of a 4-D tensor. FLAT: (h, w) flattens to
    p = h*W + w addressed as p * stride_w (NCHW, channels_last, or a size-1 H or W)."""
    sn, sc, sh, sw = t.stride()
    H, W = t.shape[2], t.shape[3]
    if W == 1:
        return sn, sc, sh, sh, True
    return sn, sc, sh, sw, H == 1 or sh == W * sw


# ----------------------------------------------------------------------------- scalar math

@triton.jit
def gate_fn(z, GATE: tl.constexpr):
    if GATE == 0:
        g = 1.0 / (1.0 + tl.exp(-z))
    else:
        # a NaN logit stays NaN, as in torch's hardsigmoid (min/max alone would drop it)
        g = tl.where(z != z, z, tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0)
    return g


@triton.jit
def gate_grad_fn(z, GATE: tl.constexpr):
    """d gate / dz, torch's convention at the kinks of hardsigmoid (0 at +-3)."""
    if GATE == 0:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 - s)
    else:
        d = tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)
    return d


@triton.jit
def act_fn(z, ACT: tl.constexpr):
    if ACT == 0:
        a = tl.where(z < 0.0, 0.0, z)  # keeps NaN, like torch.relu
    else:
        a = z / (1.0 + tl.exp(-z))
    return a


@triton.jit
def act_grad_fn(z, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def argmax_combine(v1, i1, v2, i2):
    """The larger of two (value, index) pairs; NaN wins (as in torch.max), ties go to the
    smaller index. Associative and commutative, so any fixed tree gives the same answer."""
    nan1 = v1 != v1
    nan2 = v2 != v2
    take2 = ((v2 > v1) & ~nan1) | (nan2 & ~nan1) | (((v2 == v1) | (nan1 & nan2)) & (i2 < i1))
    return tl.where(take2, v2, v1), tl.where(take2, i2, i1)


@triton.jit
def argmax_rows(v, i):
    """Row-wise (axis 1) argmax_combine of a tile of (value, index) pairs, through the builtin
    max and min reductions (exact, so the order they use does not matter)."""
    nan = v != v
    has_nan = tl.max(nan.to(tl.int32), axis=1) > 0
    key = tl.where(nan, float("inf"), v)
    m = tl.max(key, axis=1)
    cand = tl.where(has_nan[:, None], nan, key == m[:, None])
    best_i = tl.min(tl.where(cand, i, IDX_NONE_T), axis=1)
    return tl.where(has_nan, float("nan"), m), best_i


# ----------------------------------------------------------------------------- blocked sums

@triton.jit
def run_push(x, i, a1, a2):
    """Add x, the i-th (from 0) run sum of a program, into its two levels: a1 sums INNER runs,
    a2 the sums of a1 (at most INNER of them: a program sums at most MAX_RUNS runs)."""
    a1 += x
    if (i + 1) % INNER_T == 0:
        a2 += a1
        a1 = tl.zeros_like(a1)
    return a1, a2


@triton.jit
def cascade_push(x, i, a1, a2, a3, a4, a5):
    """Add x, the i-th (from 0) of a sequence of sums, into the cascade a1..a5: a1 sums INNER of
    them, a2 INNER sums of a1, a3 and a4 likewise; a5 sums the rest (past INNER^4 sums only).
    Every level adds at most INNER terms of like size, in a fixed order."""
    a1, a2 = run_push(x, i, a1, a2)
    if (i + 1) % (INNER_T * INNER_T) == 0:
        a3 += a2
        a2 = tl.zeros_like(a2)
        if (i + 1) % (INNER_T * INNER_T * INNER_T) == 0:
            a4 += a3
            a3 = tl.zeros_like(a3)
            if (i + 1) % (INNER_T * INNER_T * INNER_T * INNER_T) == 0:
                a5 += a4
                a4 = tl.zeros_like(a4)
    return a1, a2, a3, a4, a5


@triton.jit
def cascade_total(a1, a2, a3, a4, a5):
    """The sum held by a cascade, smallest levels first."""
    return (((a1 + a2) + a3) + a4) + a5
