"""The cpu backend's own checks (the generic sweep over every backend lives in test_ops.py):
shapes that take the vectorized paths and their tails, both layouts, reduced precision, results
independent of the thread count, empty batches, and bad input rejected by the C++ kernels."""
from __future__ import annotations

import pytest
import torch

import attnfused
from attnfused.backends import extension
from tests._util import GRAD_TOLERANCE, TOLERANCE, autocast_for, layout, rand, rand_distinct, rel_err
from tests.cases import (ALL_CASES, CBAM_CASES, CHANNEL_CASES, SPATIAL_CASES, forward_ok, grad_bounds,
                         mlp_pre_activations)

pytestmark = pytest.mark.skipif(extension.unavailable_reason("cpu") is not None,
                                reason=f"C++ extension unavailable: {extension.unavailable_reason('cpu')}")

C_OPS = torch.ops.attnfused_C
# C = 19 and H*W = 300: vector bodies plus tails along both the channel and the spatial runs, and
# more rows than one register step (8) in the column passes
SHAPE = (2, 19, 20, 15)
# more than one column block (1024 columns) in every column pass: H*W = 1155 for the NCHW passes
# over channels, C = 1030 for the channels_last passes over space
WIDE_SHAPE = (1, 1030, 35, 33)
HALF_SHAPE = (2, 11, 6, 5)  # pairwise-distinct half-precision values
# float32 outputs past 8 MB, written with non-temporal stores: NCHW rows of 66 * 66 floats end
# inside cache lines (the NCHW channel scale then streams the rows as one run), 64 * 64 do not
STREAMED_SHAPES = [(2, 256, 66, 66), (2, 256, 64, 64)]


def _leaves(x, w):
    names = [k for k, v in w.items() if v is not None]
    return names, [x] + [w[k] for k in names]


def _run_with_grads(case, x, w, g, backend):
    out = case.run(x, w, backend)
    _, leaves = _leaves(x, w)
    return [out] + list(torch.autograd.grad(out, leaves, g))


def _check(case, shape, dtype, lay):
    wdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x64 = rand_distinct(*shape, dtype=dtype).to(dtype).double()
    w64 = {k: None if v is None else v.to(wdt).double() for k, v in case.weights(shape[1]).items()}
    xr = x64.clone().requires_grad_()
    wr = {k: None if v is None else v.clone().requires_grad_() for k, v in w64.items()}
    g = rand(*shape).to(dtype).double()
    ref = _run_with_grads(case, xr, wr, g, None)
    x = layout(x64.to(dtype), lay).requires_grad_()
    w = {k: None if v is None else v.to(wdt).requires_grad_() for k, v in w64.items()}
    with autocast_for(dtype):  # half x meets float32 weights only under autocast, as in torch's layers
        out = _run_with_grads(case, x, w, g.to(dtype), "cpu")
    assert out[0].stride() == x.stride() and out[1].stride() == x.stride()  # x's exact layout, no copies
    err = rel_err(out[0], ref[0])
    assert forward_ok(case, x64, w64, ref[0].detach(), err, dtype), f"{case} forward: {err:.3g}"
    names, leaves = _leaves(x, w)
    tols = grad_bounds(case, x64, w64, g, dtype, ref[1:], [GRAD_TOLERANCE[leaf.dtype] for leaf in leaves])
    for name, a, b, leaf, tol in zip(["x"] + names, out[1:], ref[1:], leaves, tols):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        assert rel_err(a, b) <= tol, f"{case} grad of {name}: {rel_err(a, b):.3g} (bound {tol:.3g})"


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_parity_vector_paths(case, lay):
    _check(case, SHAPE, torch.float32, lay)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CHANNEL_CASES[2], CHANNEL_CASES[13], SPATIAL_CASES[0], CBAM_CASES[4]], ids=str)
