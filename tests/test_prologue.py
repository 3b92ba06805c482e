"""The input's per-channel affine, `x' = x * in_scale[c] + in_shift[c]` (an eval-mode BatchNorm's,
read by the block in x's place), on the backends that run here (reference, cpu; the Triton backend's
in tests/triton, the CUDA backend's in test_cuda_backend): the forward and the gradients of x,
in_scale, in_shift and every weight against the float64 oracle in each layout and dtype, in both CPU
pass orders; bit-identical reruns; x' formed inside the CPU kernels, bit-identical to the one the
backward forms again; what the backward keeps (x, never x'); torch.compile; gradcheck; bad
arguments. opcheck of the ops with a prologue runs in every backend's opcheck sweep
(tests.cases.OPCHECK_CASES)."""
from __future__ import annotations

import pytest
import torch

from attnfused import functional as F
from attnfused.backends import unavailable_reason
from attnfused.reference import functional as R
from tests._util import GRAD_TOLERANCE, LAYOUTS, TOLERANCE, autocast_for, layout, rand, rel_err
from tests.cases import (PROLOGUE_CASES, case_inputs, check_against_oracle, check_compiled_matches_eager,
                         check_deterministic, check_gradcheck)

BACKENDS = [b for b in ("reference", "cpu") if unavailable_reason(b, "cpu") is None]
SHAPE = (2, 19, 6, 5)  # as tests/test_tail.py: vector bodies and tails along both runs
CPU_ONLY = pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is unavailable")


def _inputs(case, shape=SHAPE, lay="nchw", dtype=torch.float32):
    return case_inputs(case, shape, lay, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PROLOGUE_CASES, ids=str)
def test_prologue_matches_the_oracle(case, backend, lay, dtype):
    check_against_oracle(case, SHAPE, backend, dtype, lay)


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [PROLOGUE_CASES[0], PROLOGUE_CASES[5], PROLOGUE_CASES[8]], ids=str)
def test_prologue_in_bfloat16(case, backend, lay):
    """In bfloat16, x' is rounded to bfloat16 (as the BatchNorm's output is), which the float64 oracle
    of the other tests does not do: here the oracle runs the block without the prologue on that
    rounded x' (in float64), and the fused call's output and x's gradient (x''s, times in_scale) must
    match it within bfloat16's bounds. The gradients of in_scale and in_shift are the float32 and
    float64 tests'."""
    x, w = _inputs(case, lay=lay, dtype=torch.bfloat16)
    w = {k: None if v is None or k == "residual" else v.detach().float() for k, v in w.items()} | \
        {"residual": None if w.get("residual") is None else w["residual"].detach()}
    plain = _case_without_prologue(case)
    xp = R.prologue(x.detach(), w["in_scale"], w["in_shift"]).double().requires_grad_()
    w64 = {k: None if v is None else v.double() for k, v in w.items() if k not in ("in_scale", "in_shift")}
    ref = plain.run(xp, w64)
    g = rand(*x.shape, dtype=torch.bfloat16)
    (ref_gx,) = torch.autograd.grad(ref, xp, g.double())
    with autocast_for(torch.bfloat16, "cpu"):  # float32 weights with bfloat16 input, as the other tests
        out = case.run(x, w, backend)
    (gx,) = torch.autograd.grad(out, x, layout(g, lay))
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]
    assert rel_err(gx, ref_gx * w["in_scale"].double()[:, None, None]) <= GRAD_TOLERANCE[torch.bfloat16]


def _case_without_prologue(case):
    from tests.cases import _case
    return _case(case.op, **{k: v for k, v in case.o.items() if k != "prologue"})


@CPU_ONLY
@pytest.mark.parametrize("per_sample", ["0", "1"])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", PROLOGUE_CASES, ids=str)
def test_cpu_prologue_in_both_pass_orders(case, lay, per_sample, monkeypatch):
    """Batch passes (x' staged for the whole batch) and sample by sample (x' staged per group of
    samples, then read while in cache)."""
    monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
    check_against_oracle(case, (4, 24, 9, 7), "cpu", torch.float32, lay)
    check_deterministic(case, "cpu", (4, 24, 9, 7), lay)


@CPU_ONLY
@pytest.mark.parametrize("case", [PROLOGUE_CASES[0], PROLOGUE_CASES[5], PROLOGUE_CASES[8]], ids=str)
def test_cpu_prologue_runs_inside_the_kernel(case):
    """The CPU kernels form x' themselves (a group of samples at a time, read again from cache): the
    profiler, which records every ATen op (those a kernel calls too), sees no elementwise op on a
    tensor of x's size in the forward."""
    x, w = _inputs(case, (4, 16, 6, 6), "channels_last")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 record_shapes=True) as prof:
        case.run(x, w, "cpu")
    big = [e.name for e in prof.events() if e.name in ("aten::mul", "aten::mul_", "aten::add", "aten::add_",
                                                        "aten::addcmul", "aten::batch_norm")
           and any(len(s) == 4 for s in e.input_shapes)]
    assert not big, big


