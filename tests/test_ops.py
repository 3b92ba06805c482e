"""Every op, option and layout on every backend this process can run on CPU, against the
float64 oracle: forward, input and weight gradients, gradcheck, opcheck, determinism."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnfused
from tests._util import LAYOUTS, cpu_backends, rand
from tests.cases import (ALL_CASES, CBAM_CASES, CHANNEL_CASES, SHAPES, SPATIAL_CASES, check_against_oracle,
                         check_deterministic, check_opcheck_every_op, check_empty_batch, check_nonfinite, grad_leaves,
                         check_pooled_contract)

BACKENDS = cpu_backends()
FLOAT_DTYPES = (torch.float64, torch.float32)
HALF_SHAPE = (2, 11, 5, 3)  # small enough for pairwise-distinct bfloat16 values


def _backend_dtypes():
    for b in BACKENDS:
        for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            if attnfused.backends.unavailable_reason(b, "cpu", dt) is None:
                yield b, dt


@pytest.mark.parametrize("backend,dtype", list(_backend_dtypes()), ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_parity_all_options(case, backend, dtype):
    shape = SHAPES[0] if dtype in FLOAT_DTYPES else HALF_SHAPE
    check_against_oracle(case, shape, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], SPATIAL_CASES[0], CBAM_CASES[9]], ids=str)
def test_parity_shapes_layouts(case, shape, lay, backend):
    check_against_oracle(case, shape, backend, torch.float32, lay)


@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if attnfused.backends.unavailable_reason(b, "cpu", torch.float64) is None])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gradcheck(case, backend):
    x = rand(2, 5, 4, 3).requires_grad_()
    w = {k: None if v is None else v.requires_grad_() for k, v in case.weights(5).items()}
    names, leaves = grad_leaves(x, w)

    def fn(*args):
        return case.run(args[0], dict(w, **dict(zip(names, args[1:]))), backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_saved_pooling(backend, lay):
    check_pooled_contract(backend, lay)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend):
    check_opcheck_every_op(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[3], SPATIAL_CASES[2], CBAM_CASES[1], CBAM_CASES[12]], ids=str)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_deterministic(case, backend, lay):
    check_deterministic(case, backend, (3, 19, 9, 7), lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
def test_empty_batch(case, backend):
    check_empty_batch(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[8], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_nonfinite_propagates_like_reference(case, backend, special):
    check_nonfinite(case, backend, special)


class _ThroughMode(TorchDispatchMode):
    """Runs every op unchanged and lists the ones it saw: with it on, the functional layer takes
    the custom ops (and their registered autograd) instead of calling the kernels directly."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[3], SPATIAL_CASES[2], CBAM_CASES[1]], ids=str)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_direct_kernels_match_custom_ops(case, backend, grad):
    """In eager mode on plain tensors the kernels run directly (ops.call); the custom ops give
    the same outputs and gradients bit for bit."""
    x = rand(2, 7, 5, 6, dtype=torch.float32)
    w = case.weights(7, dtype=torch.float32)
    g = rand(2, 7, 5, 6, dtype=torch.float32)

    def run():
        xx = x.clone().requires_grad_(grad)
        ww = {k: None if v is None else v.clone().requires_grad_(grad) for k, v in w.items()}
        out = case.run(xx, ww, backend)
        return [out] + (list(torch.autograd.grad(out, grad_leaves(xx, ww)[1], g)) if grad else [])

    direct = run()
    with _ThroughMode() as mode:
        via_ops = run()
    op = {"channel": "channel_attention", "spatial": "spatial_attention"}.get(case.op, case.op)
    assert f"attnfused.{op}" in mode.seen, mode.seen
    for a, b in zip(direct, via_ops, strict=True):
        assert torch.equal(a, b)


def test_split_backward_falls_back_where_a_backend_does_not_cover(monkeypatch):
    # a backend that computes "split" for one op (as cuda's new kernels) but declines some inputs
    # with NotImplementedError naming tie='split': the reference backend's kernel runs instead;
    # any other NotImplementedError propagates, and other ops go to the reference at once
    from attnfused import backends, ops

    calls = []

    def fake(backend, name):
        def run(*args):
            calls.append((backend, name))
            if backend == "fake":
                raise NotImplementedError(args[0])
            return "reference result"
        return run

    monkeypatch.setattr(backends, "kernel", fake)
    monkeypatch.setitem(backends._SPLITS, "fake", lambda op: op == "channel_attention_backward")
    out = ops.run_kernel("fake", "channel_attention_backward", ("tie='split' not covered", "split"))
    assert out == "reference result"
    assert calls == [("fake", "channel_attention_backward"), ("reference", "channel_attention_backward")]
    with pytest.raises(NotImplementedError, match="something else"):
        ops.run_kernel("fake", "channel_attention_backward", ("something else", "split"))
    calls.clear()
    assert ops.run_kernel("fake", "cbam_backward", ("x", "split")) == "reference result"
    assert calls == [("reference", "cbam_backward")]
    assert backends.computes_split("fake", "channel_attention_backward")
    assert not backends.computes_split("fake", "spatial_attention_backward")



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_nan_gradient_where_the_oracle_has_it(backend, pool):
    # one NaN in x, a conv over channels (it mixes only neighbours): the input gradient is NaN
    # exactly where the float64 oracle's is (an input's unused half must not carry the NaN)
    x = rand(2, 8, 4, 4, dtype=torch.float64)
    x[0, 3, 1, 1] = math.nan
    w = rand(1, 1, 3, dtype=torch.float64)
    grads = []
    for fn in (lambda t: attnfused.functional.channel_attention(t, w, kind="conv", pool=pool, backend=backend),
               lambda t: attnfused.reference.functional.channel_attention(t, w, kind="conv", pool=pool)):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        grads.append(torch.autograd.grad(y, xr, torch.ones_like(y))[0])
    assert torch.equal(grads[0].isnan(), grads[1].isnan())
