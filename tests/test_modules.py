"""The six fused modules against the reference classes and the article's code: forward,
input and parameter gradients, state dicts both ways, every backend this process runs."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnfused
from attnfused import reference
from attnfused.accuracy import bound
from tests._util import GRAD_TOLERANCE, LAYOUTS, TOLERANCE, autocast_for, cpu_backends, layout, rand, rel_err
from tests.cases import float32_noise_floor
from tests.seed_article import ARTICLE

BACKENDS = cpu_backends()

# (class name, constructor args for C channels); odd channel counts and ratios on purpose
CONFIGS = {
    "SEBlock": lambda C: ("avg", C, 3),
    "SEBlock-max": lambda C: ("max", C, 1),
    "ECABlock": lambda C: (C,),
    "ChannelAttentionFC": lambda C: (C, 2),
    "ChannelAttentionConv": lambda C: (C, 2, 1),
    "SpatialAttention": lambda C: (7,),
    "CBAMBlock": lambda C: ("FC", 5, C, 3),
    "CBAMBlock-Conv": lambda C: ("Conv", 3, C, None, 2, 1),
}
SHAPES = [(2, 37, 17, 3), (3, 3, 1, 1), (2, 1, 5, 4), (1, 64, 6, 7)]


def _build(key, C, cls_of):
    name = key.split("-")[0]
    args = CONFIGS[key](C)
    if "Channel" in name or name in ("SEBlock",) or (name == "CBAMBlock" and args[0] == "FC"):
        ratio = args[-1] if name != "CBAMBlock" else args[3]
        if C // ratio < 1:
            pytest.skip("channels // ratio < 1")
    return cls_of(name)(*args)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return module


def _grad_bounds(ref, fused, x64, g64, ref_grads):
    """The bound on each float32 gradient's error, by the rule of the op tests (cases.grad_bounds):
    GRAD_TOLERANCE, or twice the error of plain PyTorch run in float32 (the larger of two runs that
    sum in different orders: the reference module's autograd, and the fused module on the reference
    backend, its explicit backward), or twice the float32 noise floor, whichever is largest. A weight
    gradient that nearly cancels (the 1D conv's three weights, summed over the batch and every pixel)
    is fixed no better than that by float32 inputs: one draw in CI met 1.6e-3 on the reference
    backend itself, another 7.0e-4 there against a bound of 3.9e-4 from the reference module alone."""
    eager = [0.0] * len(ref_grads)
    plain = copy.deepcopy(fused).float()
    plain.backend = "reference"
    for m in (copy.deepcopy(ref).float(), plain):
        x32 = x64.float().requires_grad_()
        grads = torch.autograd.grad(m(x32), [x32, *m.parameters()], g64.float())
        eager = [max(e, rel_err(gr, r)) for e, gr, r in zip(eager, grads, ref_grads)]

    def run(xp, gp, *params):
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for p, v in zip(m.parameters(), params):
                p.copy_(v)
        xp = xp.requires_grad_()
        return torch.autograd.grad(m(xp), [xp, *m.parameters()], gp)

    floor = float32_noise_floor(run, (x64, g64, *[p.detach() for p in ref.parameters()]), ref_grads)
    return [bound(GRAD_TOLERANCE[torch.float32], max(e, f)) for e, f in zip(eager, floor)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("key", list(CONFIGS))
def test_module_matches_reference(key, shape, backend):
    C = shape[1]
    ref = _randomize(_build(key, C, lambda n: getattr(reference, n))).double()
    fused = _build(key, C, lambda n: getattr(attnfused, n))
    fused.backend = backend
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x64 = rand(*shape)
    g = rand(*shape)
    xr = x64.clone().requires_grad_()
    out_ref = ref(xr)
    ref_grads = torch.autograd.grad(out_ref, [xr, *ref.parameters()], g)
    tols = _grad_bounds(ref, fused, x64, g, ref_grads)
    for lay in LAYOUTS:
        x = layout(x64.float(), lay).requires_grad_()
        out = fused(x)
        assert rel_err(out, out_ref) <= TOLERANCE[torch.float32], lay
        grads = torch.autograd.grad(out, [x, *fused.parameters()], g.float())
        for gr, gref, tol in zip(grads, ref_grads, tols):
            assert gr.shape == gref.shape
            assert rel_err(gr, gref) <= tol, lay


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_dict_interchange_with_article(key):
    """Article -> reference -> fused -> article: same keys, shapes, values and outputs."""
    C = 24
    name = key.split("-")[0]
    article = _randomize(ARTICLE[name](*CONFIGS[key](C)))
    ref = _build(key, C, lambda n: getattr(reference, n))
    fused = _build(key, C, lambda n: getattr(attnfused, n))
    sd = article.state_dict()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ref.load_state_dict(sd)
    fused.load_state_dict(ref.state_dict())
    back = ARTICLE[name](*CONFIGS[key](C))
    back.load_state_dict(fused.state_dict())
    x = rand(4, C, 9, 5, dtype=torch.float32)
    expected = article(x)
    for m in (ref, fused, back):
        assert rel_err(m(x), expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key", ["SEBlock", "ECABlock", "SpatialAttention", "CBAMBlock"])
def test_half_precision_not_worse_than_pytorch(key, dtype):
    """docs/contract.md §4: the output within tolerance and never worse than twice the reference run in the same
    dtype; each gradient (input and parameters) within the gradient target, or twice the reference's
    gradient error in that dtype where larger."""
    backends = [b for b in BACKENDS if attnfused.backends.unavailable_reason(b, "cpu", dtype) is None]
    C = 32
    ref = _randomize(_build(key, C, lambda n: getattr(reference, n))).float()
    x, g = rand(2, C, 8, 8).to(dtype), rand(2, C, 8, 8).to(dtype)

    def run(module, xx, autocast=False):
        xx = xx.clone().requires_grad_()
        with autocast_for(dtype) if autocast else contextlib.nullcontext():
            y = module(xx)
        return y, torch.autograd.grad(y, [xx, *module.parameters()], g.to(y.dtype))

    exact, exact_grads = run(copy.deepcopy(ref).double(), x.double())
    half, half_grads = run(copy.deepcopy(ref).to(dtype), x)
    pytorch_err = rel_err(half, exact)
    grad_tols = [bound(GRAD_TOLERANCE[dtype], rel_err(h, e)) for h, e in zip(half_grads, exact_grads)]
    for backend in backends:
        fused = _build(key, C, lambda n: getattr(attnfused, n))
        fused.load_state_dict(ref.state_dict())
        fused.backend = backend
        y, grads = run(fused, x, autocast=True)  # float32 weights, half input: the autocast case
        err = rel_err(y, exact)
        assert err <= TOLERANCE[dtype]
        assert err <= 2 * pytorch_err, (backend, err, pytorch_err)
        names = ["x"] + [n for n, _ in fused.named_parameters()]
        for name, gr, ge, leaf, tol in zip(names, grads, exact_grads, [x, *fused.parameters()], grad_tols,
                                           strict=True):
            assert gr.dtype == leaf.dtype and gr.shape == leaf.shape, name
            assert rel_err(gr, ge) <= tol, f"{backend}: gradient of {name} rel err {rel_err(gr, ge):.3g} > {tol:.3g}"


def test_extra_repr_shows_configuration():
    text = repr(attnfused.CBAMBlock("Conv", 7, 64, None, 2, 1, backend="reference"))
    assert "backend='reference'" in text and "k=7" in text and "channels=64" in text
    assert "mode='max'" in repr(attnfused.SEBlock("max", 16, 4))


def test_fused_children_are_fused():
    m = attnfused.CBAMBlock("FC", 3, 16, 4, backend="reference")
    assert type(m.channel_attention_block) is attnfused.ChannelAttentionFC
    assert type(m.spatial_attention_block) is attnfused.SpatialAttention
    assert m.channel_attention_block.backend == "reference"
