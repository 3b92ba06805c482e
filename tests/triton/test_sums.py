"""Float32 sums of the Triton kernels against float64 at lengths where a running sum fails,
and empty tensors (no empty launch grid, no division by zero).

Accuracy: every sum over a long axis (pooling over H*W and over C, the backward's dot products,
the weight gradients' sums over pixels, channels and samples) must stay within ~1e-6 of the
float64 sum, relative to the sum of the terms' magnitudes. The inputs are 1 + r, r random below
2^-17: once a float32 running sum of such terms passes 128, half its ulp exceeds every r, so it
drops them all (relative error ~2e-6 at 256 terms, growing with the length), while a blocked sum
keeps them. Under the interpreter a long axis takes wide tiles and a single split, so each lane
of a tile sums 256 terms here, as lanes do on the GPU at large sizes; these are the smallest
shapes at which a running sum fails.
"""
from __future__ import annotations

import pytest
import torch

from tests import cases
from tests._util import layout
from tests.triton._env import DEVICES

if DEVICES:  # (conftest skips this directory otherwise)
    from attnfused.backends.triton import channel, reduce as red, spatial

TOL = 1e-6  # of the sum of the terms' magnitudes
BITS = 17


def biased(*shape, bits=BITS, device="cpu"):
    """Random float32 values in [1, 1 + 2^-bits): low bits that a long running sum drops."""
    return (1 + torch.rand(*shape, dtype=torch.float64) * 2.0 ** -bits).float().to(device)


def rel_to_magnitude(got, ref, mag):
    """Largest |got - ref| / mag over the outputs (ref, mag in float64)."""
    return ((got.double().cpu() - ref) / mag).abs().max().item()


# ----------------------------------------------------------------------------- the passes over x

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,lay", [(1, "nchw"), (2, "channels_last")])
def test_pool_over_space(C, lay, device):
    x = layout(biased(1, C, 256, 256, device=device), lay)
    pooled, _ = channel.channel_pool(x, "avg")
    x64 = x.double().cpu()
    err = rel_to_magnitude(pooled[:, 0], x64.mean((2, 3)), x64.abs().mean((2, 3)))
    assert err <= TOL, f"mean over H*W: error {err:.3g} of the mean magnitude, more than {TOL}"


@pytest.mark.parametrize("device", DEVICES)
def test_pool_over_channels(device):
    x = layout(biased(1, 2 ** 16, 1, 2, device=device), "channels_last")
    smaps, _ = spatial.spatial_pool(x)
    x64 = x.double().cpu()
    err = rel_to_magnitude(smaps[:, 1], x64.mean(1), x64.abs().mean(1))
    assert err <= TOL, f"mean over C: error {err:.3g} of the mean magnitude, more than {TOL}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,reduce_p", [((1, 1, 256, 256), True), ((1, 2 ** 16, 1, 1), False)],
                         ids=["over_space", "over_channels"])
def test_backward_dot_products(shape, reduce_p, device):
    """sum of dy * x (factors below 2^-18 from 1, so the products' low bits are as in the pools)."""
    x, dy = biased(*shape, bits=BITS + 1, device=device), biased(*shape, bits=BITS + 1, device=device)
    got = red.reduce(x, reduce_p, dy=dy)
    prod = x.double().cpu() * dy.double().cpu()
    dims = (2, 3) if reduce_p else (1,)
    err = rel_to_magnitude(got, prod.sum(dims).flatten(1), prod.abs().sum(dims).flatten(1))
    assert err <= TOL, f"dot product: error {err:.3g} of the sum of magnitudes, more than {TOL}"


