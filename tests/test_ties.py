"""Converted models train like their originals where maxima tie (docs/contract.md §1): timm's blocks
take the max with `amax` (its gradient split evenly among tied elements) and convert to the "split"
rule; the article's take it with `AdaptiveMaxPool2d` / `torch.max` (one element) and keep "first".
Inputs full of ties: rounded values, zero channels and samples (a residual branch whose last
BatchNorm starts at zero), bfloat16-rounded activations. Float64, every backend that runs here."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import attnfused
from attnfused import reference as ref
from attnfused.variants import _FusedVariant
from tests._util import GRAD_TOLERANCE, cpu_backends, rel_err
from tests.test_convert import exact_hardsigmoids_
from tests.test_drop_in import randomize_

timm = pytest.importorskip("timm")
from timm.layers import cbam as tcbam  # noqa: E402
from timm.layers import squeeze_excite as tse  # noqa: E402

C, SHAPE = 8, (3, 8, 5, 6)
EXACT = 1e-12  # the same float64 math in another order
# a weight's gradient sums products over the batch and space, and can nearly cancel (a BatchNorm
# weight's in training, one all-zero sample in the batch): the contract's float64 gradient bound
WEIGHT_EXACT = GRAD_TOLERANCE[torch.float64]


def _timm_blocks():
    return {
        "SEModule": lambda: tse.SEModule(C, rd_ratio=1 / 4, add_maxpool=True),
        "EffectiveSEModule": lambda: tse.EffectiveSEModule(C, add_maxpool=True),
        "CbamModule": lambda: tcbam.CbamModule(C, rd_ratio=1 / 4),
        "LightCbamModule": lambda: tcbam.LightCbamModule(C, rd_ratio=1 / 4),
        "ChannelAttn": lambda: tcbam.ChannelAttn(C, rd_ratio=1 / 4),
        "SpatialAttn": lambda: tcbam.SpatialAttn(),
    }


def _article_blocks():
    return {
        "CBAMBlock-FC": lambda: ref.CBAMBlock("FC", 3, C, 4),
        "CBAMBlock-Conv": lambda: ref.CBAMBlock("Conv", 3, C, gamma=2, b=1),
        "SEBlock-max": lambda: ref.SEBlock("max", C, 4),
        "SpatialAttention": lambda: ref.SpatialAttention(3),
    }


def tied_input(kind: str) -> torch.Tensor:
    """float64 x of SHAPE whose maxima tie, over space and over channels."""
    if kind == "rounded":  # five values: ties everywhere, zeros too
        return torch.randint(-2, 3, SHAPE).double() / 2
    if kind == "zeros":  # one zero channel per sample, one all-zero sample
        x = torch.randn(SHAPE, dtype=torch.float64)
        x[torch.arange(SHAPE[0]), torch.randint(C, (SHAPE[0],))] = 0
        x[1] = 0
        return x
    if kind == "bfloat16":  # activations rounded to bfloat16 (8 bits): near ties become ties
        return (torch.randn(SHAPE) * 0.3).bfloat16().double()
    raise ValueError(kind)


def _grads(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """Output, input gradient and parameter gradients (by name) of `model` at x for dy."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _check_same(original, converted, x, exact=EXACT):
    dy = torch.randn(SHAPE, dtype=torch.float64)
    # torch's nn.Hardsigmoid backward rounds through float32 (EffectiveSE's gate): an exact one here
    y0, gx0, gw0 = _grads(exact_hardsigmoids_(copy.deepcopy(original)), x, dy)
    y1, gx1, gw1 = _grads(converted, x, dy)
    assert rel_err(y1, y0) <= exact
    assert rel_err(gx1, gx0) <= exact, f"input gradient: rel err {rel_err(gx1, gx0):.3g}"
    assert gw1.keys() == gw0.keys()
    for name, g in gw0.items():
        assert rel_err(gw1[name], g) <= max(exact, WEIGHT_EXACT), \
            f"gradient of {name}: rel err {rel_err(gw1[name], g):.3g}"


def _with_tie(model: nn.Module, tie: str) -> nn.Module:
    """A copy of a converted model whose fused variants use `tie` instead of the rule convert chose."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, _FusedVariant):
            for name in ("channel_config", "spatial_config"):
                if hasattr(m, name):
                    setattr(m, name, dataclasses.replace(getattr(m, name), tie=tie))
    return model


BACKENDS = cpu_backends(torch.float64)
INPUTS = ("rounded", "zeros", "bfloat16")


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("block", list(_timm_blocks()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_blocks_split_like_amax(request, backend, block, mode, inputs):
    if block == "EffectiveSEModule" and inputs == "zeros":
        request.node.add_marker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "EffectiveSE's one layer runs as relu(v) - relu(-v), whose gradient at a pooled value of exactly 0 "
            "(an all-zero channel) is 0, not 1 (docs/contract.md §8)")))
    original = randomize_(_timm_blocks()[block]()).double().train(mode == "train")
    converted, entries = attnfused.convert(original, backend=backend, report=True)
    assert entries[0].converted and entries[0].tie == "split", str(entries[0])
    assert "split among ties" in str(entries[0])
    _check_same(original, converted, tied_input(inputs))


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("block", list(_article_blocks()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_article_blocks_keep_one_element(backend, block, inputs):
    original = _article_blocks()[block]().double()
    converted, entries = attnfused.convert(original, backend=backend, report=True)
    assert entries[0].converted and entries[0].tie == "first", str(entries[0])
    _check_same(original, converted, tied_input(inputs))


@pytest.mark.parametrize("block", ["SEModule", "CbamModule", "LightCbamModule"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_other_rule_is_wrong_there(backend, block):
    """The check above can fail: with the rule swapped, the gradients leave the original's."""
    original = randomize_(_timm_blocks()[block]()).double().eval()
    converted = _with_tie(attnfused.convert(original, backend=backend), "first")
    with pytest.raises(AssertionError, match="gradient"):
        _check_same(original, converted, tied_input("rounded"))


def test_convert_report_names_no_rule_without_a_max():
    entries = attnfused.convert(nn.Sequential(ref.ECABlock(C), tse.SEModule(C)), report=True)[1]
    assert [e.tie for e in entries] == [None, None]
    assert all("max gradient" not in str(e) for e in entries)
