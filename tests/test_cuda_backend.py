"""The `cuda` backend on a GPU: parity with the float64 oracle for every op, option, dtype and
layout (forward, input and weight gradients), through the multi-pass and the on-chip forward
($ATTNFUSED_CUDA_ONCHIP=0 / =1) and the new kernels ($ATTNFUSED_CUDA_KERNELS=next), shapes that
exercise every tiling path, opcheck, bit-identical reruns, torch.compile(fullgraph=True) (and the
Triton backend's kernels compiled into the graph), CUDA graph capture, a non-default stream, and
one input past 2**31 elements: every such test is marked `cuda` (skipped without a GPU).
A few checks of the backend's registration run everywhere.
"""
from __future__ import annotations

import pytest
import torch

import attnfused
from attnfused.backends import reference as ref_backend
from tests._util import GRAD_TOLERANCE, TOLERANCE, layout, rand, rand_distinct, rel_err
from tests.cases import (ALL_CASES, CBAM_CASES, CHANNEL_CASES, PROLOGUE_CASES, SPATIAL_CASES, TAIL_CASES,
                         check_against_oracle, check_empty_batch, check_opcheck_every_op, check_pooled_contract,
                         grad_leaves)

BACKEND = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("nchw", "channels_last")
# small shapes with pairwise-distinct values in every dtype (ties make a max's gradient ambiguous):
# B % 8 == 0 in one layout and not the other, so both the 16-byte and the scalar path run
SMALL_SHAPE = {torch.float32: (3, 40, 9, 8), torch.float64: (2, 37, 7, 7), torch.float16: (2, 16, 6, 7),
               torch.bfloat16: (2, 16, 6, 7)}
# float32 shapes that exercise the tiling: many chunks along space, along channels, several rows
# per thread, few samples, odd sizes, ResNet- and MobileNet-like stages
TILING_SHAPES = [(2, 256, 28, 28), (1, 64, 56, 56), (64, 512, 7, 7), (5, 33, 17, 13), (1, 2048, 7, 7),
                 (16, 96, 14, 14)]


# forward paths: multi-pass only, one block per sample in shared memory whenever a sample fits, or
# the new kernels ($ATTNFUSED_CUDA_KERNELS=next; ops and shapes they do not cover yet run multi-pass)
PATHS = {"multipass": {"ATTNFUSED_CUDA_ONCHIP": "0"}, "onchip": {"ATTNFUSED_CUDA_ONCHIP": "1"},
         "next": {"ATTNFUSED_CUDA_ONCHIP": "0", "ATTNFUSED_CUDA_KERNELS": "next"}}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.delenv("ATTNFUSED_CUDA_KERNELS", raising=False)
    for k, v in PATHS[request.param].items():
        monkeypatch.setenv(k, v)
    return request.param


def _available():
    return torch.cuda.is_available() and attnfused.backends.unavailable_reason(BACKEND, "cuda") is None


@pytest.fixture(autouse=True)
def _needs_backend(request):
    if request.node.get_closest_marker("cuda") and not _available():
        pytest.skip(f"cuda backend unavailable: {attnfused.backends.unavailable_reason(BACKEND, 'cuda')}")


def _check(case, shape, dtype, lay):
    """Forward and every gradient on the GPU against the float64 oracle on the CPU."""
    check_against_oracle(case, shape, BACKEND, dtype, lay, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_parity_all_options(case, dtype, lay, path):
    _check(case, SMALL_SHAPE[dtype], dtype, lay)


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_parity_tail(case, dtype, lay, path):
    """The block's tail: in the new path's last pass where there is a residual, after the pass elsewhere."""
    _check(case, SMALL_SHAPE[dtype], dtype, lay)


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("case", PROLOGUE_CASES, ids=str)
def test_parity_prologue(case, lay, path):
    """The input's per-channel affine: formed in one pass before the kernels on every CUDA path; x's,
    in_scale's, in_shift's and every weight's gradients against the oracle (float32: in half precision
    x' is rounded, which the oracle is not; tests/test_prologue.py checks that on CPU)."""
    _check(case, SMALL_SHAPE[torch.float32], torch.float32, lay)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", TILING_SHAPES, ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[10], SPATIAL_CASES[0], SPATIAL_CASES[2],
                                  CBAM_CASES[0], CBAM_CASES[9]], ids=str)