def test_parity_half(case, lay, dtype):
    _check(case, HALF_SHAPE, dtype, lay)


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CBAM_CASES[0], SPATIAL_CASES[0]], ids=str)
def test_parity_many_column_blocks(case, lay):
    _check(case, WIDE_SHAPE, torch.float32, lay)


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", STREAMED_SHAPES, ids=str)
@pytest.mark.parametrize("case", [CHANNEL_CASES[0], CHANNEL_CASES[8], SPATIAL_CASES[0], CBAM_CASES[0]], ids=str)
def test_streamed_outputs(case, shape, lay):
    x64 = rand(*shape).double()
    w64 = {k: None if v is None else v.double() for k, v in case.weights(shape[1]).items()}
    ref = case.run(x64, w64, None)
    x = layout(x64.float(), lay)
    out = case.run(x, {k: None if v is None else v.float() for k, v in w64.items()}, "cpu")
    assert out.stride() == x.stride()
    assert rel_err(out, ref) <= TOLERANCE[torch.float32], f"{case} forward"


# channels_last samples past 2 MB (kGroupBytes): each its own group, and each fetches the thread's
# next sample during its sweep (spatial_forward_sweep); 4 samples give 2 threads a next one each
BIG_SAMPLES_SHAPE = (4, 160, 60, 60)


@pytest.mark.parametrize("case", [CBAM_CASES[0], SPATIAL_CASES[0]], ids=str)
def test_sweep_on_big_samples(case, monkeypatch):
    """The channels_last forward's sweep (per sample: pooling over channels, conv and scaling in one
    pass, the next sample fetched ahead, the output streamed) against the float64 reference, and bit
    for bit against the separate passes over the batch."""
    monkeypatch.delenv("ATTNFUSED_CPU_PER_SAMPLE", raising=False)
    _check(case, BIG_SAMPLES_SHAPE, torch.float32, "channels_last")
    x = layout(rand(*BIG_SAMPLES_SHAPE, dtype=torch.float32), "channels_last")
    w = {k: None if v is None else v.float() for k, v in case.weights(x.shape[1]).items()}
    outs = []
    for per_sample in ("1", "0"):
        monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
        outs.append(case.run(x, w, "cpu"))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_max_pools_follow_torch_on_nonfinite(lay):
    """The column passes take the max on plain compares and redo a column that met a NaN or
    infinities of both signs; max and argmax still follow torch.max (the first NaN wins)."""
    x = rand(2, 20, 9, 11)
    x[0, 5, 2, 3] = x[0, 9, 2, 3] = float("nan")  # two NaNs in one column, neither in the first row
    x[0, 0, 1, 1] = float("nan")  # a NaN in the first row
    x[1, 3, 4, 4], x[1, 7, 4, 4] = float("inf"), -float("inf")  # a NaN sum without a NaN
    x[1, 6, 0, 2], x[1, 12, 0, 2] = -float("inf"), float("inf")
    _assert_max_pools_follow_torch(layout(x, lay))


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_max_pools_take_the_first_of_tied_maxima(lay):
    """Rows full of ties (three distinct values): the argmax is the first position of the max, as
    torch's, whichever vector lane, chain or tail element holds it; rows of -inf give position 0."""
    x = torch.randint(0, 3, (3, 37, 7, 9)).float()  # rows of 63 (over space) and 37 (over channels)
    x[0, :, 2, 3] = -float("inf")  # a pixel of -inf
    x[1, 4] = -float("inf")  # a channel of -inf
    x[2, 5], x[2, 5, 6, 8] = 0.0, 1.0  # a channel whose max is its last element
    x[2, :, 1, 1], x[2, 36, 1, 1] = 0.0, 1.0  # a pixel whose max is its last channel
    _assert_max_pools_follow_torch(layout(x, lay))


def _assert_max_pools_follow_torch(x):
    """The max maps and argmax of spatial_pool (over channels) and of channel attention's avg+max
    pool (over space) equal torch.max's bit for bit."""
    exact = dict(rtol=0, atol=0, equal_nan=True)
    smaps, sargmax = C_OPS.spatial_pool(x, "first")
    mx, idx = x.max(1)
    torch.testing.assert_close(smaps[:, 0], mx, **exact)
    assert torch.equal(sargmax, idx)
    C = x.shape[1]
    w1, w2 = torch.randn(4, C), torch.randn(C, 4)
    _, pooled, argmax, _ = C_OPS.channel_attention(x, w1, None, w2, None, "mlp", "avg+max", "relu", "sigmoid",
                                                   "zeros", "first")
    mx, idx = x.flatten(2).max(2)
    torch.testing.assert_close(pooled[:, 1], mx, **exact)
    assert torch.equal(argmax, idx)