@CPU_ONLY
@pytest.mark.parametrize("per_sample", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_cpu_prologue_is_the_backwards(lay, dtype, per_sample, monkeypatch):
    """The x' the CPU forward reads is, bit for bit, the one the autograd formula forms again for the
    backward (torch's mul, then add): every channel's max and every position's max over channels,
    each an element of x', equal those of reference.functional.prologue (the "split" rule finds the
    elements equal to the saved max in the backward's x')."""
    monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
    C = 21  # vector bodies and tails along a channels_last row
    x = layout(rand(4, C, 5, 7, dtype=dtype), lay)
    scale, shift = rand(C, dtype=R.acc_dtype(dtype)), rand(C, dtype=R.acc_dtype(dtype))
    xp = R.prologue(x, scale, shift).to(R.acc_dtype(dtype))
    ops = torch.ops.attnfused
    _, pooled, _, _ = ops.channel_attention(x, rand(1, 1, 3, dtype=x.dtype), None, None, None, "conv", "max", "relu",
                                            "sigmoid", "zeros", "first", None, "none", scale, shift, "cpu")
    assert torch.equal(pooled[:, 1], xp.amax((2, 3)))
    _, smaps, _ = ops.spatial_attention(x, rand(1, 2, 3, 3, dtype=x.dtype), None, "max_mean", "sigmoid", "first",
                                        None, "none", scale, shift, "cpu")
    assert torch.equal(smaps[:, 0], xp.amax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_x_not_its_affine(backend):
    """Saved for backward: x and the two (C,) vectors; x' is formed again in the backward, never kept."""
    case = PROLOGUE_CASES[5]
    x, w = _inputs(case)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        case.run(x, w, backend)
    big = [t for t in saved if t.numel() == x.numel() and t.dim() == 4]
    assert [t.untyped_storage().data_ptr() for t in big] == [x.untyped_storage().data_ptr()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prologue_equals_batchnorm_then_block(backend):
    """An eval-mode BatchNorm2d, then the block, against the block with the BatchNorm's affine as the
    prologue: the same output in float32 (x' rounded as the BatchNorm rounds it) and the same
    gradients of x and of the BatchNorm's weight and bias (within float32)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(19).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    case = PROLOGUE_CASES[5]
    x, w = _inputs(case)
    w = {k: v for k, v in w.items() if k not in ("in_scale", "in_shift")}
    g = torch.randn_like(x)
    plain = case.run(bn(x), w, backend)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = case.run(x, {**w, "in_scale": scale, "in_shift": bn.bias - bn.running_mean * scale}, backend)
    assert rel_err(fused, plain) <= TOLERANCE[torch.float32]
    leaves = [x, bn.weight, bn.bias]
    for a, b in zip(torch.autograd.grad(fused, leaves, g), torch.autograd.grad(plain, leaves, g)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [PROLOGUE_CASES[1], PROLOGUE_CASES[3], PROLOGUE_CASES[8]], ids=str)
def test_gradcheck_float64(case, backend):
    check_gradcheck(case, backend)


@CPU_ONLY
def test_compiled_prologue_matches_eager():
    """torch.compile(fullgraph=True) of a call with the prologue: the op's fake implementation and
    autograd formula give eager's bits."""
    check_compiled_matches_eager(PROLOGUE_CASES[8], SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prologue_under_torch_func(backend):
    """torch.func transforms run the reference math, the prologue included: jvp equals the oracle's."""
    case = PROLOGUE_CASES[3]
    x, w = _inputs(case, dtype=torch.float64)
    wd = {k: None if v is None else v.detach() for k, v in w.items()}
    sc = wd.pop("in_scale")
    run = lambda b: lambda x, s: case.run(x, {**wd, "in_scale": s}, b)  # noqa: E731
    tx, ts = torch.randn_like(x), torch.randn_like(sc)
    out, tangent = torch.func.jvp(run(backend), (x.detach(), sc), (tx, ts))
    ref, ref_tangent = torch.func.jvp(run(None), (x.detach(), sc), (tx, ts))
    assert rel_err(out, ref) <= 1e-12 and rel_err(tangent, ref_tangent) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_prologue_arguments(backend):
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(1, 1, 3)
    ca = lambda **kw: F.channel_attention(x, w, kind="conv", backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="in_shift must be given with in_scale"):
        ca(in_scale=torch.ones(4))
    with pytest.raises(ValueError, match="in_scale must be given with in_shift"):
        ca(in_shift=torch.ones(4))
    with pytest.raises(ValueError, match=r"in_scale must have shape \(4,\)"):
        ca(in_scale=torch.ones(5), in_shift=torch.ones(4))
    with pytest.raises(TypeError, match="in_shift must have a floating dtype"):
        ca(in_scale=torch.ones(4), in_shift=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_scale must be on the input's device"):
        F.cbam(x, torch.randn(2, 4), None, torch.randn(4, 2), None, torch.randn(1, 2, 3, 3),
               in_scale=torch.ones(4, device="meta"), in_shift=torch.ones(4), backend=backend)


@CPU_ONLY
def test_bad_prologue_arguments_reach_no_kernel():
    """Called directly, the C++ ops check the prologue too: one without the other, a wrong shape or
    dtype."""
    C = torch.ops.attnfused_C
    x = torch.randn(2, 4, 5, 5)
    args = (x, torch.randn(1, 1, 3), None, None, None, "conv", "avg", "relu", "sigmoid", "zeros", "first", None,
            "none")
    with pytest.raises(ValueError, match="in_shift must be given with in_scale"):
        C.channel_attention(*args, torch.ones(4), None)
    with pytest.raises(ValueError, match=r"in_scale must have shape \[4\]"):
        C.channel_attention(*args, torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="in_shift must have dtype Float for Float input"):
        C.spatial_attention(x, torch.randn(1, 2, 3, 3), None, "max_mean", "sigmoid", "first", None, "none",
                            torch.ones(4), torch.ones(4, dtype=torch.float64))


def test_reference_prologue_rounds_as_batchnorm():
    """reference.functional.prologue rounds x' to x's dtype, as a BatchNorm's output (the kernels read
    that), and is x itself without an affine."""
    x = rand(2, 3, 4, 4, dtype=torch.bfloat16)
    s, b = rand(3, dtype=torch.float32), rand(3, dtype=torch.float32)
    out = R.prologue(x, s, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() * s[:, None, None] + b[:, None, None]).to(torch.bfloat16))
    assert R.prologue(x) is x
