"""Property-based parity (hypothesis): every op of attnfused.functional with random shapes (0 and 1
included), layouts and strided views, dtypes, options and special values (NaN, infinities, ties,
zeros, large and small magnitudes), against the float64 reference: outputs and every gradient.
Shared by tests/test_property.py (reference, cpu) and tests/triton/test_property.py (triton).

Profiles ($HYPOTHESIS_PROFILE): "ci" (the default) is derandomized, a few minutes in all;
"dev" draws 20 times as many examples from a fresh seed, to run by hand:

    HYPOTHESIS_PROFILE=dev python -m pytest tests/test_property.py -q
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import attnfused
from attnfused import functional as F
from attnfused._options import (CHANNEL_KINDS, CHANNEL_POOLS, CONV_PADDINGS, GATES, HIDDEN_ACTS, SPATIAL_MAPS,
                                TIE_RULES)
from attnfused.accuracy import bound
from attnfused.reference import functional as R
from tests._util import GRAD_TOLERANCE, TOLERANCE, autocast_for, layout, rand, rand_distinct, rel_err
from tests.cases import Case, forward_ok, grad_bounds, grad_leaves

# the examples' tensors come from torch's generator seeded by hypothesis, so a derandomized run is
# the same run each time; the per-test seed fixture (tests/conftest.py) does not matter here
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def budget(ci_examples: int) -> int:
    """Examples per test: `ci_examples` in CI, 20 times as many in the "dev" profile."""
    return ci_examples * (20 if PROFILE == "dev" else 1)


OPS = ("channel", "spatial", "cbam", "spatial_pool", "spatial_scale")
# x's memory: NCHW, channels_last, every 2nd column of a wider tensor, every 2nd channel of a
# channels_last tensor, H and W swapped in memory (the last three are copied once to NCHW)
LAYOUTS = ("nchw", "channels_last", "strided", "channels_last_strided", "transposed")
SPECIALS = ("none", "nan", "inf", "-inf", "ties", "zeros")
# magnitudes of x; float16's largest is 65504, and the half-precision runs keep 4e3 * 4 in range
SCALES = {torch.float64: (1.0, 1e-6, 1e6), torch.float32: (1.0, 1e-6, 1e6), torch.float16: (1.0, 1e-3, 1e3),
          torch.bfloat16: (1.0, 1e-3, 1e3)}


@dataclasses.dataclass(frozen=True)
class Example:
    op: str
    tie: str  # the max's gradient rule (also in `case`)
    case: Case | None  # the options of "channel", "spatial", "cbam"
    shape: tuple
    dtype: torch.dtype
    lay: str
    special: str
    scale: float
    seed: int


def _options(op: str, tie: str):
    """The options of an op as tests/cases.py's Case takes them (None for the two halves)."""
    if op not in ("channel", "spatial", "cbam"):
        return st.just(None)
    channel = st.fixed_dictionaries(dict(kind=st.sampled_from(CHANNEL_KINDS), pool=st.sampled_from(CHANNEL_POOLS),
                                         act=st.sampled_from(HIDDEN_ACTS), gate=st.sampled_from(GATES),
                                         padding=st.sampled_from(CONV_PADDINGS), bias=st.booleans(),
                                         k1d=st.sampled_from((1, 3, 5, 7))))
    spatial = st.fixed_dictionaries(dict(maps=st.sampled_from(SPATIAL_MAPS), k=st.sampled_from((1, 3, 5, 7)),
                                         sbias=st.booleans(), sgate=st.sampled_from(GATES)))


    def case(c, s):
        opts = {"channel": c, "spatial": s, "cbam": {**c, **s}}[op] | {"tie": tie}
        if opts.get("kind") == "conv":
            opts["bias"] = False  # the 1D conv has no bias
        elif opts.get("kind") == "mlp":
            opts["padding"] = "zeros"  # only the conv pads
        return Case(op, tuple(sorted(opts.items())))
    return st.builds(case, channel, spatial)


def _shapes(skip_empty_dims: bool):
    """(N, C, H, W), each from 0 or 1 up, small: 0 where N = 0 only (elsewhere x is rejected)."""
    dim = st.integers(1, 7)

    def ok(s):
        return not (skip_empty_dims and s[0] == 0 and 0 in s[1:])
    sizes = st.tuples(st.integers(1, 3), st.integers(1, 9), dim, dim)
    empty = st.tuples(st.just(0), st.integers(0, 5), st.integers(0, 4), st.integers(0, 4)).filter(ok)
    return st.one_of(sizes, sizes, sizes, empty)