@pytest.mark.cuda
def test_parity_tiling(case, shape, lay, path):
    _check(case, shape, torch.float32, lay)


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_halves(dtype, lay, path):
    """spatial_pool / spatial_scale and their backward against the reference backend's math (the new
    kernels pool over channels where a position's channels, or a channel's positions, are whole
    16-byte vectors: float32 here in both layouts, half precision in channels_last)."""
    shape = SMALL_SHAPE[dtype]
    x = layout(rand_distinct(*shape, dtype=dtype).to(dtype).cuda(), lay)
    xc = x.cpu()
    smaps, sargmax = torch.ops.attnfused.spatial_pool(x, "first", BACKEND)
    rsmaps, rsargmax = torch.ops.attnfused.spatial_pool(xc, "first", "reference")
    assert rel_err(smaps.cpu(), rsmaps) <= TOLERANCE[dtype] and torch.equal(sargmax.cpu(), rsargmax)
    gs = rand(*smaps.shape, dtype=smaps.dtype).cuda()
    gx = torch.ops.attnfused.spatial_pool_backward(gs, x, sargmax, "first", BACKEND)
    assert gx.stride() == x.stride()
    assert rel_err(gx.cpu(), torch.ops.attnfused.spatial_pool_backward(gs.cpu(), xc, rsargmax, "first", "reference")) \
        <= TOLERANCE[dtype]
    t = torch.rand(shape[0], *shape[2:], dtype=torch.float32).cuda()
    y = torch.ops.attnfused.spatial_scale(x, t, None, "none", BACKEND)
    assert y.stride() == x.stride()
    ref = torch.ops.attnfused.spatial_scale(xc, t.cpu(), None, "none", "reference")
    assert rel_err(y.cpu(), ref) <= TOLERANCE[dtype]
    r = layout(rand(*shape, dtype=dtype).cuda(), lay)  # with the tail: + residual, relu
    y = torch.ops.attnfused.spatial_scale(x, t, r, "relu", BACKEND)
    ref = torch.ops.attnfused.spatial_scale(xc, t.cpu(), r.cpu(), "relu", "reference")
    assert y.stride() == x.stride() and rel_err(y.cpu(), ref) <= TOLERANCE[dtype]
    g = layout(rand(*shape, dtype=dtype).cuda(), lay)
    gx, gt = torch.ops.attnfused.spatial_scale_backward(g, x, t, BACKEND)
    rgx, rgt = torch.ops.attnfused.spatial_scale_backward(g.cpu(), xc, t.cpu(), "reference")
    assert rel_err(gx.cpu(), rgx) <= TOLERANCE[dtype]
    assert gt.dtype == t.dtype and rel_err(gt.cpu(), rgt) <= GRAD_TOLERANCE[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", TILING_SHAPES, ids=str)
def test_spatial_pool_tiling(shape, lay, path):
    """The maps over channels at the tiling shapes (few samples: the passes split their rows and
    columns into chunks) against the float64 oracle; the max's channel exactly."""
    x = layout(rand(*shape, device="cuda").float(), lay)
    smaps, sargmax = torch.ops.attnfused.spatial_pool(x, "first", BACKEND)
    mx, idx = x.double().max(dim=1)
    assert torch.equal(sargmax, idx)
    assert rel_err(smaps[:, 0], mx) <= TOLERANCE[torch.float32]
    assert rel_err(smaps[:, 1], x.double().mean(dim=1)) <= TOLERANCE[torch.float32]


@pytest.mark.cuda
def test_opcheck_every_op():
    # inputs on the GPU, saved tensors made by the reference backend
    check_opcheck_every_op(BACKEND, "cuda", C=16, saved_by="reference")


def _train_step(case, x, w, g):
    xx = x.clone().requires_grad_()
    ww = {k: None if v is None else v.clone().requires_grad_() for k, v in w.items()}
    out = case.run(xx, ww, BACKEND)
    return [out] + list(torch.autograd.grad(out, grad_leaves(xx, ww)[1], g))


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[3], CHANNEL_CASES[12], SPATIAL_CASES[2], CBAM_CASES[1],
                                  CBAM_CASES[12]], ids=str)
@pytest.mark.cuda
def test_bit_identical_twice(case, dtype, lay, path):
    x = layout(rand(8, 96, 28, 28, dtype=dtype, device="cuda"), lay)
    w = {k: None if v is None else v.float().cuda() for k, v in case.weights(96).items()}
    g = layout(rand(8, 96, 28, 28, dtype=dtype, device="cuda"), lay)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _train_step(case, x, w, g), _train_step(case, x, w, g)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[4], SPATIAL_CASES[0], SPATIAL_CASES[5], CBAM_CASES[2], CBAM_CASES[8]],
                         ids=str)