def test_conv_kernel_wider_than_channels():
    # k = 5 > C = 3 with circular padding wraps more than once
    case = next(c for c in CHANNEL_CASES if c.o["kind"] == "conv" and c.o["padding"] == "circular")
    for lay in ("nchw", "channels_last"):
        _check(case, (2, 3, 4, 4), torch.float64, lay)


@pytest.mark.parametrize("per_sample", ["0", "1", "auto"])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CBAM_CASES[:6] + SPATIAL_CASES[:3] + [CHANNEL_CASES[8], CHANNEL_CASES[13],
                                                                         CHANNEL_CASES[15]], ids=str)
def test_both_pass_orders(case, lay, per_sample, monkeypatch):
    """The passes of CBAM, of spatial attention and of channel attention pass by pass over the batch
    ("0"), sample by sample in one parallel region ("1"), and by the thread count's choice ("auto":
    with 2 threads, groups of 2 samples)."""
    if per_sample == "auto":
        monkeypatch.delenv("ATTNFUSED_CPU_PER_SAMPLE", raising=False)
    else:
        monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
    _check(case, (4, 19, 20, 15), torch.float32, lay)


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_same_bits_any_thread_count(lay, monkeypatch):
    """Work is split by shape, never by thread count: 1 and 2 threads give identical bits, and so
    do the two pass orders (per sample, or per pass over the batch; picked by thread count)."""
    for case in (CBAM_CASES[0], SPATIAL_CASES[0], CHANNEL_CASES[13]):
        _same_bits(case, lay, monkeypatch)


def _same_bits(case, lay, monkeypatch):
    monkeypatch.delenv("ATTNFUSED_CPU_PER_SAMPLE", raising=False)  # the path by thread count first
    x = layout(rand(5, 40, 23, 17, dtype=torch.float32), lay)
    w = {k: None if v is None else v.float() for k, v in case.weights(40).items()}
    g = rand(*x.shape, dtype=torch.float32)

    def run():
        xx = x.clone().requires_grad_()
        ww = {k: None if v is None else v.clone().requires_grad_() for k, v in w.items()}
        return _run_with_grads(case, xx, ww, g, "cpu")

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many, again = run(), run()
        forced = []
        for per_sample in ("0", "1"):
            monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
            forced.append(run())
    finally:
        torch.set_num_threads(threads)
    for a, b, c, d, e in zip(one, many, again, *forced):
        assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, d) and torch.equal(d, e)


def _spatial_half_ops(x):
    smaps, sargmax = C_OPS.spatial_pool(x, "first")
    t = torch.rand(x.shape[0], *x.shape[2:], dtype=torch.float64)
    return smaps, sargmax, t


@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_spatial_pool_and_scale_direct(lay):
    x = layout(rand(2, 13, 9, 11), lay)
    smaps, sargmax, t = _spatial_half_ops(x)
    mx, idx = x.max(1)
    assert torch.equal(smaps[:, 0], mx) and torch.equal(sargmax, idx)
    # norm-wise: a mean of 13 near-cancelling values is ill-conditioned elementwise in any order
    assert rel_err(smaps[:, 1], x.mean(1)) <= TOLERANCE[torch.float64]
    gs = rand(*smaps.shape)
    dx = C_OPS.spatial_pool_backward(gs, x, sargmax, "first")
    xr = x.clone().requires_grad_()
    torch.autograd.backward(torch.stack((xr.max(1).values, xr.mean(1)), 1), gs)
    assert dx.stride() == x.stride() and torch.allclose(dx, xr.grad, rtol=1e-12, atol=1e-14)
    y = C_OPS.spatial_scale(x, t)
    assert y.stride() == x.stride() and torch.allclose(y, x * t[:, None], rtol=1e-14, atol=0)
    gy = layout(rand(*x.shape), lay)
    gx, gt = C_OPS.spatial_scale_backward(gy, x, t)
    assert torch.allclose(gx, gy * t[:, None], rtol=1e-14, atol=0)
    assert torch.allclose(gt, (gy * x).sum(1), rtol=1e-12, atol=1e-13)


