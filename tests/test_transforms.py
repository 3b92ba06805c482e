"""What people do with a model besides calling it: torch.func transforms (jvp, grad, vjp, jacrev,
jacfwd, vmap, per-sample gradients), forward-mode AD, torch.jit.trace / script, torch.export, and
attnfused.convert's model surgery (hooks, shared modules). Each gives the float64 reference's
answer or a clear error, never a silent zero (docs/contract.md §4 "Transforms")."""
from __future__ import annotations

import dataclasses
import io
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import attnfused
from attnfused import backends
from attnfused import functional as F
from attnfused import reference as ref
from attnfused.reference import functional as R
from tests._util import TOLERANCE, cpu_backends, rand, rel_err

DT = torch.float64
TOL = TOLERANCE[DT]
BACKENDS = [b for b in ("cpu", "reference") if b in cpu_backends(DT)]

# the blocks, built from either namespace with the same arguments (`ns` is attnfused or its reference)
MODULES: dict[str, Callable] = {
    "SE-avg": lambda ns, **kw: ns.SEBlock("avg", 8, 2, **kw),
    "SE-max": lambda ns, **kw: ns.SEBlock("max", 8, 2, **kw),
    "ECA": lambda ns, **kw: ns.ECABlock(8, **kw),
    "ChannelFC": lambda ns, **kw: ns.ChannelAttentionFC(8, 2, **kw),
    "ChannelConv": lambda ns, **kw: ns.ChannelAttentionConv(8, **kw),
    "Spatial": lambda ns, **kw: ns.SpatialAttention(3, **kw),
    "CBAM-FC": lambda ns, **kw: ns.CBAMBlock("FC", 3, 8, 2, **kw),
    "CBAM-Conv": lambda ns, **kw: ns.CBAMBlock("Conv", 3, 8, gamma=2, b=1, **kw),
}


def pair(name: str, backend: str, probe=None) -> tuple[nn.Module, nn.Module]:
    """(fused, reference) float64 twins with the same fresh random weights, drawn again while a ReLU
    layer is dead on `probe` (the test's input; every hidden unit <= 0 makes some weight gradient all
    zero, where a test cannot tell a right zero from a silent one: about 3% of the draws of SE-max)."""
    probe = rand(2, 8, 5, 4) if probe is None else probe
    gy = rand(*probe.shape)
    for _ in range(20):
        fused = MODULES[name](attnfused, backend=backend).to(DT)
        twin = MODULES[name](ref).to(DT)
        twin.load_state_dict(fused.state_dict())
        weights = list(twin.parameters())
        grads = torch.autograd.grad((twin(probe) * gy).sum(), weights)
        if all(g.abs().sum() > 0 for g in grads):
            return fused, twin
    raise AssertionError(f"{name}: no draw of weights with live gradients in 20")


def params(m: nn.Module) -> dict:
    return {k: v.detach() for k, v in m.named_parameters()}


def assert_matches(got, want, what: str) -> None:
    """Every tensor of `got` within float64 tolerance of `want`, and `want` not all zero (a silent
    zero derivative would otherwise pass wherever the reference's happens to vanish)."""
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        assert w.abs().sum() > 0, f"{what}[{i}]: the reference is all zero, the test cannot tell"
        err = rel_err(g, w)
        assert err <= TOL, f"{what}[{i}]: relative error {err:.2e} > {TOL:.0e}"


