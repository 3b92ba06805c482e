"""The `triton` backend against the float64 oracle: every op, option and layout, forward and
input and weight gradients, through the functional API, the modules and the ops; opcheck,
determinism, empty batch, non-finite input. On a GPU when there is one, else on CPU under
the Triton interpreter (same kernels, same tiling and split reductions, smaller blocks).

Shapes are small so the directory runs in a few minutes under the interpreter; they still
take several channel and pixel blocks and several splits of every reduction
(interpreter blocks: 16 wide, 32 per split).
"""
from __future__ import annotations

import math

import pytest
import torch

import attnfused
from attnfused import backends
from attnfused.reference import functional as R
from attnfused.accuracy import bound
from tests._util import GRAD_TOLERANCE, LAYOUTS, TOLERANCE, layout, rand, rand_distinct, rel_err
from tests import cases
from tests.cases import ALL_CASES, CBAM_CASES, CHANNEL_CASES, PROLOGUE_CASES, SPATIAL_CASES, TAIL_CASES
from tests.triton._env import DEVICES, INTERPRET, dtypes

B = "triton"
# (N, C, H, W): several blocks and splits along C (37 > 2 * 16) and along H*W (7*5 > 32), odd sizes
SHAPE = (2, 37, 7, 5)
SMALL = (2, 6, 5, 3)  # the option sweep: every op's code path, quickly
HALF_SHAPE = (2, 11, 5, 3)  # pairwise-distinct half-precision values
SHAPES = [SHAPE, (1, 3, 1, 1), (2, 1, 4, 9), (1, 5, 12, 12)]


def check_against_oracle(case, shape, device, dtype=torch.float32, lay="nchw"):
    cases.check_against_oracle(case, shape, B, dtype, lay, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_every_option(case, device):
    check_against_oracle(case, SMALL, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_tail(case, lay, device):
    """The block's tail (residual, relu) in the output pass: x's and the residual's gradients and every
    weight's against the oracle, in each layout (a strided x and residual are copied once); in half
    precision too."""
    check_against_oracle(case, SMALL, device, lay=lay)
    if lay == "channels_last":
        for dtype in dtypes(device)[1:]:
            check_against_oracle(case, HALF_SHAPE, device, dtype, lay)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("case", [PROLOGUE_CASES[1], PROLOGUE_CASES[4], PROLOGUE_CASES[8]], ids=str)
def test_prologue(case, lay, device):
    """The input's per-channel affine (x' formed in one pass before the kernels): the gradients of x,
    in_scale, in_shift and every weight against the oracle, in each layout."""
    check_against_oracle(case, SMALL, device, lay=lay)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[13], SPATIAL_CASES[0], CBAM_CASES[1],
                                  CBAM_CASES[10]], ids=str)
def test_half_precision(case, device):
    for dtype in dtypes(device)[1:]:
        check_against_oracle(case, HALF_SHAPE, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[6], SPATIAL_CASES[4], CBAM_CASES[9]], ids=str)
def test_shapes_layouts(case, shape, lay, device):
    if INTERPRET and shape != SHAPE and lay == "strided":
        pytest.skip("strided views: one shape is enough under the interpreter")
    check_against_oracle(case, shape, device, lay=lay)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CHANNEL_CASES[5], CBAM_CASES[13]], ids=str)
def test_many_samples(case, device):
    """More samples than one block of the small matmuls and the batch sums (16)."""
    check_against_oracle(case, (18, 20, 3, 2), device)


# ----------------------------------------------------------------------------- modules

def _module_pairs(C):
    return [(attnfused.reference.SEBlock("max", C, 4), attnfused.SEBlock("max", C, 4, backend=B)),
            (attnfused.reference.ECABlock(C), attnfused.ECABlock(C, backend=B)),
            (attnfused.reference.ChannelAttentionFC(C, 4), attnfused.ChannelAttentionFC(C, 4, backend=B)),
            (attnfused.reference.SpatialAttention(5), attnfused.SpatialAttention(5, backend=B)),
            (attnfused.reference.CBAMBlock("FC", 7, C, ratio=4), attnfused.CBAMBlock("FC", 7, C, ratio=4, backend=B)),
            (attnfused.reference.CBAMBlock("Conv", 3, C, gamma=2, b=1),
             attnfused.CBAMBlock("Conv", 3, C, gamma=2, b=1, backend=B))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(6))
