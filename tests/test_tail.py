"""The block's tail, `activation(attention(x) + residual)`, on the backends that run here (reference,
cpu; the Triton backend's in tests/triton, the CUDA backend's in test_cuda_backend): the forward and
the gradients of x, the residual and every weight against the float64 oracle in each layout and
dtype; bit-identical reruns; the tail inside the pass that writes the output (no extra ops); what the
backward keeps (the output, never the residual); a residual in another layout; torch.compile;
gradcheck; bad tail arguments. opcheck of the ops with a tail runs in every backend's opcheck sweep
(tests.cases.OPCHECK_CASES)."""
from __future__ import annotations

import pytest
import torch

from attnfused import functional as F
from attnfused.backends import unavailable_reason
from tests._util import LAYOUTS, TOLERANCE, layout, rand, rel_err
from tests.cases import (TAIL_CASES, case_inputs, check_against_oracle, check_compiled_matches_eager,
                         check_deterministic, check_gradcheck, grad_leaves)

BACKENDS = [b for b in ("reference", "cpu") if unavailable_reason(b, "cpu") is None]
# C = 19 and H*W = 30: vector bodies and tails along both runs; NCHW rows that end inside a cache line
# (the CPU's flat run across row ends)
SHAPE = (2, 19, 6, 5)
CPU_ONLY = pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is unavailable")


def _inputs(case, shape=SHAPE, lay="nchw", dtype=torch.float32):
    return case_inputs(case, shape, lay, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_tail_matches_the_oracle(case, backend, lay, dtype):
    check_against_oracle(case, SHAPE, backend, dtype, lay)


@CPU_ONLY
@pytest.mark.parametrize("per_sample", ["0", "1"])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_cpu_tail_in_both_pass_orders(case, lay, per_sample, monkeypatch):
    """Batch passes and sample by sample (channels_last spatial attention then sweeps each sample)."""
    monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
    check_against_oracle(case, (4, 24, 9, 7), "cpu", torch.float32, lay)
    check_deterministic(case, "cpu", (4, 24, 9, 7), lay)


@CPU_ONLY
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [TAIL_CASES[0], TAIL_CASES[5]], ids=str)
def test_cpu_tail_on_streamed_outputs(case, lay):
    """Outputs past the streaming size, written with non-temporal stores (NCHW rows of 66 * 66
    floats end inside cache lines: the flat run)."""
    x, w = _inputs(case, (2, 256, 66, 66), lay)
    ref = case.run(x.detach().double(), {k: None if v is None else v.detach().double() for k, v in w.items()})
    out = case.run(x.detach(), {k: None if v is None else v.detach() for k, v in w.items()}, "cpu")
    assert out.stride() == x.stride()
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]


@CPU_ONLY
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_the_tail_runs_in_the_output_pass(case):
    """The CPU kernels add the residual and apply relu as they store the output: the profiler, which
    records every ATen op (those a kernel calls too), sees no add or relu in the forward; the backward
    turns y's gradient into the residual's with one op (relu's own backward, from the saved output)."""
    x, w = _inputs(case, lay="channels_last")
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), torch.profiler.profile(activities=acts) as prof:
        case.run(x, w, "cpu")
    tail_ops = {"aten::add", "aten::add_", "aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_"}
    assert not tail_ops & {e.name for e in prof.events()}
    y = case.run(x, w, "cpu")
    with torch.profiler.profile(activities=acts) as prof:
        y.backward(torch.randn_like(y))
    masks = [e.name for e in prof.events() if e.name == "aten::threshold_backward"]
    assert len(masks) == (case.o["activation"] == "relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_backward_keeps_the_output_not_the_residual(case, backend):
    """Saved for backward: x, the small tensors and, for relu, the output itself (which the next layer
    keeps anyway); never the residual."""
    x, w = _inputs(case)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = case.run(x, w, backend)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    residual = w.get("residual")
    if residual is not None:
        assert residual.untyped_storage().data_ptr() not in ptrs, "the residual was saved"
    assert (y.untyped_storage().data_ptr() in ptrs) == (case.o["activation"] == "relu")
    assert x.untyped_storage().data_ptr() in ptrs


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_in_another_layout(backend):
    """A channels_last x with an NCHW residual (and the reverse): the residual is copied once into x's
    layout; the output and every gradient equal those of a residual already laid out like x."""
    case = TAIL_CASES[5]
    for lay, other in (("channels_last", "nchw"), ("nchw", "channels_last")):
        x, w = _inputs(case, lay=lay)
        g = layout(rand(*x.shape, dtype=torch.float32), lay)
        runs = []
        for r_lay in (lay, other):
            wr = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in w.items()}
            wr["residual"] = layout(wr["residual"].detach(), r_lay).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            out = case.run(xr, wr, backend)
            assert out.stride() == x.stride()
            runs.append([out, *torch.autograd.grad(out, grad_leaves(xr, wr)[1], g)])
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [TAIL_CASES[0], TAIL_CASES[3], TAIL_CASES[5]], ids=str)
def test_gradcheck_float64(case, backend):
    check_gradcheck(case, backend)