@pytest.mark.parametrize("lay", LAYOUTS)
def test_next_path_runs(case, dtype, lay, monkeypatch, capfd):
    """Where the new kernels cover the inputs (channels_last with C, NCHW with H*W a whole number of
    16-byte vectors; tie rule "first"), both directions run them, not the validated kernels they
    fall back to elsewhere: each call's plan is printed under $ATTNFUSED_CUDA_DEBUG=1. And their
    results match the float64 oracle (the parity tests compare the values; this one proves which
    kernels made them)."""
    monkeypatch.setenv("ATTNFUSED_CUDA_KERNELS", "next")
    monkeypatch.setenv("ATTNFUSED_CUDA_DEBUG", "1")
    shape = (4, 64, 14, 14) if lay == "channels_last" else (4, 64, 16, 16)
    x = layout(rand(*shape, dtype=dtype, device="cuda"), lay)
    w = {k: None if v is None else v.float().cuda() for k, v in case.weights(64).items()}
    capfd.readouterr()
    _train_step(case, x, w, layout(rand(*shape, dtype=dtype, device="cuda"), lay))
    err = capfd.readouterr().err
    for direction in ("forward", "backward"):
        assert f"attnfused next {case.op}_{direction} " in err, err
    if lay == "nchw" and case.op in ("cbam", "spatial"):  # a position's terms held down a column of channels
        assert "columns VEC=" in err, err
    if lay == "nchw" and case.op == "cbam" and dtype == torch.float16:  # two lanes per vector of positions
        assert "pool_column_halves" in err, err
    _check(case, shape, dtype, lay)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_next_nchw_short_rows_exchange_in_pairs(dtype, monkeypatch, capfd):
    """NCHW CBAM in half precision with fewer than 32 half vectors of positions per row group (8x8:
    TX = 16): the weighted pool's lanes swap halves within their pair, not across the warp (the
    other configuration of _pool_column_halves; the stage shapes take the full warp)."""
    monkeypatch.setenv("ATTNFUSED_CUDA_KERNELS", "next")
    monkeypatch.setenv("ATTNFUSED_CUDA_DEBUG", "1")
    case, shape = CBAM_CASES[2], (3, 24, 8, 8)
    capfd.readouterr()
    _check(case, shape, dtype, "nchw")
    err = capfd.readouterr().err
    assert "pool_column_halves VEC=8 TX=16 " in err, err


@pytest.mark.cuda
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.float64), ids=str)
@pytest.mark.parametrize("kind", ("grid", "zeros", "bf16", "nan"))
@pytest.mark.parametrize("tie", ["first", "split"])
@pytest.mark.parametrize("name", ["channel_mlp", "channel_conv"])
def test_channel_ties(name, tie, kind, dtype, lay, path):
    # both tie rules on inputs full of ties against the float64 oracle: C = 16 fills whole vectors in
    # channels_last, H*W = 35 goes through tiles in NCHW (the new path computes "split" there)
    from tests.test_cpu_ties import check_ties_against_oracle

    check_ties_against_oracle(name, tie, kind, dtype, lay, BACKEND, "cuda", shape=(3, 16, 5, 7))


@pytest.mark.cuda
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_saved_pooling(lay, path):
    # pooled, argmax and hidden as every backend saves them, on each forward path
    check_pooled_contract(BACKEND, lay, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CBAM_CASES[0]], ids=str)
def test_empty_batch(case):
    check_empty_batch(case, BACKEND, "cuda", C=8)


@pytest.mark.cuda
def test_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    block = attnfused.CBAMBlock("FC", 7, channels=64, ratio=8, backend=BACKEND).cuda()
    x = rand(4, 64, 14, 14, device="cuda").float().contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = block(xe), compiled(xc)
    assert torch.equal(ye, yc)
    ye.sum().backward()
    yc.sum().backward()
    assert torch.equal(xe.grad, xc.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("block", ["se", "cbam"])
def test_compile_runs_the_triton_kernels_itself(block, monkeypatch):
    """Under torch.compile the Triton backend's ops are their kernels in the graph (attnfused.ops): the
    compiled code matches eager within the dtype's tolerance, and runs with no Python launcher of ours."""
    import torch._dynamo

    if attnfused.backends.unavailable_reason("triton", "cuda", torch.float16) is not None:
        pytest.skip(attnfused.backends.unavailable_reason("triton", "cuda", torch.float16))
    torch._dynamo.reset()
    m = (attnfused.SEBlock("avg", 64, 8, backend="triton") if block == "se"
         else attnfused.CBAMBlock("FC", 7, channels=64, ratio=8, backend="triton")).cuda()
    compiled = torch.compile(m, fullgraph=True)
    for step in range(2):
        x = rand(8, 64, 14, 14, device="cuda").half().contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        runs = []
        for fn in (m, compiled):
            with monkeypatch.context() as patch:
                if fn is compiled and step:  # traced and compiled: no call reaches our Python launchers
                    patch.setattr(attnfused.ops, "run_kernel", None)
                    patch.setattr(torch._dynamo.config, "error_on_recompile", True)
                xi = x.clone().requires_grad_()
                with torch.autocast("cuda", dtype=torch.float16):
                    y = fn(xi)
                runs.append((y, *torch.autograd.grad(y, [xi, *m.parameters()], g)))
        (ye, *ge), (yc, *gc) = runs
        assert rel_err(yc, ye) <= TOLERANCE[torch.float16]
        for a, b in zip(gc, ge):
            assert rel_err(a, b) <= GRAD_TOLERANCE[torch.float16]


@pytest.mark.cuda
def test_cuda_graph_capture():
    case = CBAM_CASES[0]
    w = {k: None if v is None else v.float().cuda() for k, v in case.weights(32).items()}
    static_x = rand(4, 32, 12, 12, device="cuda").float()
    for _ in range(2):  # warm up before capture (loads the extension, fills the allocator)
        case.run(static_x, w, BACKEND)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = case.run(static_x, w, BACKEND)
    for _ in range(2):
        new_x = rand(4, 32, 12, 12, device="cuda").float()
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, case.run(new_x, w, BACKEND))


