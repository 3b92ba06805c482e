"""docs/contract.md §5: bad input raises a clear exception naming the argument; nothing passes silently."""
from __future__ import annotations

import pytest
import torch

import attnfused
from attnfused import functional as F
from tests._util import rand

CLASSES = {
    "SEBlock": lambda **kw: attnfused.SEBlock("avg", 8, 2, **kw),
    "ECABlock": lambda **kw: attnfused.ECABlock(8, **kw),
    "ChannelAttentionFC": lambda **kw: attnfused.ChannelAttentionFC(8, 2, **kw),
    "ChannelAttentionConv": lambda **kw: attnfused.ChannelAttentionConv(8, **kw),
    "SpatialAttention": lambda **kw: attnfused.SpatialAttention(3, **kw),
    "CBAMBlock": lambda **kw: attnfused.CBAMBlock("FC", 3, 8, 2, **kw),
}
BAD_INPUTS = [  # (input, exception, words the message must hold)
    (lambda: rand(2, 8, 5), ValueError, ["x", "4-D"]),
    (lambda: rand(2, 8, 5, 5, 1), ValueError, ["x", "4-D"]),
    (lambda: torch.randint(0, 5, (2, 8, 4, 4)), TypeError, ["x", "dtype", "int64"]),
    (lambda: torch.ones(2, 8, 4, 4, dtype=torch.bool), TypeError, ["x", "dtype", "bool"]),
    (lambda: [[1.0]], TypeError, ["x", "Tensor"]),
]


def _raises(exc, words, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("bad", range(len(BAD_INPUTS)))
def test_bad_inputs(name, bad):
    make, exc, words = BAD_INPUTS[bad]
    _raises(exc, words, lambda: CLASSES[name]()(make()))


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "SpatialAttention"])
def test_wrong_channel_count(name):
    _raises(ValueError, ["x", "8 channels", "9"], lambda: CLASSES[name]()(rand(2, 9, 4, 4, dtype=torch.float32)))


@pytest.mark.parametrize("name", list(CLASSES))
def test_weights_on_another_device(name):
    m = CLASSES[name]().to("meta")
    _raises(ValueError, ["device", "meta"], lambda: m(rand(2, 8, 4, 4, dtype=torch.float32)))


@pytest.mark.parametrize("name", list(CLASSES))
def test_unknown_backend(name):
    _raises(ValueError, ["backend", "'gpu'"], lambda: CLASSES[name](backend="gpu"))


def test_unavailable_backend_says_why_and_names_others():
    m = attnfused.SEBlock("avg", 8, 2, backend="cuda")
    with pytest.raises(attnfused.BackendUnavailableError) as info:
        m(rand(2, 8, 4, 4, dtype=torch.float32))
    msg = str(info.value)
    assert "'cuda'" in msg and "cpu" in msg and "reference" in msg


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("ATTNFUSED_BACKEND", "nonsense")
    _raises(ValueError, ["ATTNFUSED_BACKEND", "nonsense"],
            lambda: attnfused.ECABlock(8)(rand(2, 8, 4, 4, dtype=torch.float32)))
    monkeypatch.setenv("ATTNFUSED_BACKEND", "reference")
    x = rand(2, 8, 4, 4, dtype=torch.float32)
    assert attnfused.backends.resolve("auto", x) == "reference"


