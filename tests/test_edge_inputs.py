"""Edge inputs (docs/contract.md §4, §5): non-strided layouts, non-tensor weights, mixed dtypes (torch's rule
outside autocast, float32 weights with half-precision x under it), empty batches whatever H, W
and C, and error messages that name the argument, what was expected and what came."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import attnfused
from attnfused import functional as F
from attnfused.reference import functional as R
from tests._util import TOLERANCE, cpu_backends, rand, rel_err
from tests.test_bad_input import _raises

C = 8
MODULES = {
    "SEBlock": lambda **kw: attnfused.SEBlock("avg", C, 2, **kw),
    "ECABlock": lambda **kw: attnfused.ECABlock(C, **kw),
    "ChannelAttentionFC": lambda **kw: attnfused.ChannelAttentionFC(C, 2, **kw),
    "ChannelAttentionConv": lambda **kw: attnfused.ChannelAttentionConv(C, **kw),
    "SpatialAttention": lambda **kw: attnfused.SpatialAttention(3, **kw),
    "CBAMBlock": lambda **kw: attnfused.CBAMBlock("FC", 3, C, 2, **kw),
}


def _weights(dtype=torch.float32):
    return dict(w1=rand(4, C, dtype=dtype, scale=0.4), w2=rand(C, 4, dtype=dtype, scale=0.5),
                sw=rand(1, 2, 3, 3, dtype=dtype, scale=0.4))


# each functional op called with x and the weights above (a dict): what the checks see
FUNCS = {
    "channel_attention": lambda x, w, **kw: F.channel_attention(x, w["w1"], None, w["w2"], **kw),
    "spatial_attention": lambda x, w, **kw: F.spatial_attention(x, w["sw"], **kw),
    "cbam": lambda x, w, **kw: F.cbam(x, w["w1"], None, w["w2"], None, w["sw"], **kw),
    "spatial_pool": lambda x, w, **kw: F.spatial_pool(x, **kw),
    "spatial_scale": lambda x, w, **kw: F.spatial_scale(x, torch.rand(2, 5, 4), **kw),  # x of shape (2, C, 5, 4)
}


# ----------------------------------------------------------------------------- layouts

def _non_strided():
    x = rand(2, C, 5, 4, dtype=torch.float32)
    out = {"sparse_coo": lambda: x.to_sparse(), "hybrid sparse_coo": lambda: x.to_sparse(2),
           "nested": lambda: torch.nested.nested_tensor([x[0], x[1]])}
    if torch.backends.mkldnn.is_available():
        out["mkldnn"] = lambda: x.to_mkldnn()
    return out


NON_STRIDED = _non_strided()


@pytest.mark.parametrize("kind", list(NON_STRIDED))
@pytest.mark.parametrize("name", list(MODULES) + list(FUNCS))
def test_non_strided_x_is_refused_by_name(name, kind):
    x = NON_STRIDED[kind]()
    call = (lambda: MODULES[name]()(x)) if name in MODULES else (lambda: FUNCS[name](x, _weights()))
    _raises(TypeError, ["x must be a dense (strided) tensor", "nested" if kind == "nested" else str(x.layout)], call)


def test_non_strided_or_non_tensor_weights_are_refused_by_name():
    x, w = rand(2, C, 5, 4, dtype=torch.float32), _weights()
    _raises(TypeError, ["w1", "strided", "sparse_coo"], lambda: F.channel_attention(x, w["w1"].to_sparse(), None, w["w2"]))
    _raises(TypeError, ["spatial_weight", "strided"], lambda: F.cbam(x, w["w1"], None, w["w2"], None, w["sw"].to_sparse()))
    for bad in ([[0.5] * C] * 4, w["w1"].numpy(), 0.5):
        _raises(TypeError, ["w1 must be a torch.Tensor", type(bad).__name__],
                lambda: F.channel_attention(x, bad, None, w["w2"]))
    _raises(TypeError, ["w2 must be a torch.Tensor", "ndarray"], lambda: F.channel_attention(x, w["w1"], None, np.ones((C, 4))))
    _raises(TypeError, ["weight must be a torch.Tensor", "list"], lambda: F.spatial_attention(x, [[1.0]]))
    _raises(TypeError, ["t must be a torch.Tensor", "float"], lambda: F.spatial_scale(x, 1.0))


# ----------------------------------------------------------------------------- dtypes

PAIRS = [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.float32),
         (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,w_dtype", PAIRS, ids=str)
def test_mixed_dtypes_follow_torch_outside_autocast(x_dtype, w_dtype):
    x, w = rand(2, C, 5, 4, dtype=x_dtype), _weights(w_dtype)
    with pytest.raises(RuntimeError):  # the rule is torch's: its layers refuse the same pair
        torch.nn.functional.linear(x.flatten(2).mean(2), w["w1"])
    for name in ("channel_attention", "spatial_attention", "cbam"):
        first = "sw" if name == "spatial_attention" else "w1"
        want = {"w1": "w1", "sw": "weight"}[first]
        _raises(TypeError, [f"{want} must have the input's dtype {x_dtype}", str(w_dtype)],
                lambda: FUNCS[name](x, w, backend="reference"))
    module = MODULES["SEBlock"]().to(w_dtype)
    _raises(TypeError, [str(x_dtype), str(w_dtype), "autocast"], lambda: module(x))


@pytest.mark.parametrize("backend", cpu_backends(torch.bfloat16))
def test_autocast_half_x_with_float32_weights(backend):
    """Under autocast the block sees a bfloat16 x (a conv's output) and float32 weights: it runs,
    and returns bfloat16 close to the float64 reference."""
    x, w = rand(2, C, 5, 4), _weights(torch.float64)
    want = R.cbam(x, w["w1"], None, w["w2"], None, w["sw"])
    w32 = {k: v.float() for k, v in w.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FUNCS["cbam"](x.bfloat16(), w32, backend=backend)
        with pytest.raises(TypeError, match="float64"):  # autocast does not cast float64: torch refuses it too
            FUNCS["cbam"](x, w32, backend=backend)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, want) <= TOLERANCE[torch.bfloat16]
    # outside autocast the float32 maps of spatial_pool may scale a half-precision x (t is not a weight)
    t = torch.sigmoid(F.spatial_pool(x.bfloat16(), backend=backend)[:, 1])
    assert F.spatial_scale(x.bfloat16(), t, backend=backend).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- messages

def _bad_calls():
    x, w = rand(2, C, 5, 4, dtype=torch.float32), _weights()
    ch = lambda **kw: F.channel_attention(**{"x": x, "w1": w["w1"], "w2": w["w2"], **kw})  # noqa: E731
    return [  # (call, exception, words the message must hold: the argument, what was expected, what came)
        (lambda: ch(w1=rand(4, C - 1, dtype=torch.float32)), ValueError, ["w1", f"(hidden, {C})", f"(4, {C - 1})"]),
        (lambda: ch(w2=rand(C, 3, dtype=torch.float32)), ValueError, ["w2", f"({C}, 4)", f"({C}, 3)"]),
        (lambda: ch(b1=rand(5, dtype=torch.float32)), ValueError, ["b1", "(4,)", "(5,)"]),
        (lambda: ch(w1=rand(1, 1, 4, dtype=torch.float32), w2=None, kind="conv"), ValueError, ["w1", "(1, 1, k)", "(1, 1, 4)"]),
        (lambda: ch(kind="conv", w1=rand(1, 1, 3, dtype=torch.float32)), ValueError, ["w2", "None", "conv"]),
        (lambda: ch(w1=w["w1"].to("meta")), ValueError, ["w1", "device", "cpu", "meta"]),
        (lambda: ch(w1=w["w1"].int()), TypeError, ["w1", "floating", "int32"]),
        (lambda: ch(pool="median"), ValueError, ["pool", "avg+max", "median"]),
        (lambda: ch(act="gelu"), ValueError, ["act", "silu", "gelu"]),
        (lambda: ch(backend=3), TypeError, ["backend", "str", "int"]),
        (lambda: ch(backend="gpu"), ValueError, ["backend", "reference", "gpu"]),
        (lambda: ch(x=x[:, :, :0]), ValueError, ["x", "non-empty", "(2, 8, 0, 4)"]),
        (lambda: F.spatial_attention(x, rand(1, 2, 4, 4, dtype=torch.float32)), ValueError,
         ["weight", "(1, 2, k, k)", "(1, 2, 4, 4)"]),
        (lambda: F.spatial_attention(x, w["sw"], rand(2, dtype=torch.float32)), ValueError, ["bias", "(1,)", "(2,)"]),
        (lambda: F.spatial_attention(x, w["sw"], maps="sum"), ValueError, ["maps", "max_mean", "sum"]),
        (lambda: F.cbam(x, w["w1"], None, w["w2"], None, w["sw"], spatial_gate="tanh"), ValueError,
         ["spatial_gate", "hardsigmoid", "tanh"]),
        (lambda: F.spatial_scale(x, rand(2, 5, 5, dtype=torch.float32)), ValueError, ["t", "(2, 5, 4)", "(2, 5, 5)"]),
        (lambda: F.spatial_pool(x.double().to(torch.complex128)), TypeError, ["x", "floating", "complex128"]),
        (lambda: MODULES["SEBlock"]()(rand(2, C + 1, 3, 3, dtype=torch.float32)), ValueError,
         ["x", f"{C} channels", f"{C + 1}"]),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_messages_name_argument_expected_and_got(i):
    call, exc, words = _bad_calls()[i]
    _raises(exc, words, call)


def test_unavailable_backend_says_why_and_which_can():
    x = rand(2, C, 5, 4, dtype=torch.float32)
    if "cuda" in cpu_backends():
        pytest.skip("cuda runs on CPU tensors here")
    _raises(attnfused.BackendUnavailableError, ["'cuda'", "cpu", "Backends that can", "reference"],
            lambda: F.spatial_pool(x, backend="cuda"))


# ----------------------------------------------------------------------------- empty batches

EMPTY_SHAPES = [(0, C, 0, 5), (0, C, 3, 0), (0, C, 0, 0), (0, C, 4, 4), (0, 0, 3, 3)]

# run in a child process, so that a kernel that kills the process fails the test, not the session
_EMPTY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import attnfused
    from attnfused import functional as F
    backend, C = sys.argv[1], int(sys.argv[2])
    makers = {
        "SEBlock": lambda: attnfused.SEBlock("avg", C, 2, backend=backend),
        "ECABlock": lambda: attnfused.ECABlock(C, backend=backend),
        "ChannelAttentionConv": lambda: attnfused.ChannelAttentionConv(C, backend=backend),
        "SpatialAttention": lambda: attnfused.SpatialAttention(3, backend=backend),
        "CBAMBlock": lambda: attnfused.CBAMBlock("FC", 3, C, 2, backend=backend),
        "spatial_pool": lambda: lambda x: F.spatial_pool(x, backend=backend),
        "spatial_scale": lambda: lambda x: F.spatial_scale(x, x.new_ones(x.shape[0], *x.shape[2:]), backend=backend),
    }
    out = []
    for shape in json.loads(sys.argv[3]):
        for name, make in makers.items():
            if shape[1] != C and name not in ("SpatialAttention", "spatial_pool", "spatial_scale"):
                continue
            for memory_format in (torch.contiguous_format, torch.channels_last):
                m = make()
                x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
                y = m(x)
                y.sum().backward()
                grads = [p.grad for p in m.parameters()] if isinstance(m, torch.nn.Module) else []
                out.append(dict(name=name, shape=shape, y_shape=list(y.shape), y_dtype=str(y.dtype),
                                x_grad=list(x.grad.shape), weight_grads_zero=all(g is None or not g.any() for g in grads)))
    print(json.dumps(out))
""")


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_empty_batch_returns_empty_whatever_h_w_c(backend):
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _EMPTY_SCRIPT, backend, str(C), json.dumps(EMPTY_SHAPES)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"the process ended with {run.returncode}: {run.stderr[-3000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * (4 * 7 + 3)
    for r in results:
        want = [0, 2, *r["shape"][2:]] if r["name"] == "spatial_pool" else r["shape"]
        assert r["y_shape"] == want and r["x_grad"] == r["shape"] and r["weight_grads_zero"], r
        assert r["y_dtype"] == "torch.float32", r


@pytest.mark.parametrize("shape", [(2, C, 0, 5), (2, C, 3, 0), (1, 0, 3, 3)], ids=str)
def test_empty_h_w_or_c_with_samples_is_refused(shape):
    x = torch.randn(shape)
    _raises(ValueError, ["x must have non-empty C, H and W when N > 0", str(tuple(shape))],
            lambda: F.spatial_attention(x, _weights()["sw"]))
