"""The cpu backend at the edges of its numbers: empty batches whatever H, W and C are (a crash there
killed the process, so each op runs in a child process), and float32 sums over very many terms
(pooling over H*W, the maps over C, the backward's dot products), against float64."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnfused
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
        for kind, cw in channel.items():
            opts = (kind, "avg+max", "relu", "sigmoid", "zeros")
            cargs = (cw["w1"], cw.get("b1"), cw.get("w2"), cw.get("b2"))
            if op == "channel_attention":
                out = OPS.channel_attention(x, *cargs, *opts, "cpu")
                leaves = {k: v for k, v in cw.items()}
            else:
                out = OPS.cbam(x, *cargs, spatial["sweight"], spatial["sbias"], *opts, "max_mean", "sigmoid", "cpu")
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
        out = OPS.spatial_attention(x, spatial["sweight"], spatial["sbias"], "max_mean", "sigmoid", "cpu")
        _check_like_x("y", out[0], x0)
        _check_small("smaps", out[1], (N, 2, H, W), acc)
        _check_small("sargmax", out[2], (N, H, W), torch.int64)
        grads = torch.autograd.grad(out[0], [x, spatial["sweight"], spatial["sbias"]], torch.ones_like(out[0]))
        _check_like_x("grad of x", grads[0], x0)
        _check_weight_grads(grads[1:], spatial)
    elif op == "spatial_halves":
        smaps, sargmax = OPS.spatial_pool(x, "cpu")
        _check_small("smaps", smaps, (N, 2, H, W), acc)
        _check_small("sargmax", sargmax, (N, H, W), torch.int64)
        (gx,) = torch.autograd.grad(smaps, [x], torch.ones_like(smaps))
        _check_like_x("grad of x (spatial_pool)", gx, x0)
        t = torch.rand(N, H, W, dtype=dtype).requires_grad_()
        y = OPS.spatial_scale(x, t, "cpu")
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
