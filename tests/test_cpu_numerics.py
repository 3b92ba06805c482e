"""The cpu backend at the edges of its numbers: empty batches whatever H, W and C are (a crash there
killed the process, so each op runs in a child process), and float32 sums over very many terms
(pooling over H*W, the maps over C, the backward's dot products), against float64."""
from __future__ import annotations

import itertools

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnfused
from attnfused._options import TIE_RULES
from attnfused.accuracy import rel_err
from attnfused.backends import extension

pytestmark = pytest.mark.skipif(extension.unavailable_reason("cpu") is not None,
                                reason=f"C++ extension unavailable: {extension.unavailable_reason('cpu')}")

OPS = torch.ops.attnfused
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- empty batches

# N = 0 with every mix of empty and non-empty C, H, W
EMPTY_SHAPES = [(0, 8, 0, 5), (0, 8, 4, 0), (0, 8, 0, 0), (0, 0, 3, 5), (0, 0, 0, 0), (0, 8, 4, 5)]
EMPTY_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _empty_inputs(shape, layout, dtype):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, memory_format=fmt)
    return x, x.clone().requires_grad_()


def _check_like_x(name, t, x):
    assert t.shape == x.shape and t.dtype == x.dtype and t.stride() == x.stride(), (
        f"{name}: expected shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}; got shape "
        f"{tuple(t.shape)}, dtype {t.dtype}, strides {t.stride()}")


def _check_small(name, t, shape, dtype):
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (
        f"{name}: expected shape {tuple(shape)} and dtype {dtype}, got {tuple(t.shape)} and {t.dtype}")


def _check_weight_grads(grads, weights):
    # a sum over no samples: zeros of each weight's shape and dtype
    for name, g, w in zip(weights, grads, weights.values()):
        _check_small(f"grad of {name}", g, w.shape, w.dtype)
        assert torch.count_nonzero(g.float()) == 0, f"grad of {name}: expected zeros over an empty batch, got {g}"


def _weights(op, C, dtype):
    w = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    channel = {"mlp": dict(w1=w(2, C), b1=w(2), w2=w(C, 2), b2=w(C)), "conv": dict(w1=w(1, 1, 3))}
    spatial = dict(sweight=w(1, 2, 3, 3), sbias=w(1))
    return channel, spatial