def test_modules(index, device):
    """The fused module on Triton against the reference module with the same state dict."""
    C = 20
    ref, fused = _module_pairs(C)[index]
    ref = ref.double()
    fused.load_state_dict(ref.state_dict())
    fused = fused.float().to(device)
    x = rand(2, C, 6, 5).to(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    xf = x.float().to(device).requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out_f.cpu(), out_r) <= TOLERANCE[torch.float32]
    g = rand(*x.shape)
    out_r.backward(g)
    out_f.backward(g.float().to(device))
    assert rel_err(xf.grad.cpu(), xr.grad) <= GRAD_TOLERANCE[torch.float32]
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        assert rel_err(pf.grad.cpu(), pr.grad) <= GRAD_TOLERANCE[torch.float32], name


# ----------------------------------------------------------------------------- the ops

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_saved_tensors_match_reference_backend(lay, device):
    """pooled/argmax/smaps/sargmax of the Triton ops equal the reference backend's."""
    case = CBAM_CASES[0]
    o = case.o
    x = layout(rand(*SHAPE, dtype=torch.float32), lay)
    w = {k: None if v is None else v.float() for k, v in case.weights(SHAPE[1]).items()}
    args = (w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"], o["kind"], o["pool"], o["act"], o["gate"],
            o["padding"], o["maps"], o["sgate"], o["tie"], None, "none", None, None)
    ref = torch.ops.attnfused.cbam(x, *args, "reference")
    dev_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    out = torch.ops.attnfused.cbam(x.to(device), *dev_args, B)
    for name, a, b in zip(("y", "pooled", "argmax", "smaps", "sargmax"), out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.int64:
            assert torch.equal(a.cpu(), b), name
        else:
            assert rel_err(a.cpu(), b) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("device", DEVICES)
def test_ops_take_any_strides(device):
    """Called directly (the functional layer copies unusual strides first), the kernels
    address x through (h, w) strides: a view that skips every other column. Checked against the
    reference backend's ops in float64, each gradient within its target or twice the float32 noise
    floor (how far the float64 result moves when its inputs move by one float32 roundoff: this
    case's hardsigmoid gates have kinks, and its bias gradients nearly cancel)."""
    case = CBAM_CASES[5]
    o = case.o
    opts = (o["kind"], o["pool"], o["act"], o["gate"], o["padding"], o["maps"], o["sgate"], o["tie"])
    x64 = rand_distinct(*SHAPE, dtype=torch.float32).double()
    g64 = rand(*SHAPE).float().double()
    w64 = {k: None if v is None else v.float().double() for k, v in case.weights(SHAPE[1]).items()}

    def run(x, g, w, backend):
        ws = [None if w[k] is None else w[k].to(x.device) for k in ("w1", "b1", "w2", "b2", "sw", "sb")]
        out = torch.ops.attnfused.cbam(x, *ws, *opts, None, "none", None, None, backend)
        grads = torch.ops.attnfused.cbam_backward(g, x, *out[1:], *ws, *opts, backend)
        return [t.cpu() for t in (*out, *grads)]

    def strided(t):
        return None if t is None else layout(t.to(device=device, dtype=torch.float32), "strided")

    got = run(strided(x64), strided(g64), {k: None if v is None else v.float() for k, v in w64.items()}, B)
    ref = run(x64, g64, w64, "reference")

    floor = cases.float32_noise_floor(lambda x, g, w: run(x, g, w, "reference"), (x64, g64, w64), ref)
    names = ("y", "pooled", "argmax", "smaps", "sargmax", "dx", "dw1", "db1", "dw2", "db2", "dsw", "dsb")
    for name, a, b, f in zip(names, got, ref, floor):
        if b.dtype == torch.int64:
            assert torch.equal(a, b), name
        elif b.numel():
            tol = bound(GRAD_TOLERANCE[torch.float32], f)
            assert rel_err(a, b) <= tol, f"{name}: rel err {rel_err(a, b):.3g} (bound {tol:.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_spatial_halves(lay, device):
    """spatial_pool and spatial_scale (the halves with ordinary ops between them) and their
    gradients, against the float64 oracle."""
    x64 = rand(*SHAPE)
    t64 = torch.rand(SHAPE[0], SHAPE[2], SHAPE[3], dtype=torch.float64)
    xr, tr = x64.clone().requires_grad_(), t64.clone().requires_grad_()
    mean, mx = R.pool_channels(xr)
    ref_maps = torch.stack((mx, mean), 1)
    ref_y = xr * tr[:, None]
    gm, gy = rand(*ref_maps.shape), rand(*SHAPE)
    ref_gx, = torch.autograd.grad(ref_maps, xr, gm)
    ref_gx2, ref_gt = torch.autograd.grad(ref_y, (xr, tr), gy)

    x = layout(x64.float().to(device), lay).requires_grad_()
    t = t64.float().to(device).requires_grad_()
    maps = attnfused.functional.spatial_pool(x, backend=B)
    y = attnfused.functional.spatial_scale(x, t, backend=B)
    assert y.stride() == x.stride()
    assert rel_err(maps.cpu(), ref_maps) <= TOLERANCE[torch.float32]
    assert rel_err(y.cpu(), ref_y) <= TOLERANCE[torch.float32]
    gx, = torch.autograd.grad(maps, x, gm.float().to(device))
    gx2, gt = torch.autograd.grad(y, (x, t), gy.float().to(device))
    assert rel_err(gx.cpu(), ref_gx) <= GRAD_TOLERANCE[torch.float32]
    assert rel_err(gx2.cpu(), ref_gx2) <= GRAD_TOLERANCE[torch.float32]
    assert rel_err(gt.cpu(), ref_gt) <= GRAD_TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    # the autograd checks run forward and backward several times: the forward ops get them on a
    # GPU, under the interpreter the schema, fake and dispatch checks
    tests = None if device == "cuda" else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    cases.check_opcheck_every_op(B, device, cases=(CHANNEL_CASES[5], SPATIAL_CASES[1], CBAM_CASES[11]),
                                 test_utils=tests)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CBAM_CASES[1], CBAM_CASES[12]], ids=str)