# ----------------------------------------------------------------------------- modules under torch.func

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_jvp_vjp_grad(name, backend):
    x, v = rand(2, 8, 5, 4), rand(2, 8, 5, 4)
    fused, twin = pair(name, backend, x)
    assert_matches(jvp(fused, (x,), (v,)), jvp(twin, (x,), (v,)), "jvp in x")
    p, tp = params(fused), {k: torch.randn_like(w) for k, w in params(fused).items()}
    run = lambda m: lambda p, x: functional_call(m, p, (x,))  # noqa: E731
    assert_matches(jvp(run(fused), (p, x), (tp, v)), jvp(run(twin), (p, x), (tp, v)), "jvp in weights and x")
    gy = rand(2, 8, 5, 4)
    assert_matches(vjp(run(fused), p, x)[1](gy), vjp(run(twin), p, x)[1](gy), "vjp")
    loss = lambda m: lambda p, x: (functional_call(m, p, (x,)) * gy).sum()  # noqa: E731
    assert_matches(grad(loss(fused), argnums=(0, 1))(p, x), grad(loss(twin), argnums=(0, 1))(p, x), "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_jacobians_vmap_per_sample_grads(name, backend):
    xp, gy = rand(4, 8, 4, 3), rand(4, 8, 4, 3)  # the per-sample gradients' batch
    fused, twin = pair(name, backend, xp)
    x = rand(1, 8, 3, 3)
    assert_matches(jacrev(fused)(x), jacrev(twin)(x), "jacrev")
    assert_matches(jacfwd(fused)(x), jacrev(twin)(x), "jacfwd")
    xs = rand(3, 2, 8, 4, 3)  # a batch of batches
    assert_matches(vmap(fused)(xs), vmap(twin)(xs), "vmap")
    # per-sample gradients of the weights: vmap over grad, each sample its own batch of one
    x = xp
    p = params(fused)

    def per_sample(m):
        loss = lambda p, xi, gi: (functional_call(m, p, (xi[None],)) * gi[None]).sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0, 0))(p, x, gy)

    assert_matches(per_sample(fused), per_sample(twin), "per-sample gradients")


def _forward_ad(m: nn.Module, x, v, weight_tangents: dict | None = None):
    """y and its tangent under torch.autograd.forward_ad (weights made dual through functional_call)."""
    with fwAD.dual_level():
        p = {k: fwAD.make_dual(w, weight_tangents[k]) for k, w in params(m).items()} if weight_tangents else {}
        y = functional_call(m, p, (fwAD.make_dual(x, v),)) if p else m(fwAD.make_dual(x, v))
        primal, tangent = fwAD.unpack_dual(y)
        return primal, tangent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_forward_ad(name, backend):
    fused, twin = pair(name, backend)
    x, v = rand(2, 8, 5, 4), rand(2, 8, 5, 4)
    want = _forward_ad(twin, x, v)
    assert_matches(_forward_ad(fused, x, v), want, "forward AD, weights requiring grad")
    with torch.no_grad():  # no autograd graph at all: the kernels would run bare
        assert_matches(_forward_ad(fused, x, v), want, "forward AD under no_grad")
    tw = {k: torch.randn_like(w) for k, w in params(fused).items()}
    assert_matches(_forward_ad(fused, x, v, tw), _forward_ad(twin, x, v, tw), "forward AD in weights and x")


# ----------------------------------------------------------------------------- functional ops under torch.func

@dataclasses.dataclass(frozen=True)
class FuncCase:
    name: str
    fused: Callable  # (backend, *args) -> tensor
    oracle: Callable  # (*args) -> tensor, the float64 reference
    args: Callable  # () -> fresh random args