def examples(dtypes, skip_empty_dims=False, specials=SPECIALS):
    """The strategy of Examples for a backend that takes `dtypes`; `skip_empty_dims` leaves out
    N = 0 with C, H or W = 0, `specials` the special values (what a backend cannot take yet, its
    test says why)."""
    @st.composite
    def draw(draw_):
        op, tie = draw_(st.sampled_from(OPS)), draw_(st.sampled_from(TIE_RULES))
        dtype = draw_(st.sampled_from(dtypes))
        return Example(op, tie, draw_(_options(op, tie)), draw_(_shapes(skip_empty_dims)), dtype,
                       draw_(st.sampled_from(LAYOUTS)), draw_(st.sampled_from(specials)),
                       draw_(st.sampled_from(SCALES[dtype])), draw_(st.integers(0, 2**31 - 1)))
    return draw()


# ----------------------------------------------------------------------------- inputs

def strided_layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in memory `kind` (LAYOUTS): tests/_util.py's three, and two views that are neither NCHW-
    nor channels_last-contiguous."""
    N, C, H, W = x.shape
    if kind == "channels_last_strided":
        wide = torch.empty(N, 2 * C, H, W, dtype=x.dtype, device=x.device).contiguous(
            memory_format=torch.channels_last)
        wide[:, ::2] = x
        return wide[:, ::2]
    if kind == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return layout(x, kind)


def make_x(ex: Example) -> torch.Tensor:
    """x's values in float64, each exactly representable in ex.dtype."""
    shape = ex.shape
    if ex.special == "ties":  # few distinct values: ties in every max, zeros, exact means
        x = torch.randint(-2, 3, shape).double() / 2
    elif math.prod(shape) == 0:
        x = torch.empty(shape, dtype=torch.float64)
    else:  # pairwise distinct in ex.dtype: every max has one right gradient
        x = rand_distinct(*shape, dtype=ex.dtype)
    x = (x * ex.scale).to(ex.dtype).double()
    if x.numel() and ex.special in ("nan", "inf", "-inf"):
        x.view(-1)[torch.randint(x.numel(), ())] = float(ex.special)
    elif x.numel() and ex.special == "zeros":  # one sample's channel, or a whole sample, exactly zero
        n, c = torch.randint(shape[0], ()), torch.randint(shape[1], ())
        x[n] = 0 if torch.rand(()) < 0.5 else x[n]
        x[n, c] = 0
    return x


def weights(ex: Example, dtype: torch.dtype) -> dict:
    """The op's weights in float64, representable in `dtype` (the map t of spatial_scale in (0, 1))."""
    C = ex.shape[1]
    if ex.op == "spatial_scale":
        return {"t": torch.rand(ex.shape[0], *ex.shape[2:], dtype=torch.float64).to(dtype).double()}
    if ex.op == "spatial_pool":
        return {}
    return {k: None if v is None else v.to(dtype).double() for k, v in ex.case.weights(C).items()}


def run(ex: Example, x: torch.Tensor, w: dict, backend: str | None):
    """The op through attnfused.functional on `backend`, or the float64 oracle (backend None)."""
    if ex.op == "spatial_pool":
        if backend is None:
            mean, mx = R.pool_channels(x, ex.tie)
            return torch.stack((mx, mean), 1)
        return F.spatial_pool(x, tie=ex.tie, backend=backend)
    if ex.op == "spatial_scale":
        if backend is None:
            return (x.to(R.acc_dtype(x.dtype)) * w["t"][:, None]).to(x.dtype)
        return F.spatial_scale(x, w["t"], backend=backend)
    return ex.case.run(x, w, backend)


class _Op:
    """`run` as tests/cases.py's checks take a case (forward_ok, grad_bounds)."""

    def __init__(self, ex):
        self.ex = ex

    def run(self, x, w, backend=None):
        return run(self.ex, x, w, backend)

    def __str__(self):
        return str(self.ex)


# ----------------------------------------------------------------------------- the check

def _rel_err(got, ref) -> float:
    """rel_err, relative to no less than the smallest normal number of got's dtype: a result whose
    every element is subnormal there (a gate saturated at 1e-45) is any of its roundings, 0 included."""
    return rel_err(got, ref) * ref.double().norm().item() / max(ref.double().norm().item(),
                                                                torch.finfo(got.dtype).tiny) \
        if ref.double().norm() > 0 else rel_err(got, ref)


def _expect_close(name, got, ref, tol):
    """NaN and infinities where the float64 reference has them; the finite rest within `tol`."""
    dtype, got, ref = got.dtype, got.detach().cpu().double(), ref.detach().double()
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{name}: NaN at {got.isnan().nonzero().tolist()}, the reference's at {ref.isnan().nonzero().tolist()}"
    assert torch.equal(got.isinf() * got.sign(), ref.isinf() * ref.sign()), f"{name}: infinities differ"
    finite = ref.isfinite()
    err = _rel_err(got[finite].to(dtype), ref[finite])
    assert err <= tol, f"{name}: rel err {err:.3g} > {tol:.3g}"


