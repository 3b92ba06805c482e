"""Every op, option and layout on every backend this process can run on CPU, against the
float64 oracle: forward, input and weight gradients, gradcheck, opcheck, determinism."""
from __future__ import annotations

import math

import pytest
import torch

import attnfused
from tests._util import GRAD_TOLERANCE, LAYOUTS, TOLERANCE, cpu_backends, layout, rand, rand_distinct, rel_err
from tests.cases import ALL_CASES, CBAM_CASES, CHANNEL_CASES, SHAPES, SPATIAL_CASES

BACKENDS = cpu_backends()
FLOAT_DTYPES = (torch.float64, torch.float32)
HALF_SHAPE = (2, 11, 5, 3)  # small enough for pairwise-distinct bfloat16 values


def _backend_dtypes():
    for b in BACKENDS:
        for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            if attnfused.backends.unavailable_reason(b, "cpu", dt) is None:
                yield b, dt


def _leaves(x, w):
    names = [k for k, v in w.items() if v is not None]
    return names, [x] + [w[k] for k in names]


def _check_against_oracle(case, shape, backend, dtype, lay="nchw"):
    # the oracle sees exactly the values the backend gets (rounded to dtype)
    wdt = dtype if dtype in FLOAT_DTYPES else torch.float32
    x64 = rand_distinct(*shape, dtype=dtype).to(dtype).double()
    w64 = {k: None if v is None else v.to(wdt).double() for k, v in case.weights(shape[1]).items()}
    # oracle in float64
    xr = x64.clone().requires_grad_()
    wr = {k: None if v is None else v.clone().requires_grad_() for k, v in w64.items()}
    ref = case.run(xr, wr)
    g = rand(*ref.shape).to(dtype).double()
    names, leaves = _leaves(xr, wr)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    # backend in `dtype` (weights stay float32 for half inputs, as under autocast)
    x = layout(x64.to(dtype), lay).requires_grad_()
    w = {k: None if v is None else v.to(wdt).requires_grad_() for k, v in w64.items()}
    out = case.run(x, w, backend)
    assert out.shape == x.shape and out.dtype == dtype
    if lay == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{case} forward rel err {err:.3g}"
    _, leaves = _leaves(x, w)
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    for name, gr, gref, leaf in zip(["x"] + names, grads, ref_grads, leaves):
        assert gr.shape == leaf.shape and gr.dtype == leaf.dtype, name
        err = rel_err(gr, gref)
        assert err <= GRAD_TOLERANCE[leaf.dtype], f"{case} grad of {name} rel err {err:.3g}"


@pytest.mark.parametrize("backend,dtype", list(_backend_dtypes()), ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_parity_all_options(case, backend, dtype):
    shape = SHAPES[0] if dtype in FLOAT_DTYPES else HALF_SHAPE
    _check_against_oracle(case, shape, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], SPATIAL_CASES[0], CBAM_CASES[9]], ids=str)
def test_parity_shapes_layouts(case, shape, lay, backend):
    _check_against_oracle(case, shape, backend, torch.float32, lay)


@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if attnfused.backends.unavailable_reason(b, "cpu", torch.float64) is None])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gradcheck(case, backend):
    x = rand(2, 5, 4, 3).requires_grad_()
    w = {k: None if v is None else v.requires_grad_() for k, v in case.weights(5).items()}
    names, leaves = _leaves(x, w)

    def fn(*args):
        return case.run(args[0], dict(w, **dict(zip(names, args[1:]))), backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_samples(backend):
    """(op, args) for every public forward and backward op on fresh inputs."""
    ops = torch.ops.attnfused
    x = rand(2, 6, 5, 3, dtype=torch.float32)
    g = rand(2, 6, 5, 3, dtype=torch.float32)
    for case in (CHANNEL_CASES[5], CHANNEL_CASES[9], SPATIAL_CASES[1], CBAM_CASES[3]):
        o, w = case.o, {k: None if v is None else v.float() for k, v in case.weights(6).items()}
        copts = (o.get("kind"), o.get("pool"), o.get("act"), o.get("gate"), o.get("padding"))
        if case.op == "channel":
            wts = (w["w1"], w["b1"], w["w2"], w["b2"])
            y, pooled, argmax = ops.channel_attention(x, *wts, *copts, backend)
            yield ops.channel_attention.default, (x, *wts, *copts, backend)
            yield ops.channel_attention_backward.default, (g, x, pooled, argmax, *wts, *copts, backend)
        elif case.op == "spatial":
            sopts = (o["maps"], o["sgate"])
            y, smaps, sargmax = ops.spatial_attention(x, w["sw"], w["sb"], *sopts, backend)
            yield ops.spatial_attention.default, (x, w["sw"], w["sb"], *sopts, backend)
            yield ops.spatial_attention_backward.default, (g, x, smaps, sargmax, w["sw"], w["sb"], *sopts, backend)
        else:
            wts = (w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"])
            opts = (*copts, o["maps"], o["sgate"])
            saved = ops.cbam(x, *wts, *opts, backend)[1:]
            yield ops.cbam.default, (x, *wts, *opts, backend)
            yield ops.cbam_backward.default, (g, x, *saved, *wts, *opts, backend)
    smaps, sargmax = ops.spatial_pool(x, backend)
    yield ops.spatial_pool.default, (x, backend)
    yield ops.spatial_pool_backward.default, (rand(*smaps.shape, dtype=torch.float32), x, sargmax, backend)
    t = torch.rand(2, 5, 3)
    yield ops.spatial_scale.default, (x, t, backend)
    yield ops.spatial_scale_backward.default, (g, x, t, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend):
    seen = set()
    for op, args in _op_samples(backend):
        # forward ops are checked with autograd (floating inputs require grad), backward ops without
        grad = "backward" not in op.name()
        args = tuple(a.detach().clone().requires_grad_(grad and a.is_floating_point())
                     if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
        seen.add(op.name().split("::")[1].split(".")[0])
    assert seen == set(attnfused.backends.OPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[3], SPATIAL_CASES[2], CBAM_CASES[1], CBAM_CASES[12]], ids=str)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_deterministic(case, backend, lay):
    x = layout(rand(3, 19, 9, 7, dtype=torch.float32), lay)
    w = {k: None if v is None else v.float() for k, v in case.weights(19).items()}
    g = rand(3, 19, 9, 7, dtype=torch.float32)

    def run():
        xx = x.clone().requires_grad_()
        ww = {k: None if v is None else v.clone().requires_grad_() for k, v in w.items()}
        out = case.run(xx, ww, backend)
        names, leaves = _leaves(xx, ww)
        return [out] + list(torch.autograd.grad(out, leaves, g))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
def test_empty_batch(case, backend):
    x = torch.empty(0, 4, 5, 6, requires_grad=True)
    w = {k: None if v is None else v.float().requires_grad_() for k, v in case.weights(4).items()}
    out = case.run(x, w, backend)
    assert out.shape == (0, 4, 5, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(v.grad is not None and v.grad.abs().sum() == 0 for v in w.values() if v is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[8], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_nonfinite_propagates_like_reference(case, backend, special):
    x = rand(2, 6, 5, 4, dtype=torch.float32)
    x[1, 2, 3, 1] = special
    w = {k: None if v is None else v.float() for k, v in case.weights(6).items()}
    ref = case.run(x.double(), {k: None if v is None else v.double() for k, v in w.items()})
    out = case.run(x, w, backend)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert rel_err(out[finite], ref[finite]) <= TOLERANCE[torch.float32]