@pytest.mark.parametrize("make,exc,words", [
    (lambda: attnfused.SEBlock("mean", 8, 2), ValueError, ["mode", "'mean'"]),
    (lambda: attnfused.SEBlock("avg", 8, 16), ValueError, ["channels // ratio", "ratio=16"]),
    (lambda: attnfused.ChannelAttentionFC(4, 5), ValueError, ["channels // ratio"]),
    (lambda: attnfused.ChannelAttentionFC(4, 0), ValueError, ["ratio", "0"]),
    (lambda: attnfused.ChannelAttentionFC(4, 1.5), TypeError, ["ratio", "float"]),
    (lambda: attnfused.ECABlock(0), ValueError, ["channels"]),
    (lambda: attnfused.SpatialAttention(4), ValueError, ["k", "odd", "4"]),
    (lambda: attnfused.SpatialAttention(0), ValueError, ["k", "0"]),
    (lambda: attnfused.SpatialAttention(-3), ValueError, ["k", "-3"]),
    (lambda: attnfused.CBAMBlock("MLP", 3, 8, 2), ValueError, ["channel_attention_mode", "'MLP'"]),
    (lambda: attnfused.CBAMBlock("FC", 3, 8), ValueError, ["ratio", "None"]),
    (lambda: attnfused.CBAMBlock("Conv", 3, 8, None, 2), ValueError, ["b", "None"]),
    (lambda: attnfused.CBAMBlock("FC", 6, 8, 2), ValueError, ["k", "6"]),
])
def test_configuration_errors_at_construction(make, exc, words):
    _raises(exc, words, make)


def _mlp_weights(C=8, hidden=4):
    return rand(hidden, C, dtype=torch.float32), rand(C, hidden, dtype=torch.float32)


@pytest.mark.parametrize("call,exc,words", [
    (lambda x, w1, w2: F.channel_attention(x, w1.t(), None, w2), ValueError, ["w1", "shape"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2[:, :3]), ValueError, ["w2", "shape"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, rand(3), w2), ValueError, ["b1", "shape"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, None), TypeError, ["w2", "None"]),
    (lambda x, w1, w2: F.channel_attention(x, w1.int(), None, w2), TypeError, ["w1", "floating"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2, pool="sum"), ValueError, ["pool", "'sum'"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2, act="gelu"), ValueError, ["act", "'gelu'"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2, gate="tanh"), ValueError, ["gate", "'tanh'"]),
    (lambda x, w1, w2: F.channel_attention(x, rand(1, 1, 4), kind="conv"), ValueError, ["w1", "k odd"]),
    (lambda x, w1, w2: F.channel_attention(x, rand(1, 1, 3), kind="conv", padding="reflect"), ValueError,
     ["padding", "'reflect'"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2, kind="fc"), ValueError, ["kind", "'fc'"]),
    (lambda x, w1, w2: F.spatial_attention(x, rand(1, 2, 4, 4)), ValueError, ["weight", "k odd"]),
    (lambda x, w1, w2: F.spatial_attention(x, rand(1, 2, 3, 3), maps="mix"), ValueError, ["weight", "(1, 1, k, k)"]),
    (lambda x, w1, w2: F.spatial_attention(x, rand(1, 2, 3, 3), rand(2)), ValueError, ["bias", "shape"]),
    (lambda x, w1, w2: F.spatial_attention(x, rand(1, 2, 3, 3), maps="avg_max"), ValueError, ["maps"]),
    (lambda x, w1, w2: F.cbam(x, w1, None, w2, None, rand(1, 2, 2, 2)), ValueError, ["spatial_weight"]),
    (lambda x, w1, w2: F.cbam(x, w1, None, w2, None, rand(1, 2, 3, 3), spatial_gate="relu"), ValueError,
     ["spatial_gate"]),
    (lambda x, w1, w2: F.spatial_scale(x, rand(2, 4, 5)), ValueError, ["t", "shape"]),
    (lambda x, w1, w2: F.channel_attention(x, w1, None, w2, backend=3), TypeError, ["backend"]),
])
def test_functional_argument_errors(call, exc, words):
    x = rand(2, 8, 4, 4, dtype=torch.float32)
    w1, w2 = _mlp_weights()
    _raises(exc, words, lambda: call(x, w1, w2))


def test_empty_spatial_dims_rejected():
    _raises(ValueError, ["x", "non-empty"], lambda: attnfused.ECABlock(8)(torch.randn(2, 8, 0, 4)))