@pytest.mark.cuda
def test_non_default_stream():
    case = CBAM_CASES[9]
    x = rand(6, 48, 20, 20, device="cuda").float()
    w = {k: None if v is None else v.float().cuda() for k, v in case.weights(48).items()}
    g = rand(6, 48, 20, 20, device="cuda").float()
    expected = _train_step(case, x, w, g)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _train_step(case, x, w, g)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("lay", LAYOUTS)
def test_past_2_31_elements(lay):
    """One input of 2**31 + elements (64-bit indexing), channel attention forward and the input
    gradient of spatial_scale, checked at sampled positions and through exact small reductions."""
    shape = (2, 4, 16384, 16400)  # 2.15e9 elements, 4.3 GB in float16
    need = 2 * 2 * 2 * 4 * 16384 * 16400 + (4 << 30)  # x and one output, scratch, per-plane checks
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    fmt = torch.channels_last if lay == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=torch.float16, device="cuda", memory_format=fmt).normal_()
    assert x.numel() > 2**31
    case = CHANNEL_CASES[2]
    w = {k: None if v is None else v.float().cuda() for k, v in case.weights(4).items()}
    o = case.o
    y, pooled, argmax, _hidden = torch.ops.attnfused.channel_attention(
        x, w["w1"], w["b1"], w["w2"], w["b2"], o["kind"], o["pool"], o["act"], o["gate"], o["padding"], "first", None,
        "none", None, None, BACKEND)
    assert y.stride() == x.stride()
    for n in range(shape[0]):
        for c in range(shape[1]):
            plane = x[n, c].float()
            assert torch.allclose(pooled[n, 0, c], plane.mean(), rtol=1e-4, atol=1e-6)
            assert pooled[n, 1, c] == plane.max()
            assert plane.flatten()[argmax[n, c]] == plane.max()
            del plane
    _, s = ref_backend.channel_gate_values(pooled, w["w1"], w["b1"], w["w2"], w["b2"], o["kind"], o["pool"],
                                           o["act"], o["gate"], o["padding"])
    idx = torch.randint(0, x.numel(), (4096,), device="cuda")
    idx[:2] = torch.tensor([0, x.numel() - 1])
    n, rest = idx // (x[0].numel()), idx % (x[0].numel())
    c, hw = rest // (shape[2] * shape[3]), rest % (shape[2] * shape[3])
    h, ww = hw // shape[3], hw % shape[3]
    expect = x[n, c, h, ww].float() * s[n, c]  # s from the reference math: rounding may differ by an ulp
    assert torch.allclose(y[n, c, h, ww].float(), expect, rtol=2e-3, atol=1e-6)
    del y
    t = torch.rand(shape[0], shape[2], shape[3], device="cuda")
    ys = torch.ops.attnfused.spatial_scale(x, t, None, "none", BACKEND)
    assert torch.equal(ys[n, c, h, ww], (x[n, c, h, ww].float() * t[n, h, ww]).half())


# ----------------------------------------------------------------------------- everywhere (no GPU needed)

def test_registers_every_op():
    from attnfused.backends import OPS, _KERNELS, kernel

    kernel(BACKEND, OPS[0])  # imports the backend module
    assert set(_KERNELS[BACKEND]) == set(OPS)


def test_unavailable_reasons_without_building():
    reason = attnfused.backends.unavailable_reason(BACKEND, "cpu")
    assert "CUDA tensors" in reason
    assert "supports" in attnfused.backends.unavailable_reason(BACKEND, "cuda", torch.int32)
    if not torch.cuda.is_available():
        assert "not available" in attnfused.backends.unavailable_reason(BACKEND, "cuda", torch.float16)


def test_one_source_per_op_family_is_built():
    from pathlib import Path

    from attnfused.backends import extension

    names = {Path(f).name for f in extension.cuda_sources()}
    assert {"channel_attention.cu", "spatial_attention.cu", "cbam.cu", "spatial_halves.cu"} <= names