@CPU_ONLY
def test_compiled_tail_matches_eager():
    """torch.compile(fullgraph=True) of a call with the tail: the op's fake implementation and autograd
    formula (the output saved for relu's mask) give eager's bits."""
    check_compiled_matches_eager(TAIL_CASES[5], SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tail_arguments(backend):
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(1, 1, 3)
    ca = lambda **kw: F.channel_attention(x, w, kind="conv", backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 4, 5, 5\)"):
        ca(residual=torch.randn(2, 4, 5, 4))
    with pytest.raises(TypeError, match="residual must have the input's dtype torch.float32"):
        ca(residual=torch.randn(2, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ca(residual=1.0)
    with pytest.raises(ValueError, match=r"activation must be one of \['none', 'relu'\], got 'gelu'"):
        F.spatial_attention(x, torch.randn(1, 2, 3, 3), activation="gelu", backend=backend)
    with pytest.raises(ValueError, match="residual must be on the input's device"):
        F.cbam(x, torch.randn(2, 4), None, torch.randn(4, 2), None, torch.randn(1, 2, 3, 3),
               residual=torch.randn(2, 4, 5, 5, device="meta"), backend=backend)


@CPU_ONLY
def test_bad_tail_arguments_reach_no_kernel():
    """Called directly, the C++ ops check the tail too: a residual in another layout or dtype, an
    unknown activation."""
    C = torch.ops.attnfused_C
    x = torch.randn(2, 4, 5, 5)
    args = (x, torch.randn(1, 1, 3), None, None, None, "conv", "avg", "relu", "sigmoid", "zeros", "first")
    with pytest.raises(ValueError, match="residual must have x's shape and strides"):
        C.channel_attention(*args, torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last), "none")
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        C.channel_attention(*args, torch.randn(2, 4, 5, 5, dtype=torch.float64), "relu")
    with pytest.raises(ValueError, match=r"activation must be one of \[none, relu\], got 'gelu'"):
        C.spatial_attention(x, torch.randn(1, 2, 3, 3), None, "max_mean", "sigmoid", "first", None, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_under_torch_func(backend):
    """torch.func transforms run the reference math (ops.needs_decomposition), the tail included: jvp and
    vmap of the fused call equal those of the oracle; a residual that takes no gradient gets none."""
    case = TAIL_CASES[5]
    x, w = _inputs(case, dtype=torch.float64)
    r = w.pop("residual").detach()
    wd = {k: None if v is None else v.detach() for k, v in w.items()}
    run = lambda b: lambda x, r: case.run(x, {**wd, "residual": r}, b)  # noqa: E731
    tx, tr = torch.randn_like(x), torch.randn_like(r)
    out, tangent = torch.func.jvp(run(backend), (x.detach(), r), (tx, tr))
    ref, ref_tangent = torch.func.jvp(run(None), (x.detach(), r), (tx, tr))
    assert rel_err(out, ref) <= 1e-12 and rel_err(tangent, ref_tangent) <= 1e-12
    xg = x.detach().clone().requires_grad_()
    case.run(xg, {**wd, "residual": r}, backend).sum().backward()
    assert xg.grad is not None and r.grad is None