def test_empty_batch_direct():
    for lay in ("nchw", "channels_last"):
        x = layout(torch.randn(0, 6, 4, 5), lay)
        w1, w2 = torch.randn(3, 6), torch.randn(6, 3)
        sw = torch.randn(1, 2, 3, 3)
        y, *saved = C_OPS.cbam(x, w1, None, w2, None, sw, None, "mlp", "avg+max", "relu", "sigmoid", "zeros",
                               "max_mean", "sigmoid", "first")
        assert y.shape == x.shape and [t.shape for t in saved] == [(0, 2, 6), (0, 6), (0, 2, 4, 5), (0, 4, 5),
                                                                   (0, 2 * 3)]
        grads = C_OPS.cbam_backward(torch.empty_like(x), x, *saved, w1, None, w2, None, sw, None, "mlp", "avg+max",
                                    "relu", "sigmoid", "zeros", "max_mean", "sigmoid", "first")
        assert grads[0].shape == x.shape
        for gw, w in zip(grads[1:], (w1, None, w2, None, sw, None)):
            assert gw.numel() == 0 if w is None else torch.equal(gw, torch.zeros_like(w))


def _channel_args(x=None, **over):
    x = torch.randn(2, 8, 5, 5) if x is None else x
    args = dict(x=x, w1=torch.randn(2, 8), b1=None, w2=torch.randn(8, 2), b2=None, kind="mlp", pool="avg",
                act="relu", gate="sigmoid", padding="zeros", tie="first")
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(8, 5, 5)), ValueError, "x must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 8, 5, 5))), TypeError, "x must have a floating dtype"),
    (dict(x=torch.randn(2, 8, 5, 6).transpose(2, 3)), ValueError, "x must be NCHW- or channels_last-contiguous"),
    (dict(x=torch.randn(2, 8, 0, 5)), ValueError, "x must have non-empty C, H and W"),
    (dict(w1=torch.randn(2, 7)), ValueError, "w1 must have shape"),
    (dict(w2=torch.randn(8, 3)), ValueError, "w2 must have shape"),
    (dict(w2=None), ValueError, "w2 must be given"),
    (dict(b1=torch.randn(3)), ValueError, "b1 must have shape"),
    (dict(w1=torch.randn(2, 8, dtype=torch.float64).to(torch.int32)), TypeError, "w1 must have a floating dtype"),
    (dict(kind="fc"), ValueError, r"kind must be one of \[mlp, conv\], got 'fc'"),
    (dict(pool="sum"), ValueError, "pool must be one of"),
    (dict(act="gelu"), ValueError, "act must be one of"),
    (dict(gate="tanh"), ValueError, "gate must be one of"),
    (dict(kind="conv", w1=torch.randn(1, 1, 4), w2=None), ValueError, "k odd"),
    (dict(kind="conv", w1=torch.randn(1, 1, 3)), ValueError, "w2 must be None for kind='conv'"),
    (dict(kind="conv", w1=torch.randn(1, 1, 3), w2=None, padding="reflect"), ValueError, "padding must be one of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_channel_input(over, exc, match):
    with pytest.raises(exc, match=match):
        C_OPS.channel_attention(*_channel_args(**over))


def test_bad_spatial_and_saved_input():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight must have shape \(1, 2, k, k\) with k odd"):
        C_OPS.spatial_attention(x, torch.randn(1, 2, 4, 4), None, "max_mean", "sigmoid", "first")
    with pytest.raises(ValueError, match=r"weight must have shape \(1, 1, k, k\)"):
        C_OPS.spatial_attention(x, torch.randn(1, 2, 3, 3), None, "mix", "sigmoid", "first")
    with pytest.raises(ValueError, match="bias must have shape"):
        C_OPS.spatial_attention(x, torch.randn(1, 2, 3, 3), torch.randn(2), "max_mean", "sigmoid", "first")
    with pytest.raises(ValueError, match="maps must be one of"):
        C_OPS.spatial_attention(x, torch.randn(1, 2, 3, 3), None, "min_max", "sigmoid", "first")
    with pytest.raises(ValueError, match="sgate must be one of"):
        C_OPS.cbam(x, torch.randn(2, 4), None, torch.randn(4, 2), None, torch.randn(1, 2, 3, 3), None, "mlp", "avg",
                   "relu", "sigmoid", "zeros", "max_mean", "relu", "first")
    y, smaps, sargmax = C_OPS.spatial_attention(x, torch.randn(1, 2, 3, 3), None, "max_mean", "sigmoid", "first")
    w = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="grad_y must have x's shape and strides"):
        C_OPS.spatial_attention_backward(torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last), x,
                                         smaps, sargmax, w, None, "max_mean", "sigmoid", "first")
    with pytest.raises(TypeError, match="smaps must have dtype Float"):
        C_OPS.spatial_attention_backward(torch.randn_like(x), x, smaps.double(), sargmax, w, None, "max_mean",
                                         "sigmoid", "first")
    with pytest.raises(IndexError, match=r"sargmax\[0, 0\] = 4 is outside"):
        bad = sargmax.clone()
        bad[0, 0, 0] = 4
        C_OPS.spatial_attention_backward(torch.randn_like(x), x, smaps, bad, w, None, "max_mean", "sigmoid", "first")
    with pytest.raises(ValueError, match="t must have shape"):
        C_OPS.spatial_scale(x, torch.rand(2, 5, 4))