C = 6
FUNC_CASES = [
    FuncCase("channel-mlp",
             lambda b, x, w1, b1, w2, b2: F.channel_attention(x, w1, b1, w2, b2, pool="avg+max", act="silu",
                                                              gate="hardsigmoid", backend=b),
             lambda x, w1, b1, w2, b2: R.channel_attention(x, w1, b1, w2, b2, pool="avg+max", act="silu",
                                                           gate_kind="hardsigmoid"),
             lambda: (rand(2, C, 5, 4), rand(3, C, scale=0.5), rand(3, scale=0.3), rand(C, 3, scale=0.5),
                      rand(C, scale=0.3))),
    FuncCase("channel-conv",
             lambda b, x, w: F.channel_attention(x, w, kind="conv", pool="mix", padding="circular", backend=b),
             lambda x, w: R.channel_attention(x, w, kind="conv", pool="mix", padding="circular"),
             lambda: (rand(2, C, 5, 4), rand(1, 1, 3, scale=0.7))),
    FuncCase("spatial",
             lambda b, x, w, bias: F.spatial_attention(x, w, bias, maps="mean_max", backend=b),
             lambda x, w, bias: R.spatial_attention(x, w, bias, maps="mean_max"),
             lambda: (rand(2, C, 5, 4), rand(1, 2, 3, 3, scale=0.4), rand(1, scale=0.3))),
    FuncCase("cbam",
             lambda b, x, w1, w2, sw: F.cbam(x, w1, None, w2, None, sw, maps="mix", backend=b),
             lambda x, w1, w2, sw: R.cbam(x, w1, None, w2, None, sw, maps="mix"),
             lambda: (rand(2, C, 5, 4), rand(3, C, scale=0.5), rand(C, 3, scale=0.5), rand(1, 1, 3, 3, scale=0.4))),
    FuncCase("spatial_pool",
             lambda b, x: F.spatial_pool(x, backend=b),
             lambda x: torch.stack(R.pool_channels(x)[::-1], 1),  # [max, mean]
             lambda: (rand(2, C, 5, 4),)),
    FuncCase("spatial_scale",
             lambda b, x, t: F.spatial_scale(x, t, backend=b),
             lambda x, t: x * t[:, None],
             lambda: (rand(2, C, 5, 4), rand(2, 5, 4))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FUNC_CASES, ids=lambda c: c.name)
def test_functional_transforms(case, backend):
    args = case.args()
    fused = lambda *a: case.fused(backend, *a)  # noqa: E731
    tangents = tuple(torch.randn_like(a) for a in args)
    assert_matches(jvp(fused, args, tangents), jvp(case.oracle, args, tangents), "jvp")
    argnums = tuple(range(len(args)))
    gy = torch.randn_like(case.oracle(*args))
    assert_matches(vjp(fused, *args)[1](gy), vjp(case.oracle, *args)[1](gy), "vjp")
    loss = lambda f: lambda *a: (f(*a) * gy).sum()  # noqa: E731
    assert_matches(grad(loss(fused), argnums)(*args), grad(loss(case.oracle), argnums)(*args), "grad")
    batched = [torch.stack((a, torch.randn_like(a), -0.5 * a)) for a in args]
    assert_matches(vmap(fused)(*batched), vmap(case.oracle)(*batched), "vmap")
    with fwAD.dual_level():
        y = fused(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)])
        got = fwAD.unpack_dual(y)
    assert_matches(tuple(got), jvp(case.oracle, args, tangents), "forward AD")


def test_raw_op_under_forward_ad_says_what_to_use():
    """torch.ops.attnfused.* have no forward-mode formula: an error naming the functional form,
    not a zero tangent."""
    x, v = rand(2, C, 4, 4), rand(2, C, 4, 4)
    backend = BACKENDS[0]
    with pytest.raises(RuntimeError, match=r"no forward-mode derivative.*attnfused\.functional\.spatial_pool"):
        jvp(lambda x: torch.ops.attnfused.spatial_pool(x, "first", backend)[0], (x,), (v,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="attnfused.functional.spatial_pool"):
        torch.ops.attnfused.spatial_pool(fwAD.make_dual(x, v), "first", backend)


# ----------------------------------------------------------------------------- torch.jit and torch.export

def _model(backend: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 1), attnfused.SEBlock("avg", 8, 2, backend=backend), nn.ReLU(),
                         attnfused.CBAMBlock("FC", 3, 8, 2, backend=backend)).to(DT)


@pytest.fixture
def unresolved(monkeypatch):
    """A first call: no backend resolved yet, so the availability checks run inside the tracer."""
    monkeypatch.setattr(backends, "_RESOLVED", {})


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_jit_trace_first_call(backend, unresolved):
    model, x = _model(backend), rand(2, 8, 5, 4)
    traced = torch.jit.trace(model, (x,))  # check_trace: a second trace must give the same graph
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert not any(k.startswith("attnfused_C::") or k == "prim::PythonOp" for k in kinds), kinds
    assert "attnfused::cbam" in kinds, kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = rand(3, 8, 4, 6).requires_grad_()
    want = model(x2)
    gy = torch.randn_like(want)
    (gwant,) = torch.autograd.grad(want, x2, gy)
    for run in (traced, loaded):
        y = run(x2)
        (gx,) = torch.autograd.grad(y, x2, gy)
        assert rel_err(y, want) <= TOL and rel_err(gx, gwant) <= TOL