@pytest.mark.skipif("cuda" not in DEVICES, reason="a GPU run: 2^32 elements (17 GB)")
def test_pool_over_space_past_2_31_elements():
    """Two channels of 2^31 - 2^16 pixels each, channels_last, on the GPU (17 GB in float32): the
    GPU's own configuration at its largest lengths, where each lane of a running sum would sum
    2^19 terms."""
    H, W = 2 ** 16, 2 ** 15 - 1
    x = torch.empty(1, 2, H, W, device="cuda", memory_format=torch.channels_last)
    x.uniform_(0, 2.0 ** -BITS).add_(1)
    pooled, _ = channel.channel_pool(x, "avg")
    for c in range(2):
        ref = sum(x[0, c, h:h + 1024].double().sum() for h in range(0, H, 1024)) / (H * W)  # the terms are > 0
        err = abs(pooled[0, 0, c].double() - ref).item() / ref.item()
        assert err <= TOL, f"mean over H*W of channel {c}: relative error {err:.3g}, more than {TOL}"


# ----------------------------------------------------------------------------- the weight gradients' sums

def check(name, got, ref_fn, *inputs):
    """got against ref_fn(inputs) in float64, relative to ref_fn(|inputs|) (the sum of the terms'
    magnitudes, for a ref_fn linear in each input)."""
    x64 = [t.double().cpu() for t in inputs]
    err = rel_to_magnitude(got, ref_fn(*x64), ref_fn(*[t.abs() for t in x64]))
    assert err <= TOL, f"{name}: error {err:.3g} of the sum of magnitudes, more than {TOL}"


def spatial_dw(K):
    """Weight gradients of the k x k conv (maps (max, mean)) and the bias, summed over samples."""
    def ref(m, d):
        d = d.view(m.shape[0], 1, *m.shape[2:])
        return torch.cat((torch.nn.grad.conv2d_weight(m, (1, 2, K, K), d, padding=K // 2).flatten(),
                          d.sum().view(1)))
    return ref


def conv1d_dw(K):
    """Tap gradients of the 1D conv over the avg vector (pool "avg"), summed over samples."""
    return lambda v, d: torch.nn.grad.conv1d_weight(v[:, :1], (1, 1, K), d[:, None], padding=K // 2).flatten()


def outer(a, b):
    return torch.cat((torch.einsum("nvi,nvj->ij", a, b).flatten(), a.sum((0, 1))))


def run_outer_sum(a, b):
    out, out_sum = torch.empty(a.shape[2], b.shape[2], device=a.device), torch.empty(a.shape[2], device=a.device)
    channel.outer_sum(a, b, out, out_sum)
    return torch.cat((out.flatten(), out_sum))


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_weight_grad_over_pixels(device):
    H, W, K = 64, 64, 3  # 4096 pixels: 256 steps of a lane under the interpreter
    smaps, dlog = biased(1, 2, H, W, bits=BITS + 1, device=device), biased(1, H * W, bits=BITS + 1, device=device)
    part = spatial.spatial_weight_grad_parts(smaps, dlog, K, 2 * K * K, 0)  # maps (max, mean)
    check("k x k conv weight gradient", part.sum(0), spatial_dw(K), smaps, dlog)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1d_weight_grad_over_channels(device):
    C, K = 4096, 3
    pooled, dlog = biased(1, 2, C, bits=BITS + 1, device=device), biased(1, C, bits=BITS + 1, device=device)
    part = channel.conv_weight_grad_parts(pooled, dlog, K, 0, False)  # pool "avg", zero padding
    check("1D conv weight gradient", part.sum(0), conv1d_dw(K), pooled, dlog)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_weight_grad_over_samples(device):
    N = 4096  # 256 blocks of 16 samples
    a, b = biased(N, 1, 16, bits=BITS + 1, device=device), biased(N, 1, 16, bits=BITS + 1, device=device)
    check("outer-product sums", run_outer_sum(a, b), outer, a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_over_batch(device):
    part = biased(1024, 5, bits=BITS - 2, device=device)  # per-sample partials of 5 weights
    check("sum over samples", red.sum_over_batch(part, torch.empty(5, device=device)), lambda p: p.sum(0), part)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grads_split_over_programs(device, monkeypatch):
    """Past MAX_RUNS runs a lane, the weight-gradient kernels split their axis over programs
    and sum the partials; forced here at small sizes (3 splits of 37 x 29 pixels, of 300
    channels, of 300 samples)."""
    for module in (spatial, channel):
        monkeypatch.setattr(module, "splits_for", lambda length, width, at_least=1: max(at_least, 3))
    H, W, K, C, N = 37, 29, 5, 300, 300
    smaps, dlog = torch.randn(2, 2, H, W, device=device), torch.randn(2, H * W, device=device)
    part = spatial.spatial_weight_grad_parts(smaps, dlog, K, 2 * K * K, 0)
    assert part.shape == (2 * 3, 2 * K * K + 1), part.shape
    check("k x k conv weight gradient", part.sum(0), spatial_dw(K), smaps, dlog)
    pooled, dlog = torch.randn(2, 2, C, device=device), torch.randn(2, C, device=device)
    part = channel.conv_weight_grad_parts(pooled, dlog, K, 0, False)
    assert part.shape == (2 * 3, K), part.shape
    check("1D conv weight gradient", part.sum(0), conv1d_dw(K), pooled, dlog)
    a, b = torch.randn(N, 2, 20, device=device), torch.randn(N, 2, 24, device=device)
    check("outer-product sums", run_outer_sum(a, b), outer, a, b)


# ----------------------------------------------------------------------------- empty tensors

@pytest.fixture
def no_empty_grid(monkeypatch):
    """Fail on any kernel launch with an empty grid."""
    cls = type(red._reduce_partial_kernel)
    getitem = cls.__getitem__

    def checked(self, grid):
        if not callable(grid):
            assert all(int(g) > 0 for g in grid), f"{self.__name__} launched with the empty grid {grid}"
        return getitem(self, grid)

    monkeypatch.setattr(cls, "__getitem__", checked)


EMPTY_CASES = [cases.CHANNEL_CASES[2], cases.CHANNEL_CASES[9], cases.SPATIAL_CASES[0], cases.CBAM_CASES[0],
               cases.CBAM_CASES[11]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 6, 0, 5), (0, 6, 4, 0), (0, 6, 0, 0)], ids=str)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=str)