def test_deterministic(case, lay, device):
    """Bit-identical outputs and gradients run after run (fixed-order reductions)."""
    cases.check_deterministic(case, B, (1,) + SHAPE[1:], lay, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_saved_pooling(lay, device):
    cases.check_pooled_contract(B, lay, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(3, 5), (9, 70)], ids=["one_split", "splits"])
def test_avg_pool_writes_zeros_as_its_max(hw, device):
    """Pool "avg" computes no max: the pooling pass itself (one split) or its finishing kernel
    (several) writes the zeros the ops' contract asks for. The allocator is first handed back a
    block of NaNs of the outputs' sizes, so outputs left unwritten would show."""
    from attnfused.backends.triton.channel import channel_pool

    x = rand(2, 24, *hw, device=device).float()
    garbage = [(torch.full((2, 2, 24), float("nan"), device=device),
                torch.full((2, 24), -7, dtype=torch.int64, device=device)) for _ in range(3)]
    del garbage
    pooled, argmax = channel_pool(x, "avg")
    assert rel_err(pooled[:, 0], x.double().mean((2, 3))) <= TOLERANCE[torch.float32]
    assert not pooled[:, 1].any() and not argmax.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[9], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
def test_empty_batch(case, device):
    cases.check_empty_batch(case, B, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[8], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
def test_nonfinite_like_reference(case, special, device):
    cases.check_nonfinite(case, B, special, device)


def test_availability_messages():
    assert backends.unavailable_reason(B, "cpu", torch.float64) is not None
    why = backends.unavailable_reason(B, "cpu", torch.bfloat16)
    assert why is not None and ("bfloat16" in why or "TRITON_INTERPRET" in why)
    if INTERPRET:
        assert backends.unavailable_reason(B, "cpu", torch.float32) is None
        assert backends.unavailable_reason(B, "cpu", torch.float16) is None
    else:
        assert "TRITON_INTERPRET" in backends.unavailable_reason(B, "cpu", torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """torch.compile traces the custom op (fake impl) without graph breaks; the Triton kernels
    run inside the op. aot_eager keeps the test fast; inductor treats the op the same way."""
    torch._dynamo.reset()
    m = attnfused.CBAMBlock("FC", 3, 8, ratio=2, backend=B).to(device)
    x = rand(2, 8, 5, 4, dtype=torch.float32, device=device).requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    ref = m(x)
    assert torch.equal(out, ref)
    gx, = torch.autograd.grad(out.sum(), x)
    gx_ref, = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(gx, gx_ref)


def test_hardsigmoid_keeps_nan():
    # a NaN logit stays NaN through the hard sigmoid, as in torch (min/max alone would map it to 0)
    x = torch.tensor([[[[0.5, float("nan")]]]])
    w = torch.randn(1, 1, 3)
    for dev in DEVICES:
        y = attnfused.functional.channel_attention(x.to(dev), w.to(dev), kind="conv", gate="hardsigmoid",
                                                   backend="triton")
        assert torch.isnan(y).all(), y