@pytest.mark.parametrize("op", ["channel", "cbam"])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hidden_saves_the_mlp_state(op, lay, dtype):
    # the forward saves each sample's pre-activations; a backward given them is
    # bit-identical to one that recomputes them (hidden empty, as another backend saves it)
    N, C, Cr = 3, 19, 5
    x = layout(rand(N, C, 6, 7, dtype=dtype), lay)
    g = layout(rand(N, C, 6, 7, dtype=dtype), lay)
    sw = rand(1, 2, 3, 3, dtype=dtype)
    for pool in ("avg", "max", "avg+max", "mix"):
        for act, bias in (("relu", False), ("silu", True)):
            w1, w2 = rand(Cr, C, dtype=dtype), rand(C, Cr, dtype=dtype)
            b1, b2 = (rand(Cr, dtype=dtype), rand(C, dtype=dtype)) if bias else (None, None)
            copts = ("mlp", pool, act, "sigmoid", "zeros")
            tie = ("first",)
            if op == "channel":
                out = C_OPS.channel_attention(x, w1, b1, w2, b2, *copts, *tie)
                backward = lambda saved: C_OPS.channel_attention_backward(g, x, *saved, w1, b1, w2, b2, *copts,
                                                                          *tie)
            else:
                out = C_OPS.cbam(x, w1, b1, w2, b2, sw, None, *copts, "max_mean", "sigmoid", *tie)
                backward = lambda saved: C_OPS.cbam_backward(g, x, *saved, w1, b1, w2, b2, sw, None, *copts,
                                                             "max_mean", "sigmoid", *tie)
            pooled, hidden = out[1], out[-1]
            P = 2 if pool == "avg+max" else 1
            assert hidden.shape == (N, P * Cr) and hidden.dtype == pooled.dtype
            assert rel_err(hidden, mlp_pre_activations(pooled, w1, b1, pool)) <= TOLERANCE[dtype], (pool, act)
            restored = backward(out[1:])
            recomputed = backward((*out[1:-1], hidden.new_empty(0)))
            for a, b in zip(restored, recomputed):
                assert torch.equal(a, b), (pool, act)