def test_jit_script_says_it_is_unsupported():
    from attnfused.variants import FusedChannelMLP

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)

    for fused in (attnfused.SEBlock("avg", 8, 2), FusedChannelMLP(SE())):
        for model in (fused, nn.Sequential(nn.Identity(), fused)):
            with pytest.raises(RuntimeError, match=r"torch\.jit\.script does not support.*torch\.compile or torch\.export"):
                torch.jit.script(model)


def test_export_first_call_records_only_the_op(unresolved):
    model, x = _model(BACKENDS[0]), rand(2, 8, 5, 4)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "attnfused_C" in t], targets
    assert any("attnfused.cbam" in t for t in targets), targets
    x2 = rand(2, 8, 5, 4)
    assert rel_err(ep.module()(x2), model(x2)) <= TOL


# ----------------------------------------------------------------------------- convert: hooks and sharing

def test_convert_keeps_hooks():
    se = ref.SEBlock("avg", 8, 2)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), se, nn.ReLU()).to(DT)
    x = rand(2, 8, 5, 4)
    plain = model(x)
    seen = []
    handles = [
        se.register_forward_pre_hook(lambda m, args: (args[0] * 2,)),  # changes the input
        se.register_forward_hook(lambda m, args, out: out + 1),  # changes the output
        se.register_forward_hook(lambda m, args, kwargs, out: seen.append(type(m).__name__), with_kwargs=True),
        se.register_full_backward_hook(lambda m, gin, gout: seen.append("backward")),
    ]
    want = model(x)
    assert rel_err(want, plain) > 0.1  # the hooks matter
    for inplace in (False, True):
        converted = attnfused.convert(model, backend=BACKENDS[0], inplace=inplace)
        assert isinstance(converted[1], attnfused.SEBlock)
        seen.clear()
        xg = x.clone().requires_grad_()
        y = converted(xg)
        y.sum().backward()
        assert rel_err(y, want) <= TOL
        assert seen == ["SEBlock", "backward"]
    for h in handles:  # the handles the user holds still remove the hooks (inplace: the fused module's)
        h.remove()
    seen.clear()
    assert rel_err(converted(x), plain) <= TOL and seen == []


def test_convert_leaves_a_module_with_hooked_submodules():
    model = nn.Sequential(ref.SEBlock("avg", 8, 2))
    model[0].fc_layers[0].register_forward_hook(lambda m, a, out: out * 0)
    converted, report = attnfused.convert(model, report=True)
    assert type(converted[0]) is ref.SEBlock
    assert not report[0].converted and "fc_layers.0" in report[0].reason and "hooks" in report[0].reason


def test_convert_keeps_a_shared_module_shared():
    se = ref.SEBlock("avg", 8, 2)
    model = nn.Sequential(se, nn.Conv2d(8, 8, 1), se).to(DT)
    x = rand(2, 8, 5, 4)
    for inplace in (False, True):
        want = model(x)
        converted, report = attnfused.convert(model, backend=BACKENDS[0], inplace=inplace, report=True)
        assert isinstance(converted[0], attnfused.SEBlock) and converted[0] is converted[2]
        assert [e.path for e in report] == ["0", "2"] and all(e.converted for e in report)
        assert len(list(converted.parameters())) == len(list(model.parameters()))
        assert rel_err(converted(x), want) <= TOL


def test_convert_keeps_hooks_on_a_variant():
    """A timm/torchvision block becomes a variant module that takes over the original's layers;
    hooks on the block itself run on the variant, once."""
    misc = pytest.importorskip("torchvision.ops.misc")
    se = misc.SqueezeExcitation(8, 4).to(DT)
    calls = []
    se.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__) or out * 2)
    x = rand(2, 8, 5, 4)
    want = se(x)
    converted, report = attnfused.convert(nn.Sequential(se), backend=BACKENDS[0], report=True)
    assert report[0].replaced_by == "FusedChannelMLP"
    calls.clear()
    assert rel_err(converted(x), want) <= TOL and calls == ["FusedChannelMLP"]