def check(ex: Example, backend: str, device="cpu") -> None:
    """The backend's forward and gradients against the float64 oracle for one example."""
    torch.manual_seed(ex.seed)
    wdt = ex.dtype if ex.dtype in (torch.float32, torch.float64) else torch.float32  # half x: autocast weights
    x64, w64 = make_x(ex), weights(ex, wdt)
    x = strided_layout(x64.to(device=device, dtype=ex.dtype), ex.lay).requires_grad_()
    w = {k: None if v is None else v.to(device=device, dtype=wdt).requires_grad_() for k, v in w64.items()}
    with autocast_for(ex.dtype, device):
        out = run(ex, x, w, backend)
    out_dtype = R.acc_dtype(ex.dtype) if ex.op == "spatial_pool" else ex.dtype
    out_shape = (ex.shape[0], 2, *ex.shape[2:]) if ex.op == "spatial_pool" else ex.shape
    assert (tuple(out.shape), out.dtype, out.device) == (out_shape, out_dtype, x.device), \
        f"output: {tuple(out.shape)} {out.dtype} {out.device}, expected {out_shape} {out_dtype} {x.device}"
    native = F.native_layout(x.detach())
    if ex.op != "spatial_pool":  # laid out like x, or like x's one NCHW copy
        assert out.stride() == native.stride(), f"output strides {out.stride()}, expected {native.stride()}"
    names, leaves = grad_leaves(x, w)
    g64 = rand(*out.shape).to(out.dtype).double()
    channels_last = native.is_contiguous(memory_format=torch.channels_last) and not native.is_contiguous()
    g = layout(g64.to(out.dtype), "channels_last" if channels_last and ex.op != "spatial_pool" else "nchw")
    grads = torch.autograd.grad(out, leaves, g.to(device), allow_unused=True)
    for name, gr, leaf in zip(["x", *names], grads, leaves):
        assert gr is not None, f"no gradient of {name}"
        assert gr.shape == leaf.shape and gr.dtype == leaf.dtype, f"grad of {name}: {gr.shape} {gr.dtype}"
    if x64.numel() == 0:  # nothing to compare with: empty, and zero weight gradients
        assert all(not gr.any() for gr in grads[1:]), "weight gradients of an empty batch must be zeros"
        return

    xr = x64.clone().requires_grad_()
    wr = {k: None if v is None else v.clone().requires_grad_() for k, v in w64.items()}
    ref = run(ex, xr, wr, None)
    _, ref_leaves = grad_leaves(xr, wr)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g64)
    if not x64.isfinite().all():
        # NaN and infinities go where the reference puts them, the finite rest within the dtype's
        # target or twice the error of the reference math in float32; the gradients of a NaN are
        # not defined (torch's relu backward maps a NaN to 0, a kernel may keep it), but the samples
        # without one must keep their gradients: nothing leaks from one sample into another
        eager = run(ex, x64.float(), {k: None if v is None else v.float() for k, v in w64.items()}, None)
        finite = ref.isfinite()
        tol = TOLERANCE[ex.dtype] if ex.dtype == torch.float64 else \
            bound(TOLERANCE[ex.dtype], _rel_err(eager[finite], ref[finite]))
        _expect_close("output", out, ref, tol)
        clean = x64.flatten(1).isfinite().all(1)
        _expect_close("grad of x (samples without NaN or inf)", grads[0][clean.to(grads[0].device)],
                      ref_grads[0][clean], GRAD_TOLERANCE[ex.dtype])
        return
    op = _Op(ex)
    if ex.op in ("channel", "spatial", "cbam"):
        # tests/cases.py's bounds: the dtype's target, or twice the error of the reference math run
        # in float32 or its float32 noise floor where larger; for half precision too, whose math
        # runs in float32 (a gate saturated at z = 23 has a derivative of 1e-10 that float32's
        # s * (1 - s) rounds to 0, and large inputs make the weight gradients of such gates)
        err = _rel_err(out.detach().cpu(), ref)
        ok = forward_ok(op, x64, w64, ref.detach(), err, ex.dtype)
        if ex.dtype != torch.float64:
            ok = ok or forward_ok(op, x64, w64, ref.detach(), err, torch.float32)
        assert ok, f"output rel err {err:.3g}"
        accuracy = ex.dtype if ex.dtype == torch.float64 else torch.float32
        tols = grad_bounds(op, x64, w64, g64, accuracy, ref_grads, [GRAD_TOLERANCE[ex.dtype]] * len(leaves))
    else:
        _expect_close("output", out, ref, TOLERANCE[ex.dtype])
        tols = [GRAD_TOLERANCE[ex.dtype]] * len(leaves)
    for name, gr, gref, tol in zip(["x", *names], grads, ref_grads, tols):
        _expect_close(f"grad of {name}", gr, gref, tol)


def available(backend: str, device="cpu") -> list[torch.dtype]:
    """The dtypes `backend` takes on `device` (the Triton interpreter has no bfloat16)."""
    dts = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    if backend == "triton" and device == "cpu":
        dts.remove(torch.bfloat16)
    return [d for d in dts if attnfused.backends.unavailable_reason(backend, device, d) is None]