def test_bad_hidden():
    x = torch.randn(2, 8, 5, 5)
    args = _channel_args(x=x, pool="avg+max")
    y, pooled, argmax, hidden = C_OPS.channel_attention(*args)
    assert hidden.shape == (2, 2 * 2)
    g = torch.randn_like(x)
    with pytest.raises(ValueError, match=r"hidden must have shape \[2, 4\]"):
        C_OPS.channel_attention_backward(g, x, pooled, argmax, hidden[:, :-1], *args[1:])
    with pytest.raises(TypeError, match="hidden must have dtype Float"):
        C_OPS.channel_attention_backward(g, x, pooled, argmax, hidden.double(), *args[1:])
    conv = _channel_args(x=x, kind="conv", w1=torch.randn(1, 1, 3), w2=None)
    y, pooled, argmax, none = C_OPS.channel_attention(*conv)
    assert none.numel() == 0  # the conv saves nothing: its backward recomputes it
    with pytest.raises(ValueError, match=r"hidden must have shape \[2, 0\]"):
        C_OPS.channel_attention_backward(g, x, pooled, argmax, hidden, *conv[1:])


def test_auto_picks_cpu():
    x = torch.randn(1, 4, 3, 3)
    assert attnfused.backends.resolve("auto", x) == "cpu"
    assert "cpu" in attnfused.available_backends("cpu", torch.float32)
    assert attnfused.backends.unavailable_reason("cpu", "cpu", torch.int32) is not None
    assert "CPU tensors" in attnfused.backends.unavailable_reason("cpu", "meta", torch.float32)


# ----------------------------------------------------------------------------- the traffic probe (bench)
# bench/traffic_probe.cpp, compiled just in time by bench.traffic (it is not part of the library)

def _probe(*args):
    from bench.traffic import probe_op
    return probe_op()(*args)


@pytest.mark.parametrize("per_sample", ["0", "1", "auto"])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPE, STREAMED_SHAPES[1]], ids=str)
def test_traffic_probe_copies_and_reads_everything(shape, lay, per_sample, monkeypatch):
    if per_sample == "auto":
        monkeypatch.delenv("ATTNFUSED_CPU_PER_SAMPLE", raising=False)
    else:
        monkeypatch.setenv("ATTNFUSED_CPU_PER_SAMPLE", per_sample)
    x, dy = layout(rand(*shape, dtype=torch.float32), lay), layout(rand(*shape, dtype=torch.float32), lay)
    s64 = {"x": x.double().sum(dim=(1, 2, 3)), "dy": dy.double().sum(dim=(1, 2, 3))}
    sq64 = {"x": x.double().square().sum(dim=(1, 2, 3)), "dy": dy.double().square().sum(dim=(1, 2, 3))}
    for passes, src, reads in (("r,r,w", x, "x x x"), ("d,d,p", dy, "dy x dy x dy"), ("d,r,p", dy, "dy x x dy"),
                               ("r", None, "x")):
        out, sums = _probe(x, dy, passes)
        if src is None:
            assert out.numel() == 0
        else:
            assert out.stride() == x.stride() and torch.equal(out, src), passes
        want = sum(s64[name] for name in reads.split())
        # float32 sums of ~1e6 random terms, which may cancel to near 0: the error is measured
        # against the terms' norm (float32 rounding is about 1e-5 of it; a missed row of 64 terms
        # moves the sum by about 4e-3 of it)
        scale = sum(sq64[name] for name in reads.split()).sqrt()
        assert sums.dtype == torch.float64 and ((sums - want).abs() / scale).max() <= 1e-4, passes


def test_traffic_probe_bad_input():
    x = torch.randn(2, 4, 5, 5)
    for passes in ("", "r,x", "rr", "r,,w", "R"):
        with pytest.raises(ValueError, match="passes must"):
            _probe(x, None, passes)
    with pytest.raises(ValueError, match="dy must be given"):
        _probe(x, None, "d,w")
    with pytest.raises(ValueError, match="dy must have x's shape and strides"):
        _probe(x, x.contiguous(memory_format=torch.channels_last), "r")
    with pytest.raises(ValueError, match="x must be 4-D"):
        _probe(x[0], None, "r")
