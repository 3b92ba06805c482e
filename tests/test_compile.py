"""torch.compile(fullgraph=True) traces every fused module without graph breaks (CPU); the Triton
backend's ops trace to their kernels."""
from __future__ import annotations

import functools

import pytest
import torch

import attnfused
from tests._util import GRAD_TOLERANCE, TOLERANCE, cpu_backends, interpreting, rand, rel_err

MODULES = {
    "SEBlock": lambda: attnfused.SEBlock("max", 12, 4),
    "ECABlock": lambda: attnfused.ECABlock(12),
    "ChannelAttentionFC": lambda: attnfused.ChannelAttentionFC(12, 3),
    "ChannelAttentionConv": lambda: attnfused.ChannelAttentionConv(12),
    "SpatialAttention": lambda: attnfused.SpatialAttention(5),
    "CBAMBlock": lambda: attnfused.CBAMBlock("FC", 7, 12, 3),
    "CBAMBlock-Conv": lambda: attnfused.CBAMBlock("Conv", 3, 12, None, 2, 1),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph_forward_backward(name, backend):
    torch._dynamo.reset()
    m = MODULES[name]()
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = backend
    compiled = torch.compile(m, fullgraph=True)
    x = rand(3, 12, 7, 5, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out = compiled(x1)
    ref = m(x2)
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]
    g = torch.randn_like(ref)
    (gx1,) = torch.autograd.grad(out, x1, g)
    (gx2,) = torch.autograd.grad(ref, x2, g)
    assert rel_err(gx1, gx2) <= GRAD_TOLERANCE[torch.float32]


# ----------------------------------------------------------------------------- the Triton backend's kernels
# Under torch.compile the Triton backend's ops decompose into their kernels (attnfused.ops): the compiled
# graph launches them itself, with no Python launcher and no opaque op. Traced here on fake CUDA tensors, so
# no GPU is needed (the GPU tests run the compiled kernels).

def _triton_traceable() -> str | None:
    if interpreting():
        return "the interpreter's kernels are plain functions, which no tracer records"
    try:
        import attnfused.backends.triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    return None


def _traced_graph(fn, *inputs):
    """(outputs, the graph AOTAutograd traced of fn(*inputs) in inference, as torch.compile would)."""
    from torch._functorch.aot_autograd import aot_function

    graphs = []
    out = aot_function(fn, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*inputs)
    return out, graphs[0].graph


def _kernels_and_ops(graph) -> tuple[int, list[str]]:
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    return sum("triton_kernel_wrapper" in t for t in targets), [t for t in targets if "attnfused" in t]


def _triton_cases(dtype, memory_format):
    """(name, fn, inputs) of every forward op with its backward op, on fake CUDA tensors."""
    from attnfused import ops

    def t(*shape, dt=torch.float32):
        return torch.randn(*shape, device="cuda", dtype=dt)

    x = t(3, 24, 9, 7, dt=dtype).contiguous(memory_format=memory_format)
    w1, w2, b1, b2, cw = t(6, 24), t(24, 6), t(6), t(24), t(1, 1, 5)
    sw, sb = t(1, 2, 7, 7), t(1)
    ch = ("avg+max", "relu", "sigmoid", "zeros")
    sp = ("max_mean", "sigmoid")

    def channel(x, w1, b1, w2, b2, residual=None, *, tie, activation="none"):
        y, *saved = ops.channel_attention(x, w1, b1, w2, b2, "mlp", *ch, tie, residual, activation, None, None,
                                          "triton")
        return y, *ops.channel_attention_backward(y, x, *saved, w1, b1, w2, b2, "mlp", *ch, tie, "triton")

    def eca(x, cw, tie):
        y, *saved = ops.channel_attention(x, cw, None, None, None, "conv", *ch, tie, None, "none", None, None, "triton")
        return y, *ops.channel_attention_backward(y, x, *saved, cw, None, None, None, "conv", *ch, tie, "triton")

    def spatial(x, sw, sb, tie):
        y, *saved = ops.spatial_attention(x, sw, sb, *sp, tie, None, "none", None, None, "triton")
        return y, *ops.spatial_attention_backward(y, x, *saved, sw, sb, *sp, tie, "triton")

    def cbam(x, w1, w2, sw, residual=None, *, tie, activation="none"):
        y, *saved = ops.cbam(x, w1, None, w2, None, sw, None, "mlp", *ch, *sp, tie, residual, activation, None, None,
                             "triton")
        return y, *ops.cbam_backward(y, x, *saved, w1, None, w2, None, sw, None, "mlp", *ch, *sp, tie, "triton")

    def halves(x, tie):
        smaps, sargmax = ops.spatial_pool(x, tie, "triton")
        tmap = smaps[:, 0].sigmoid()
        y = ops.spatial_scale(x, tmap, None, "none", "triton")
        gx, gt = ops.spatial_scale_backward(y, x, tmap, "triton")
        return y, gx, gt, ops.spatial_pool_backward(smaps, x, sargmax, tie, "triton")

    for tie in ("first", "split"):
        yield f"channel-{tie}", functools.partial(channel, tie=tie), (x, w1, b1, w2, b2)
        yield f"eca-{tie}", functools.partial(eca, tie=tie), (x, cw)
        yield f"spatial-{tie}", functools.partial(spatial, tie=tie), (x, sw, sb)
        yield f"cbam-{tie}", functools.partial(cbam, tie=tie), (x, w1, w2, sw)
        yield f"halves-{tie}", functools.partial(halves, tie=tie), (x,)
    r = t(*x.shape, dt=dtype).contiguous(memory_format=memory_format)  # the tail: + residual, relu
    yield "channel-tail", functools.partial(channel, tie="first", activation="relu"), (x, w1, b1, w2, b2, r)
    yield "cbam-tail", functools.partial(cbam, tie="split", activation="relu"), (x, w1, w2, sw, r)


@pytest.mark.skipif(_triton_traceable() is not None, reason=str(_triton_traceable()))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_ops_compile_to_their_kernels(dtype, memory_format, monkeypatch):
    """Every Triton op, forward and backward under both tie rules, traces to its kernels alone: no opaque
    op is left in the graph, and its outputs have the metadata of the op's fake implementation (the
    contract torch.compile traced against). The CUDA backend's op stays one op."""
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnfused.backends.triton import _common

    if not torch.cuda.is_available():  # the launchers size their grids by the SM count
        monkeypatch.setattr(_common, "_num_sms", lambda index: 132)
    # without a GPU driver Triton cannot tell which arguments a kernel writes: it takes all of them
    # (correct, and logged at length)
    monkeypatch.setattr(logging.getLogger("torch._higher_order_ops.triton_kernel_wrap"), "disabled", True)
    with FakeTensorMode():
        for name, fn, inputs in _triton_cases(dtype, memory_format):
            expected = fn(*inputs)  # the ops' fake implementations
            out, graph = _traced_graph(fn, *inputs)
            kernels, opaque = _kernels_and_ops(graph)
            assert kernels >= 2 and not opaque, (name, kernels, opaque)
            assert len(out) == len(expected), name
            for o, e in zip(out, expected):
                assert (o.shape, o.dtype, o.stride(), o.device) == (e.shape, e.dtype, e.stride(), e.device), name

        x = torch.randn(2, 8, 5, 5, device="cuda")
        w = torch.randn(1, 1, 3, device="cuda")
        opts = ("conv", "avg+max", "relu", "sigmoid", "zeros", "first", None, "none", None, None)
        _, graph = _traced_graph(lambda x, w: attnfused.ops.channel_attention(x, w, None, None, None, *opts, "cuda"),
                                 x, w)
        kernels, opaque = _kernels_and_ops(graph)
        assert kernels == 0 and opaque == ["attnfused.channel_attention.default"], opaque

    # symbolic sizes (torch.compile's dynamic shapes): the Triton op stays whole too
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    with torch.device("meta"):
        x, w = mode.from_tensor(torch.randn(2, 8, 5, 5)), mode.from_tensor(torch.randn(1, 1, 3))
    assert not isinstance(x.shape[0], int)
    x.fake_device = w.fake_device = torch.device("cuda", 0)  # as if made from CUDA tensors
    with mode:
        _, graph = _traced_graph(lambda x, w: attnfused.ops.channel_attention(x, w, None, None, None, *opts,
                                                                              "triton"), x, w)
    kernels, opaque = _kernels_and_ops(graph)
    assert kernels == 0 and opaque == ["attnfused.channel_attention.default"], opaque


# ----------------------------------------------------------------------------- compile_as="original"

def _compiled_with_graphs(m):
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    return torch.compile(m, backend=rec, fullgraph=True), rec


def _fused_ops(rec) -> list[str]:
    return [str(n.target) for g in rec.graphs for n in g.graph.nodes
            if n.op == "call_function" and "attnfused" in str(n.target)]


def _check_compile_as(fused, original_call: str | None = None):
    """`fused` under torch.compile, as "kernels" and as "original": the same output and gradients as
    eager; its fused ops in the graph only as "kernels"; `original_call` (a function or method the
    original forward calls) in the graph only as "original"."""
    x = rand(3, 12, 7, 5, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    leaves = [p for p in fused.parameters() if p.requires_grad]
    x1 = x.clone().requires_grad_()
    ref = fused(x1)
    ref_grads = torch.autograd.grad(ref, [x1, *leaves], g)
    for how in ("kernels", "original"):
        attnfused.set_compile_as(fused, how)
        compiled, rec = _compiled_with_graphs(fused)
        x2 = x.clone().requires_grad_()
        out = compiled(x2)
        assert rel_err(out, ref) <= TOLERANCE[torch.float32], how
        for a, b in zip(torch.autograd.grad(out, [x2, *leaves], g), ref_grads):
            assert rel_err(a, b) <= GRAD_TOLERANCE[torch.float32], how
        targets = [getattr(n.target, "__name__", str(n.target)) for gr in rec.graphs for n in gr.graph.nodes
                   if n.op in ("call_function", "call_method")]
        assert bool(_fused_ops(rec)) == (how == "kernels"), (how, targets)
        assert how == "kernels" or len(targets) > 3, targets  # the original: several plain ops
        if original_call is not None:
            assert (original_call in targets) == (how == "original"), (how, targets)
    attnfused.set_compile_as(fused, "kernels")


@pytest.mark.parametrize("name", list(MODULES))
def test_compile_as_original_traces_the_reference_forward(name):
    m = MODULES[name]()
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = "cpu"
    _check_compile_as(m)


def test_convert_compile_as_original_traces_the_converted_modules_forward():
    timm = pytest.importorskip("timm")
    from timm.layers import cbam as tcbam

    model = torch.nn.Sequential(tcbam.CbamModule(12, rd_ratio=1 / 4), tcbam.CbamModule(12, rd_ratio=1 / 4))
    fused, entries = attnfused.convert(model, backend="cpu", report=True, compile_as="original")
    assert all(e.converted for e in entries) and {m.compile_as for m in fused.modules()
                                                  if hasattr(m, "compile_as")} == {"original"}
    _check_compile_as(fused, "amax")  # timm's channel max: x.amax((2, 3))
    with pytest.raises(ValueError, match="compile_as"):
        attnfused.convert(model, compile_as="opaque")
    with pytest.raises(ValueError, match="compile_as"):
        attnfused.set_compile_as(fused, None)
    assert timm is not None
