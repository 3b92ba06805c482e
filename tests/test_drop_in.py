"""Converted models keep working with what surrounds training: torch.compile(fullgraph=True),
deterministic mode, autocast, ONNX export, deepcopy and pickling, channels_last."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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

def _precision(autocast):
    return torch.autocast(*autocast) if autocast else contextlib.nullcontext()


def _block_inputs(model, x, autocast):
    """The input each block receives when the model runs in reduced precision (under autocast
    `(device_type, dtype)` if given)."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for m in model]
    with torch.no_grad(), _precision(autocast):
        y = model(x)
    for h in hooks:
        h.remove()
    return inputs, y


def _run_block(block, x, autocast=None):
    """A block's output, and the gradients of the sum of squares of its output with respect to its
    input and parameters (by name); under autocast if given."""
    block = copy.deepcopy(block)  # BatchNorm statistics and .grad of the caller's block untouched
    x = x.clone().requires_grad_()
    with _precision(autocast):
        y = block(x)
    y.float().square().sum().backward()
    return y, {"input": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


def _check_against_float64(original, converted, x, dtype, autocast=None, draws: int = 3):
    """The converted model (under autocast, or cast to `dtype`) against the original run in float64,
    each result within the dtype's target or twice the error of the original model run the same way
    where that is larger (docs/contract.md §4).

    The model's output is compared end to end. Outputs and gradients are then compared block by
    block, each block fed the same reduced-precision input (the one the original model gives it)
    and `draws - 1` perturbations of it: a gradient is discontinuous at a ReLU's kink, so the
    roundings of nine blocks in a row, carried into a later block's hidden layer, can legitimately
    switch a unit off that float64 keeps on (a 3x error in a gradient of norm 1e-9). A block's
    errors are the root mean square over the draws: a single draw's error of a one-element
    gradient (a BatchNorm's weight) after a cancelling sum is too noisy to bound by twice another
    single draw's. One block at a time also names the block whose reduced-precision path is wrong."""
    inputs, y_orig = _block_inputs(original, x, autocast)
    _, y = _block_inputs(converted, x, autocast)
    y_exact = copy.deepcopy(original).double()(x.double())
    assert y.dtype == y_orig.dtype == dtype, (y.dtype, y_orig.dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    err, tol = rel_err(y, y_exact), bound(TOLERANCE[dtype], rel_err(y_orig, y_exact))
    assert err <= tol, f"output rel err {err:.3g} > {tol:.3g}"
    for i, (orig_block, block, inp) in enumerate(zip(original, converted, inputs, strict=True)):
        what = f"block {i} ({type(orig_block).__name__})"
        errs, orig_errs, moves = {}, {}, {}  # name -> squared errors, summed over the draws
        for draw in range(draws):
            xi = _without_rounded_ties(block, inp if draw == 0 else _perturbed(inp, dtype), autocast)
            orig_exact_out, orig_exact = _run_block(copy.deepcopy(orig_block).double(), xi.double())
            exact_out, exact = _run_block(_float64_reference(block), xi.double())
            # float64 at an input moved by a quarter of the dtype's rounding: the problem's own conditioning
            moved_out, moved = _run_block(_float64_reference(block), xi.double() * (1 + _ROUNDING[dtype] / 4 * torch.randn_like(xi, dtype=torch.float64)))
            orig_out, orig_grads = _run_block(orig_block, xi, autocast)
            out, grads = _run_block(block, xi, autocast)
            assert out.dtype == orig_out.dtype, (what, out.dtype, orig_out.dtype)
            assert rel_err(exact_out, orig_exact_out) <= 1e-12, what
            assert grads.keys() == exact.keys() == orig_exact.keys(), what
            for name, g in grads.items():
                assert g is not None and g.dtype == (xi if name == "input" else dict(block.named_parameters())[name]).dtype, (what, name)
            for name, (mine, theirs, ref_mine, ref_theirs, ref_moved) in {
                    "output": (out, orig_out, exact_out, orig_exact_out, moved_out),
                    **{n: (grads[n], orig_grads[n], exact[n], orig_exact[n], moved[n]) for n in grads}}.items():
                errs[name] = errs.get(name, 0.0) + rel_err(mine, ref_mine) ** 2
                orig_errs[name] = orig_errs.get(name, 0.0) + rel_err(theirs, ref_theirs) ** 2
                moves[name] = moves.get(name, 0.0) + rel_err(ref_moved, ref_mine) ** 2
        for name in errs:
            err, orig_err, move = (math.sqrt(e[name] / draws) for e in (errs, orig_errs, moves))
            tol = bound((TOLERANCE if name == "output" else GRAD_TOLERANCE)[dtype], max(orig_err, move))
            assert err <= tol, f"{what}: {'output' if name == 'output' else 'gradient of ' + name}: rel err {err:.3g} > {tol:.3g}"


_ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff


def _perturbed(x, dtype):
    """x with every element moved at random by about two units in the last place of `dtype`."""
    return (x.float() * (1 + 4 * _ROUNDING[dtype] * torch.randn_like(x, dtype=torch.float32))).to(x.dtype)


class _PooledAcrossChannels(TorchDispatchMode):
    """Records the inputs of `spatial_pool`, the max over channels of an intermediate the block
    has already rounded to the reduced dtype (x * gate in the batch-statistics path of CBAM)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnfused.spatial_pool.default:
            self.inputs.append(args[0].detach())
        return func(*args, **(kwargs or {}))


def _tied_maxima(block, x, autocast) -> torch.Tensor:
    """Indices (n, c, h, w) into x of one of the elements at each pixel where the maximum over
    channels of a rounded intermediate ties."""
    with torch.no_grad(), _precision(autocast), _PooledAcrossChannels() as pooled:
        block(x)
    tied = [torch.zeros(0, 4, dtype=torch.long)]
    for t in pooled.inputs:
        top = t.float().topk(2, dim=1)
        n, h, w = (top.values[:, 0] == top.values[:, 1]).nonzero(as_tuple=True)
        tied.append(torch.stack([n, top.indices[n, 0, h, w], h, w], 1))
    return torch.cat(tied)


def _without_rounded_ties(block, x, autocast, tries: int = 50):
    """`x`, with the element at each tied maximum over a rounded intermediate raised by a few units
    in its last place until none ties. Where it ties, either element is maximal in the reduced dtype
    and the gradient may go to either (docs/contract.md §1) while float64, with no tie, picks one:
    one such pixel moves a large share of the input gradient."""
    if x.dtype == torch.float64:
        return x
    x = x.clone()
    for _ in range(tries):
        tied = _tied_maxima(block, x, autocast)
        if not len(tied):
            return x
        n, c, h, w = tied.unbind(1)
        v = x[n, c, h, w].float()
        x[n, c, h, w] = (v * (1 + 2.0 ** -5 * v.sign())).to(x.dtype)  # larger x, larger x * gate
    raise AssertionError(f"maxima over a rounded intermediate still tie after {tries} corrections")


def _float64_reference(block):
    """The converted block in float64 on the reference backend: the exact result of the documented
    max-gradient rule. Reduced-precision inputs have ties in their maxima, where that rule (the
    first index) and some originals' (`amax` splits the gradient) differ (docs/contract.md §1, §8);
    elsewhere the two exact results agree, and each model is measured against its own."""
    block = copy.deepcopy(block).double()
    for m in block.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    return block


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