def _run_empty_case(op, shape, layout, dtype):
    """Forward and backward of `op` on an empty batch; every output checked."""
    x0, x = _empty_inputs(shape, layout, dtype)
    N, C, H, W = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    channel, spatial = _weights(op, C, dtype)
    if op in ("channel_attention", "cbam"):
        for (kind, cw), tie in itertools.product(channel.items(), TIE_RULES):
            opts = (kind, "avg+max", "relu", "sigmoid", "zeros")
            cargs = (cw["w1"], cw.get("b1"), cw.get("w2"), cw.get("b2"))
            if op == "channel_attention":
                out = OPS.channel_attention(x, *cargs, *opts, tie, None, "none", None, None, "cpu")
                leaves = {k: v for k, v in cw.items()}
            else:
                out = OPS.cbam(x, *cargs, spatial["sweight"], spatial["sbias"], *opts, "max_mean", "sigmoid", tie,
                               None, "none", None, None, "cpu")
                leaves = {**cw, **spatial}
                _check_small("smaps", out[3], (N, 2, H, W), acc)
                _check_small("sargmax", out[4], (N, H, W), torch.int64)
            _check_like_x("y", out[0], x0)
            _check_small("pooled", out[1], (N, 2, C), acc)
            _check_small("argmax", out[2], (N, C), torch.int64)
            assert out[-1].numel() == 0 and out[-1].dtype == acc, f"hidden: {out[-1].shape} {out[-1].dtype}"
            grads = torch.autograd.grad(out[0], [x, *leaves.values()], torch.ones_like(out[0]))
            _check_like_x("grad of x", grads[0], x0)
            _check_weight_grads(grads[1:], leaves)
    elif op == "spatial_attention":
        out = OPS.spatial_attention(x, spatial["sweight"], spatial["sbias"], "max_mean", "sigmoid", "split", None,
                                    "none", None, None, "cpu")
        _check_like_x("y", out[0], x0)
        _check_small("smaps", out[1], (N, 2, H, W), acc)
        _check_small("sargmax", out[2], (N, H, W), torch.int64)
        grads = torch.autograd.grad(out[0], [x, spatial["sweight"], spatial["sbias"]], torch.ones_like(out[0]))
        _check_like_x("grad of x", grads[0], x0)
        _check_weight_grads(grads[1:], spatial)
    elif op == "spatial_halves":
        smaps, sargmax = OPS.spatial_pool(x, "split", "cpu")
        _check_small("smaps", smaps, (N, 2, H, W), acc)
        _check_small("sargmax", sargmax, (N, H, W), torch.int64)
        (gx,) = torch.autograd.grad(smaps, [x], torch.ones_like(smaps))
        _check_like_x("grad of x (spatial_pool)", gx, x0)
        t = torch.rand(N, H, W, dtype=dtype).requires_grad_()
        y = OPS.spatial_scale(x, t, None, "none", "cpu")
        _check_like_x("y (spatial_scale)", y, x0)
        gx, gt = torch.autograd.grad(y, [x, t], torch.ones_like(y))
        _check_like_x("grad of x (spatial_scale)", gx, x0)
        _check_small("grad of t", gt, t.shape, t.dtype)
    elif op == "modules":  # the blocks as users call them (backend "cpu")
        if C == 0:
            return
        for m in (attnfused.SpatialAttention(3, backend="cpu"), attnfused.SEBlock("avg", C, 4, backend="cpu"),
                  attnfused.CBAMBlock("FC", 3, C, 4, backend="cpu")):
            m = m.to(dtype)
            y = m(x)
            _check_like_x(f"{type(m).__name__} output", y, x0)
            (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
            _check_like_x(f"{type(m).__name__} grad of x", gx, x0)
    else:
        raise ValueError(op)


def _empty_child(op: str) -> None:
    """Entry point of the child process: every empty shape, layout and dtype for `op`."""
    for shape in EMPTY_SHAPES:
        for layout in ("nchw", "channels_last"):
            for dtype in EMPTY_DTYPES:
                try:
                    _run_empty_case(op, shape, layout, dtype)
                except Exception as e:
                    raise AssertionError(f"{op} on an empty batch {shape} {layout} {dtype}: {e}") from e
    print("ok")


@pytest.mark.parametrize("op", ["channel_attention", "spatial_attention", "cbam", "spatial_halves", "modules"])
def test_empty_batch(op):
    """N = 0 returns empty results shaped, typed and strided as for any batch, whatever C, H and W
    are, and zero weight gradients; in a child process, so that a crash fails the test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    code = f"from tests.test_cpu_numerics import _empty_child; _empty_child({op!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (
        f"the child process for {op} exited with {r.returncode} (negative: killed by that signal):\n"
        f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


# ----------------------------------------------------------------------------- long float32 sums
# Each float32 sum over many terms (H*W up to 2^24 here, C up to 2^16) must stay within ~1e-6 of the
# float64 sum, relative to the sum of the terms' absolute values. Inputs are rand + 1 (every term
# positive: a running float32 sum drifts most there; past 2^24 its ulp exceeds the terms). Each test
# keeps its float64 work to one channel at a time (no float64 copy of x) and stays under ~3 GB.

SUM_TOL = 1e-6


def _uniform(shape, layout, seed):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32, memory_format=fmt).uniform_(1.0, 2.0, generator=g)


def _randn(shape, layout, seed):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32, memory_format=fmt).normal_(generator=g)


def _per_channel(f, *ts):
    """[f(t[:, c] in float64 for t in ts) for each c], stacked along dim 1."""
    return torch.stack([f(*(t[:, c].double() for t in ts)) for c in range(ts[0].shape[1])], 1)


def _rel_err_chunked(out, ref_of_channel):
    """||out - ref|| / ||ref|| in float64, one channel at a time (ref_of_channel(c) -> float64)."""
    num = den = 0.0
    for c in range(out.shape[1]):
        r = ref_of_channel(c)
        num += float(((out[:, c].double() - r) ** 2).sum())
        den += float((r ** 2).sum())
    return (num / den) ** 0.5


def _digest(t):
    """The bytes of t, hashed (run-to-run identity without a second copy of a big tensor)."""
    import hashlib

    v = t.detach()
    v = v if v.is_contiguous() else v.permute(0, 2, 3, 1)
    assert v.is_contiguous()
    return hashlib.sha256(v.numpy()).hexdigest()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pooled_over_space_large(layout):
    """The pooled mean and max over 4096 x 4096 pixels (1 x 16 x 4096 x 4096, 2^28 elements)."""
    x = _uniform((1, 16, 4096, 4096), layout, seed=1)
    C = x.shape[1]
    w1 = torch.randn(4, C) / 4
    w2 = torch.randn(C, 4) / 2
    args = (x, w1, None, w2, None, "mlp", "avg+max", "relu", "sigmoid", "zeros", "first", None, "none", None, None,
            "cpu")
    y, pooled, argmax, _ = OPS.channel_attention(*args)
    del y
    mean64 = _per_channel(lambda t: t.mean((1, 2)), x)  # the terms are positive: sum |x| = sum x
    err = ((pooled[:, 0].double() - mean64).abs() / mean64).max().item()
    assert err <= SUM_TOL, f"pooled mean over 4096 x 4096 ({layout}): relative error {err:.2e} > {SUM_TOL}"
    assert torch.equal(pooled[:, 1], x.amax((2, 3))), "pooled max differs from x.amax"
    y2, pooled2, argmax2, _ = OPS.channel_attention(*args)
    del y2
    assert torch.equal(pooled, pooled2) and torch.equal(argmax, argmax2), "two runs gave different bits"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pooled_over_channels_large(layout):
    """The channel maps' mean (and max) over C = 2^16 channels (1 x 65536 x 32 x 32, 2^26 elements)."""
    x = _uniform((1, 1 << 16, 32, 32), layout, seed=2)
    smaps, sargmax = OPS.spatial_pool(x, "first", "cpu")
    mean64 = torch.zeros(1, 32, 32, dtype=torch.float64)
    for c0 in range(0, x.shape[1], 4096):  # float64 in slices of channels
        mean64 += x[:, c0:c0 + 4096].double().sum(1)
    mean64 /= x.shape[1]
    err = ((smaps[:, 1].double() - mean64).abs() / mean64).max().item()
    assert err <= SUM_TOL, f"channel mean over 2^16 channels ({layout}): relative error {err:.2e} > {SUM_TOL}"
    assert torch.equal(smaps[:, 0], x.amax(1)), "channel max differs from x.amax"
    smaps2, sargmax2 = OPS.spatial_pool(x, "first", "cpu")
    assert torch.equal(smaps, smaps2) and torch.equal(sargmax, sargmax2), "two runs gave different bits"


def _se_reference(x, dy, w1, w2):
    """SEBlock("avg") in float64 from float64 sums over space: the gate s [N, C], and the gradients
    of sum(dy * y) for the pooled vector p, w1 and w2 (dy * y = dy * x * s: d/ds = sum_hw dy * x)."""
    p = _per_channel(lambda t: t.mean((1, 2)), x).requires_grad_()
    gs = _per_channel(lambda a, b: (a * b).sum((1, 2)), dy, x)
    W1, W2 = w1.double().requires_grad_(), w2.double().requires_grad_()
    s = torch.sigmoid(torch.relu(p @ W1.T) @ W2.T)
    gp, gw1, gw2 = torch.autograd.grad((s * gs).sum(), [p, W1, W2])
    return s.detach(), gp, gw1, gw2


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_seblock_large(layout):
    """A whole SEBlock forward and backward over 4096 x 4096 pixels (1 x 8 x 4096 x 4096, 2^27
    elements) against float64, and bit-identical run to run."""
    torch.manual_seed(3)
    N, C, H, W = 1, 8, 4096, 4096
    block = attnfused.SEBlock("avg", C, 2, backend="cpu")
    x = _uniform((N, C, H, W), layout, seed=4).requires_grad_()
    dy = _randn((N, C, H, W), layout, seed=5)
    w1, w2 = block.fc_layers[0].weight, block.fc_layers[2].weight

    def run():
        y = block(x)
        dx, gw1, gw2 = torch.autograd.grad(y, [x, w1, w2], dy)
        return y.detach(), dx, gw1, gw2

    y, dx, gw1, gw2 = run()
    s, gp, rw1, rw2 = _se_reference(x.detach(), dy, w1.detach(), w2.detach())
    xd = x.detach()
    errs = {
        "y": _rel_err_chunked(y, lambda c: xd[:, c].double() * s[:, c, None, None]),
        "grad of x": _rel_err_chunked(dx, lambda c: dy[:, c].double() * s[:, c, None, None]
                                      + gp[:, c, None, None] / (H * W)),
        "grad of w1": (torch.linalg.norm(gw1.double() - rw1) / torch.linalg.norm(rw1)).item(),
        "grad of w2": (torch.linalg.norm(gw2.double() - rw2) / torch.linalg.norm(rw2)).item(),
    }
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= 1e-5 or (k in ("y", "grad of x") and v > SUM_TOL)}
    assert not bad, f"SEBlock over 4096 x 4096 ({layout}) against float64, relative errors: {bad}"
    digests = [_digest(t) for t in (y, dx)]
    del y, dx
    y2, dx2, gw1b, gw2b = run()
    assert [_digest(t) for t in (y2, dx2)] == digests and torch.equal(gw1, gw1b) and torch.equal(gw2, gw2b), (
        "two runs gave different bits")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cbam_large(layout):
    """A whole CBAM block forward and backward over 1024 x 1024 pixels (1 x 16 x 1024 x 1024, 2^24
    elements) against the float64 reference, its pooled vectors and maps among the checks."""
    torch.manual_seed(6)
    N, C, H, W = 1, 16, 1024, 1024
    block = attnfused.CBAMBlock("FC", 7, C, 4, backend="cpu")
    ref = attnfused.CBAMBlock("FC", 7, C, 4, backend="reference").double()
    ref.load_state_dict(block.state_dict())
    x = _uniform((N, C, H, W), layout, seed=7).requires_grad_()
    dy = _randn((N, C, H, W), layout, seed=8)
    params = list(block.parameters())
    y = block(x)
    grads = torch.autograd.grad(y, [x] + params, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    grads64 = torch.autograd.grad(y64, [x64] + list(ref.parameters()), dy.double())
    errs = {"y": rel_err(y, y64)} | {f"grad {i}": rel_err(g, g64) for i, (g, g64) in enumerate(zip(grads, grads64))}
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= 1e-5}
    assert not bad, f"CBAM over 1024 x 1024 ({layout}) against float64, relative errors: {bad}"
    # the pooled means over space and over channels, saved by the op, against float64
    ch = block.channel_attention_block
    out = OPS.cbam(x.detach(), ch.fc_layers[0].weight, None, ch.fc_layers[2].weight, None,
                   block.spatial_attention_block.conv.weight, None, "mlp", "avg+max", "relu", "sigmoid", "zeros",
                   "max_mean", "sigmoid", "first", None, "none", None, None, "cpu")
    mean64 = x64.detach().mean((2, 3))
    err = ((out[1][:, 0].double() - mean64).abs() / mean64).max().item()
    assert err <= SUM_TOL, f"CBAM's pooled mean over 1024 x 1024 ({layout}): relative error {err:.2e}"
    y2 = block(x)
    grads2 = torch.autograd.grad(y2, [x] + params, dy)
    assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), "two runs differ"
