"""Converted models keep working with what surrounds training: torch.compile(fullgraph=True),
deterministic mode, autocast, ONNX export, deepcopy and pickling, channels_last."""
from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import attnfused
from attnfused import reference as ref
from attnfused.accuracy import bound
from tests._util import GRAD_TOLERANCE, TOLERANCE, rel_err

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import cbam as tcbam  # noqa: E402
from timm.layers import eca as teca  # noqa: E402
from timm.layers import squeeze_excite as tse  # noqa: E402
from torchvision.ops import SqueezeExcitation  # noqa: E402

C = 16


def every_kind() -> nn.Module:
    """One of each supported module, in a row: every fused path of convert in one model. The
    model's output is the last block's: each block scales it by its gates (no pooling and no
    Linear head whose bias would dominate), so the output depends on every block at order one."""
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        tse.SEModule(C, rd_ratio=1 / 4, add_maxpool=True),
        tse.EffectiveSEModule(C),
        teca.EcaModule(C),
        teca.CecaModule(C),
        tcbam.CbamModule(C, rd_ratio=1 / 4),
        tcbam.LightCbamModule(C, rd_ratio=1 / 4),
        SqueezeExcitation(C, 4, scale_activation=nn.Hardsigmoid),
        ref.CBAMBlock("FC", 3, C, 4),
        ref.ECABlock(C),
    )


def randomize_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


@pytest.fixture
def pair():
    """(original, converted) of `every_kind`, random BatchNorm statistics."""
    original = randomize_(every_kind())
    converted, entries = attnfused.convert(original, report=True)
    assert len(entries) == 9 and all(e.converted for e in entries), [str(e) for e in entries]
    return original, converted


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- torch.compile

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_no_graph_break(pair, mode, device):
    """aot_eager traces forward and backward through the custom ops and their fake kernels."""
    converted = pair[1].to(device)
    converted.train(mode == "train")
    eager = copy.deepcopy(converted)
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 10, 9, device=device)
    y = compiled(x)
    y.square().sum().backward()
    y_ref = eager(x)
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) <= TOLERANCE[torch.float32]
    for g, g_ref in zip(_grads(converted), _grads(eager)):
        assert rel_err(g, g_ref) <= 1e-4


def test_compile_inductor_matches_original():
    original = randomize_(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), tcbam.CbamModule(C, rd_ratio=1 / 4))).eval()
    converted = attnfused.convert(original)
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(compiled(x), original(x)) <= TOLERANCE[torch.float32]


# ----------------------------------------------------------------------------- determinism

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_deterministic_mode_bit_identical(pair, deterministic, mode, device):
    converted = pair[1].to(device)
    converted.train(mode == "train")
    x = torch.randn(2, 3, 10, 9, device=device)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(converted)
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().sum().backward()
        runs.append([y, xi.grad] + _grads(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------- autocast

def _run(model, x, autocast=None):
    """Every block's output (forward hooks), the model's output, and the parameters' gradients of
    the sum of squares of the output, by name; under autocast `(device_type, dtype)` if given."""
    model = copy.deepcopy(model)  # BatchNorm statistics and .grad of the caller's model untouched
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in model]
    with torch.autocast(*autocast) if autocast else contextlib.nullcontext():
        y = model(x)
    y.float().square().sum().backward()
    for h in hooks:
        h.remove()
    return outs, y, {n: p.grad for n, p in model.named_parameters()}


def _check_against_float64(original, converted, x, dtype, autocast=None):
    """The converted model (under autocast, or cast to `dtype`) against the original run in float64:
    each block's output, the output and every parameter's gradient within the dtype's target, or
    twice the error of the original model run the same way where that is larger (docs/contract.md §4; with
    every block in a row the roundings add up). Blocks and gradients are compared one by one so
    that a block whose half-precision path is wrong is named."""
    exact_outs, _, exact_grads = _run(copy.deepcopy(original).double(), x.double())
    orig_outs, _, orig_grads = _run(original, x, autocast)
    outs, y, grads = _run(converted, x, autocast)
    assert y.dtype == orig_outs[-1].dtype == dtype, (y.dtype, orig_outs[-1].dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    for i, (out, orig, exact) in enumerate(zip(outs, orig_outs, exact_outs, strict=True)):
        err, tol = rel_err(out, exact), bound(TOLERANCE[dtype], rel_err(orig, exact))
        assert err <= tol, f"block {i} ({type(original[i]).__name__}): output rel err {err:.3g} > {tol:.3g}"
    assert grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        g = grads[name]
        assert g is not None and g.dtype == dict(converted.named_parameters())[name].dtype, name
        err, tol = rel_err(g, exact), bound(GRAD_TOLERANCE[dtype], rel_err(orig_grads[name], exact))
        assert err <= tol, f"gradient of {name}: rel err {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_cpu_bfloat16(pair, mode):
    original, converted = (m.train(mode == "train") for m in pair)
    _check_against_float64(original, converted, torch.randn(2, 3, 10, 9), torch.bfloat16, ("cpu", torch.bfloat16))


def test_bfloat16_model(pair):
    """A model cast to bfloat16 (weights too) runs and stays as close to the float64 original as
    the original in bfloat16."""
    original, converted = (m.to(torch.bfloat16).eval() for m in pair)
    _check_against_float64(original, converted, torch.randn(2, 3, 10, 9, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_cuda(pair, dtype, mode):
    original, converted = (m.cuda().train(mode == "train") for m in pair)
    _check_against_float64(original, converted, torch.randn(4, 3, 16, 16, device="cuda"), dtype, ("cuda", dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_matches_original(pair, mode):
    original, converted = (m.cuda().train(mode == "train") for m in pair)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    assert rel_err(converted(x), original(x)) <= 1e-4


# ----------------------------------------------------------------------------- ONNX

def test_onnx_export_standard_operators(pair, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    original, converted = (m.eval() for m in pair)
    x = torch.randn(2, 3, 10, 9)
    path = tmp_path / "converted.onnx"
    torch.onnx.export(converted, (x,), str(path), dynamo=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {n.domain for n in proto.graph.node} | {n.domain for f in proto.functions for n in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators: {domains}"
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert rel_err(torch.from_numpy(out), original(x)) <= 1e-5


def test_onnx_flag_does_not_leak(pair):
    """After an export the fused ops run again (the reference math is for the exporter only)."""
    _, converted = pair
    assert not torch.onnx.is_in_onnx_export()
    converted.eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.profiler.profile() as prof:
        converted(x)
    assert any("attnfused::" in e.name for e in prof.events())


# ----------------------------------------------------------------------------- copies

def _same_outputs(a, b, x):
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_deepcopy(pair):
    _, converted = pair
    twin = copy.deepcopy(converted)
    _same_outputs(converted, twin, torch.randn(2, 3, 7, 7))
    assert all(a is not b for a, b in zip(converted.parameters(), twin.parameters()))
    # the original module kept for export shares the copy's layers, not the model's
    assert twin[1]._source.fc1 is twin[1].fc1 and twin[1]._source.fc1 is not converted[1].fc1


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle(pair, how):
    _, converted = pair
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(converted))
    else:
        buf = io.BytesIO()
        torch.save(converted, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    _same_outputs(converted, twin, torch.randn(2, 3, 7, 7))
    assert twin[5]._source.channel is twin[5].channel
    sd_a, sd_b = converted.state_dict(), twin.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_to_dtype_and_channels_last(pair):
    original, converted = pair
    original, converted = original.double().eval(), converted.double().eval()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = converted(x)
    assert y.dtype == torch.float64
    assert rel_err(y, original(x)) <= TOLERANCE[torch.float64]