def test_empty_batch_any_height_width(case, shape, device, no_empty_grid):
    """N = 0 returns empty results whatever H and W: outputs and input gradients like x, weight
    gradients of zeros."""
    for lay in ("nchw", "channels_last"):
        x = layout(torch.empty(shape, device=device), lay).requires_grad_()
        w = {k: None if v is None else v.float().to(device).requires_grad_()
             for k, v in case.weights(shape[1]).items()}
        out = case.run(x, w, "triton")
        assert out.shape == x.shape and out.stride() == x.stride(), (out.shape, out.stride(), x.stride())
        out.backward(torch.empty_like(out))
        assert x.grad.shape == x.shape, x.grad.shape
        for name, v in w.items():
            if v is not None:
                assert torch.equal(v.grad, torch.zeros_like(v)), f"grad of {name} must be zeros, got {v.grad}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 6, 0, 5), (2, 6, 4, 0), (2, 0, 4, 5)], ids=str)
def test_empty_axis_in_the_kernels(shape, device, no_empty_grid):
    """Called directly (the Python checks raise first for N > 0), the launchers neither launch an
    empty grid nor divide by zero: pooling over an empty axis says so, a pooling that keeps an
    empty axis returns nothing, a sum over an empty axis is zero, the scale pass writes nothing."""
    N, C, H, W = shape
    x = torch.empty(shape, device=device)
    over_space = C > 0  # the empty axis: H * W, else C
    with pytest.raises(ValueError, match="x: pooling over " + ("H . W" if over_space else "C")):
        channel.channel_pool(x, "avg") if over_space else spatial.spatial_pool(x)
    kept = spatial.spatial_pool(x)[0] if over_space else channel.channel_pool(x, "avg")[0]
    assert kept.numel() == 0, kept.shape
    dot = red.reduce(x, over_space, dy=x)
    assert torch.equal(dot, torch.zeros(N, C if over_space else H * W, device=device)), dot
    y = red.apply(x, torch.empty_like(x), s=torch.rand(N, C, device=device), t=torch.rand(N, H * W, device=device))
    assert y.shape == x.shape
