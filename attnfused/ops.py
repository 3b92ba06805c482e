"""The custom operators under `torch.ops.attnfused`: one forward and one backward op per
fused computation, each with a fake (meta) implementation and an autograd formula.

Every op takes `backend` (a concrete name; `attnfused.functional` resolves "auto") and
runs that backend's kernel from the registry. Option arguments are the strings listed
in `attnfused._options`. Contracts (acc = float32, float64 for float64 x):

- `channel_attention(x, w1, b1?, w2?, b2?, kind, pool, act, gate, padding, tie, residual?, activation,
  in_scale?, in_shift?)`
  -> `(y, pooled [N,2,C] acc = (avg, max), argmax [N,C] int64 = flat h*W+w of the first max,
  hidden)`. For pool "avg" nothing reads the max: pooled[:, 1] and argmax are zeros (not computed).
  kind "mlp": w1 [Cr,C], b1 [Cr]?, w2 [C,Cr], b2 [C]?; kind "conv": w1 [1,1,k], others None.
  `hidden`: kind "mlp": [N, P*Cr] acc = each sample's first-layer pre-activations, P rows of Cr
  (P = 2 for pool "avg+max", else 1); kind "conv": an empty tensor (`hidden_shape`). Every backend
  returns it; a backward may read it or recompute it from `pooled`.
- `spatial_attention(x, weight [1,M,k,k], bias [1]?, maps, gate, tie, residual?, activation, in_scale?,
  in_shift?)`
  -> `(y, smaps [N,2,H,W] acc = (max, mean) over C, sargmax [N,H,W] int64 = channel of the max)`.
- `cbam(x, w1, b1?, w2?, b2?, sweight, sbias?, kind, pool, act, gate, padding, maps, sgate, tie, residual?,
  activation, in_scale?, in_shift?)` -> `(y, pooled, argmax, smaps, sargmax, hidden)`, the spatial maps
  taken of x1 = x * s.
- The forward ops' tail: `y = activation(attention(x) + residual)`, computed in the pass that writes y
  (`residual` None or x's shape, dtype and strides; `activation` "none" or "relu",
  `attnfused._options.TAIL_ACTIVATIONS`). The backward ops know nothing of it: the autograd formula
  turns y's gradient into the residual's, `dy * (y > 0)` for "relu" (one pass, from the saved output
  y; never the residual), and passes that to the backward op as its `grad_y`.
- The forward ops' prologue: with `in_scale` and `in_shift` ([C], the accumulation dtype, contiguous;
  both or neither) the op reads `x' = x * in_scale[c] + in_shift[c]` (an eval-mode BatchNorm's output,
  rounded to x's dtype as the BatchNorm rounds it: `reference.functional.prologue`) wherever it reads
  x, and its saved outputs are x''s. The backward ops know nothing of it either: the autograd formula
  forms x' again from the saved x (one pass), runs the backward op on it, and turns x''s gradient g
  into x's (`g * in_scale`), in_scale's (`sum g * x`) and in_shift's (`sum g`).
- `spatial_pool(x, tie)` -> `(smaps, sargmax)` and `spatial_scale(x, t [N,H,W], residual?, activation)` ->
  `x * t` (then the tail): the two halves of spatial attention for when ordinary ops run between them
  (BatchNorm in training).
- Each `<op>_backward` takes `grad_y` (same strides as x), the forward's inputs and saved
  outputs, and returns `grad_x` (x's dtype and strides) and one gradient per weight (the
  weight's shape and dtype; an empty tensor where the weight is None).
- `tie` (`attnfused._options.TIE_RULES`) is where a max's gradient goes among equal elements:
  "first" at the saved index, "split" evenly among all of them (the backward finds them in x, or
  in CBAM's x * s). The forward is the same under both; argmax and sargmax are the first index.
  A backend declares whether its kernels compute "split" (`backends.declare_ties`); a "split"
  backward where they do not runs the reference backend's (plain PyTorch ops, from x).

Outputs the size of x have x's dtype and strides; only x and the small saved tensors are
kept for backward, never a second tensor of x's size.

`attnfused.functional` runs the ops through `call`: in eager mode on plain tensors that calls
the backend's kernels directly, with the same autograd formulas, and skips the custom op's
Python layers; whatever traces or intercepts ops gets the custom ops.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.autograd import forward_ad as _fwAD

from . import backends
from ._options import pool_inputs
from .reference.functional import acc_dtype  # the one accumulation-dtype rule
from .reference.functional import prologue as _prologue

_LIB = "attnfused"


def _acc(x: Tensor) -> torch.dtype:
    return acc_dtype(x.dtype)


def _grad_like(w: Optional[Tensor], ref: Tensor) -> Tensor:
    return ref.new_empty(0) if w is None else torch.empty_like(w)


def same_strides_as(grad: Tensor, x: Tensor) -> Tensor:
    """`grad` laid out exactly like `x` (the kernels read both with x's strides)."""
    if grad.stride() == x.stride() and grad.dtype == x.dtype:
        return grad
    return torch.empty_like(x).copy_(grad)


def _none_if_empty(w: Optional[Tensor], g: Tensor) -> Optional[Tensor]:
    return None if w is None else g


def hidden_shape(x: Tensor, w1: Tensor, kind: str, pool: str) -> tuple[int, ...]:
    """The shape of the forward's `hidden` output (see the contracts above), whatever the backend."""
    if kind != "mlp":
        return (0,)
    return (x.shape[0], pool_inputs(pool) * w1.shape[0])


# ----------------------------------------------------------------------------- kernels

# the ops whose last option is `tie`, forward and backward
TIE_OPS = frozenset(f"{op}{end}" for op in ("channel_attention", "spatial_attention", "cbam", "spatial_pool")
                     for end in ("", "_backward"))


def run_kernel(backend: str, name: str, args) -> object:
    """`backend`'s kernel for op `name` on `args` (the op's inputs less `backend`). A "split" backward
    on a backend that has no kernel for it (`backends.declare_ties`), or whose kernel does not cover
    these inputs (it raises NotImplementedError naming tie='split'), is the reference backend's:
    plain PyTorch ops from x."""
    if name in TIE_OPS and args[-1] == "split" and name.endswith("_backward"):
        if backends.computes_split(backend, name):
            try:
                return backends.kernel(backend, name)(*args)
            except NotImplementedError as e:
                if "tie='split'" not in str(e):
                    raise
        return backends.kernel("reference", name)(*args)
    return backends.kernel(backend, name)(*args)


# ----------------------------------------------------------------------------- calling the ops
# Each forward op's autograd formula (setup_context, backward), registered with the op and also run
# by `_Direct`. The formulas call the backward op through `_backward_op`.
_AUTOGRAD: dict[str, tuple[Callable, Callable]] = {}


def _register_autograd(op, backward: Callable, setup: Callable) -> None:
    op.register_autograd(backward, setup_context=setup)
    _AUTOGRAD[op._name] = (setup, backward)


def _backward_op(ctx, op, *args):
    """The backward op on the forward's backend: its kernel itself under `_Direct`, else the op (also
    under create_graph, where the op says that the backward has no derivative of its own)."""
    if getattr(ctx, "direct", False) and not torch.is_grad_enabled():
        return run_kernel(ctx.backend, op._name, args)
    return op(*args, ctx.backend)


class _Direct(torch.autograd.Function):
    """A forward op as its backend's kernel, with the op's own autograd formula: the eager path
    without the custom op's Python layers (its wrapper and its generated autograd function cost
    about 0.3 ms a training step; the kernels of a small block take about 1 ms)."""

    @staticmethod
    def forward(ctx, name: str, *inputs):
        out = run_kernel(inputs[-1], name, inputs[:-1])
        ctx.name, ctx.n_inputs, ctx.direct = name, len(inputs), True
        ctx.set_materialize_grads(False)  # the formulas read only y's gradient
        _AUTOGRAD[name][0](ctx, inputs, out)
        if isinstance(out, Tensor):
            return out
        out = tuple(out)
        ctx.mark_non_differentiable(*out[1:])  # the saved maps and indices
        return out

    @staticmethod
    def backward(ctx, *grads):
        if grads[0] is None:  # y took no gradient (the others are not differentiable)
            return (None,) * (1 + ctx.n_inputs)
        return (None, *_AUTOGRAD[ctx.name][1](ctx, *grads))


# the argument types of a call that may skip the dispatcher: plain tensors (no subclass) and options
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter, str, type(None)))


def needs_decomposition(inputs) -> bool:
    """Whether `inputs` meet a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) or forward-mode
    AD. The fused ops have a backward formula only: functorch cannot run a custom op's autograd
    formula (it raises), and forward mode sees no derivative at all (a silent zero tangent). There
    `call` runs the reference backend's forward instead, plain PyTorch ops that every transform knows."""
    if torch._C._are_functorch_transforms_active():
        return True
    # a dual level is open only inside `forward_ad.dual_level()`: one int read on every other call
    return _fwAD._current_level >= 0 and any(
        isinstance(t, Tensor) and _fwAD.unpack_dual(t).tangent is not None for t in inputs)


def call(op, *inputs):
    """`op(*inputs)` (the backend is the last input). In eager mode on plain tensors the backend's
    kernel runs directly (under `_Direct` where a gradient is needed); under torch.compile or
    export tracing, torch.jit.trace, with tensor subclasses (fake, DTensor), or dispatch or
    torch-function modes, the custom op runs, with its fake and autograd registrations. Under torch.func transforms and
    forward-mode AD the reference backend's forward runs (`needs_decomposition`), whatever the backend."""
    if needs_decomposition(inputs):
        return run_kernel("reference", op._name, inputs[:-1])
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._is_tracing()
            or not _PLAIN_TYPES.issuperset(map(type, inputs))):
        return op(*inputs)
    if torch.autograd.profiler._is_profiler_enabled:  # a trace still names the op
        with torch.profiler.record_function(f"{_LIB}::{op._name}"):
            return _direct(op, inputs)
    return _direct(op, inputs)


def _direct(op, inputs):
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _Direct.apply(op._name, *inputs)
    return run_kernel(inputs[-1], op._name, inputs[:-1])


# ----------------------------------------------------------------------------- torch.compile sees Triton's kernels
# Backends whose kernels are Triton kernels that a tracer can record: under torch.compile their ops
# are decomposed into the kernels themselves (what `torch.library.triton_op` does), so the compiled
# code launches them with no Python launcher and no opaque op (CUDA graphs included). The op stays
# whole for every other backend, on CPU tensors (the Triton interpreter), and under torch.export (an
# exported program keeps the op, as it keeps `triton_op`s: it should not hold one GPU's kernels).
_TRACEABLE_BACKENDS = {"triton": "attnfused.backends.triton._common"}
_TRACED_TYPES = frozenset((Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor))


def _traced_launches(backend: str, args, types):
    """The context that records `backend`'s launches, or None where the op must stay whole."""
    module = _TRACEABLE_BACKENDS.get(backend)
    x = args[0]
    if module is None or not (isinstance(x, Tensor) and x.is_cuda):
        return None
    if not all(isinstance(d, int) for d in (*x.shape, *x.stride())):
        return None  # symbolic sizes (dynamic shapes): the launchers size their grids from numbers
    if not _TRACED_TYPES.issuperset(types):
        return None  # another tensor subclass: its own rules see the op
    from torch.export._trace import custom_triton_ops_decomposition_disabled
    if custom_triton_ops_decomposition_disabled():
        return None
    return importlib.import_module(module).traced_launches()


def _decompose_when_traceable(op) -> None:
    """Under functionalization (AOTAutograd, hence torch.compile), `op` on a traceable backend runs
    that backend's launcher with its launches recorded; elsewhere it stays one op."""
    name = op._name

    def rule(mode, func, types, args, kwargs):
        traced = _traced_launches(args[-1], args, types)
        if traced is None:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode, traced:
            out = run_kernel(args[-1], name, args[:-1])
        return tuple(out) if isinstance(out, (tuple, list)) else out

    op.register_torch_dispatch(FunctionalTensorMode, rule)


def _forward_kernel(backend: str, name: str, *args):
    """The kernel behind a forward custom op, run on `args`. The ops have no forward-mode formula, and
    forward-mode AD would pass through them with a zero tangent: raise instead (`call` never gets
    here then)."""
    if _fwAD._current_level >= 0:
        raise RuntimeError(
            f"torch.ops.{_LIB}.{name} has no forward-mode derivative (torch.func.jvp, jacfwd, "
            f"torch.autograd.forward_ad); call attnfused.functional.{name} or an attnfused module instead: "
            f"under forward-mode AD and torch.func transforms they run the reference math")
    return run_kernel(backend, name, args)


# ----------------------------------------------------------------------------- the tail's autograd

def _tail_setup(ctx, residual: Optional[Tensor], activation: str, y: Tensor) -> Optional[Tensor]:
    """Notes the forward's tail; returns what its backward needs saved: the output y for "relu" (a
    tensor the next layer keeps anyway), else None. Never the residual."""
    ctx.has_residual, ctx.relu = residual is not None, activation == "relu"
    return y if ctx.relu else None


def _tail_backward(ctx, grad_y: Tensor, y: Optional[Tensor], x: Tensor) -> Tensor:
    """y's gradient back through the tail: the gradient of the attention's output and of the residual
    (one tensor, laid out like x): `grad_y * (y > 0)` for "relu" (relu's own backward), else grad_y."""
    if ctx.relu:
        grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)
    return same_strides_as(grad_y, x)


def _tail_grads(ctx, grad: Tensor) -> tuple:
    """The gradients of the tail's inputs (residual, activation)."""
    return (grad if ctx.has_residual else None, None)


# ----------------------------------------------------------------------------- the prologue's autograd

def _prologue_setup(ctx, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> tuple:
    """Notes which of the prologue's inputs want a gradient; returns them, to be saved."""
    ctx.prologue_grads = (in_scale is not None and in_scale.requires_grad,
                          in_shift is not None and in_shift.requires_grad)
    return in_scale, in_shift


def _prologue_input(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    """What the forward kernels read: x' = x * in_scale + in_shift (rounded to x's dtype, laid out
    like x), or x itself."""
    return x if in_scale is None else same_strides_as(_prologue(x, in_scale, in_shift), x)


def _prologue_grads(ctx, grad: Tensor, x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> tuple:
    """x''s gradient `grad` back through the prologue: the gradients of x, in_scale and in_shift (sums
    over N, H and W in the accumulation dtype; None where not wanted)."""
    if in_scale is None:
        return grad, None, None
    g = grad.to(_acc(x))
    want_scale, want_shift = ctx.prologue_grads
    g_scale = (g * x.to(g.dtype)).sum((0, 2, 3)).to(in_scale.dtype) if want_scale else None
    g_shift = g.sum((0, 2, 3)).to(in_shift.dtype) if want_shift else None
    return same_strides_as((g * in_scale.to(g.dtype)[:, None, None]).to(x.dtype), x), g_scale, g_shift


# ----------------------------------------------------------------------------- channel attention

@torch.library.custom_op(f"{_LIB}::channel_attention", mutates_args=())
def channel_attention(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                      kind: str, pool: str, act: str, gate: str, padding: str, tie: str, residual: Optional[Tensor],
                      activation: str, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_forward_kernel(backend, "channel_attention", x, w1, b1, w2, b2, kind, pool, act, gate, padding,
                                 tie, residual, activation, in_scale, in_shift))


def _channel_saved_fake(x, w1, kind, pool):
    N, C = x.shape[:2]
    return (x.new_empty((N, 2, C), dtype=_acc(x)), x.new_empty((N, C), dtype=torch.int64),
            x.new_empty(hidden_shape(x, w1, kind, pool), dtype=_acc(x)))


@channel_attention.register_fake
def _(x, w1, b1, w2, b2, kind, pool, act, gate, padding, tie, residual, activation, in_scale, in_shift, backend):
    return (torch.empty_like(x), *_channel_saved_fake(x, w1, kind, pool))


@torch.library.custom_op(f"{_LIB}::channel_attention_backward", mutates_args=())
def channel_attention_backward(grad_y: Tensor, x: Tensor, pooled: Tensor, argmax: Tensor, hidden: Tensor,
                               w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                               kind: str, pool: str, act: str, gate: str, padding: str, tie: str,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(run_kernel(backend, "channel_attention_backward", (
        grad_y, x, pooled, argmax, hidden, w1, b1, w2, b2, kind, pool, act, gate, padding, tie)))


@channel_attention_backward.register_fake
def _(grad_y, x, pooled, argmax, hidden, w1, b1, w2, b2, kind, pool, act, gate, padding, tie, backend):
    return (torch.empty_like(x), torch.empty_like(w1), _grad_like(b1, w1), _grad_like(w2, w1),
            _grad_like(b2, w1))


def _channel_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, *opts, residual, activation, in_scale, in_shift, ctx.backend = inputs
    ctx.opts = opts
    ctx.save_for_backward(x, *output[1:4], w1, b1, w2, b2, _tail_setup(ctx, residual, activation, output[0]),
                          *_prologue_setup(ctx, in_scale, in_shift))


def _channel_backward(ctx, grad_y, *_saved_grads):
    x, pooled, argmax, hidden, w1, b1, w2, b2, y, in_scale, in_shift = ctx.saved_tensors
    g = _tail_backward(ctx, grad_y, y, x)
    gx, gw1, gb1, gw2, gb2 = _backward_op(ctx, channel_attention_backward, g, _prologue_input(x, in_scale, in_shift),
                                          pooled, argmax, hidden, w1, b1, w2, b2, *ctx.opts)
    gx, g_scale, g_shift = _prologue_grads(ctx, gx, x, in_scale, in_shift)
    return (gx, gw1, _none_if_empty(b1, gb1), _none_if_empty(w2, gw2), _none_if_empty(b2, gb2)) \
        + (None,) * len(ctx.opts) + _tail_grads(ctx, g) + (g_scale, g_shift, None)


_register_autograd(channel_attention, _channel_backward, _channel_setup)


# ----------------------------------------------------------------------------- spatial attention

@torch.library.custom_op(f"{_LIB}::spatial_attention", mutates_args=())
def spatial_attention(x: Tensor, weight: Tensor, bias: Optional[Tensor], maps: str, gate: str, tie: str,
                      residual: Optional[Tensor], activation: str, in_scale: Optional[Tensor],
                      in_shift: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_forward_kernel(backend, "spatial_attention", x, weight, bias, maps, gate, tie, residual,
                                 activation, in_scale, in_shift))


def _spatial_saved_fake(x):
    N, _, H, W = x.shape
    return x.new_empty((N, 2, H, W), dtype=_acc(x)), x.new_empty((N, H, W), dtype=torch.int64)


@spatial_attention.register_fake
def _(x, weight, bias, maps, gate, tie, residual, activation, in_scale, in_shift, backend):
    return (torch.empty_like(x), *_spatial_saved_fake(x))


@torch.library.custom_op(f"{_LIB}::spatial_attention_backward", mutates_args=())
def spatial_attention_backward(grad_y: Tensor, x: Tensor, smaps: Tensor, sargmax: Tensor, weight: Tensor,
                               bias: Optional[Tensor], maps: str, gate: str, tie: str,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(run_kernel(backend, "spatial_attention_backward", (
        grad_y, x, smaps, sargmax, weight, bias, maps, gate, tie)))


@spatial_attention_backward.register_fake
def _(grad_y, x, smaps, sargmax, weight, bias, maps, gate, tie, backend):
    return torch.empty_like(x), torch.empty_like(weight), _grad_like(bias, weight)


def _spatial_setup(ctx, inputs, output):
    x, weight, bias, *opts, residual, activation, in_scale, in_shift, ctx.backend = inputs
    ctx.opts = opts
    ctx.save_for_backward(x, output[1], output[2], weight, bias, _tail_setup(ctx, residual, activation, output[0]),
                          *_prologue_setup(ctx, in_scale, in_shift))


def _spatial_backward(ctx, grad_y, _g1, _g2):
    x, smaps, sargmax, weight, bias, y, in_scale, in_shift = ctx.saved_tensors
    g = _tail_backward(ctx, grad_y, y, x)
    gx, gw, gb = _backward_op(ctx, spatial_attention_backward, g, _prologue_input(x, in_scale, in_shift), smaps,
                              sargmax, weight, bias, *ctx.opts)
    gx, g_scale, g_shift = _prologue_grads(ctx, gx, x, in_scale, in_shift)
    return (gx, gw, _none_if_empty(bias, gb)) + (None,) * len(ctx.opts) + _tail_grads(ctx, g) \
        + (g_scale, g_shift, None)


_register_autograd(spatial_attention, _spatial_backward, _spatial_setup)


# ----------------------------------------------------------------------------- CBAM

@torch.library.custom_op(f"{_LIB}::cbam", mutates_args=())
def cbam(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
         sweight: Tensor, sbias: Optional[Tensor], kind: str, pool: str, act: str, gate: str, padding: str,
         maps: str, sgate: str, tie: str, residual: Optional[Tensor], activation: str, in_scale: Optional[Tensor],
         in_shift: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_forward_kernel(backend, "cbam", x, w1, b1, w2, b2, sweight, sbias, kind, pool, act, gate,
                                 padding, maps, sgate, tie, residual, activation, in_scale, in_shift))


@cbam.register_fake
def _(x, w1, b1, w2, b2, sweight, sbias, kind, pool, act, gate, padding, maps, sgate, tie, residual, activation,
      in_scale, in_shift, backend):
    pooled, argmax, hidden = _channel_saved_fake(x, w1, kind, pool)
    return (torch.empty_like(x), pooled, argmax, *_spatial_saved_fake(x), hidden)


@torch.library.custom_op(f"{_LIB}::cbam_backward", mutates_args=())
def cbam_backward(grad_y: Tensor, x: Tensor, pooled: Tensor, argmax: Tensor, smaps: Tensor, sargmax: Tensor,
                  hidden: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                  sweight: Tensor, sbias: Optional[Tensor], kind: str, pool: str, act: str, gate: str, padding: str,
                  maps: str, sgate: str, tie: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(run_kernel(backend, "cbam_backward", (
        grad_y, x, pooled, argmax, smaps, sargmax, hidden, w1, b1, w2, b2, sweight, sbias, kind, pool, act,
        gate, padding, maps, sgate, tie)))


@cbam_backward.register_fake
def _(grad_y, x, pooled, argmax, smaps, sargmax, hidden, w1, b1, w2, b2, sweight, sbias, *opts):
    return (torch.empty_like(x), torch.empty_like(w1), _grad_like(b1, w1), _grad_like(w2, w1),
            _grad_like(b2, w1), torch.empty_like(sweight), _grad_like(sbias, sweight))


def _cbam_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, sweight, sbias, *opts, residual, activation, in_scale, in_shift, ctx.backend = inputs
    ctx.opts = opts
    ctx.save_for_backward(x, *output[1:6], w1, b1, w2, b2, sweight, sbias,
                          _tail_setup(ctx, residual, activation, output[0]), *_prologue_setup(ctx, in_scale, in_shift))


def _cbam_backward(ctx, grad_y, *_saved_grads):
    x, pooled, argmax, smaps, sargmax, hidden, w1, b1, w2, b2, sweight, sbias, y, in_scale, in_shift = \
        ctx.saved_tensors
    g = _tail_backward(ctx, grad_y, y, x)
    gx, gw1, gb1, gw2, gb2, gsw, gsb = _backward_op(ctx, cbam_backward, g, _prologue_input(x, in_scale, in_shift),
                                                    pooled, argmax, smaps, sargmax, hidden, w1, b1, w2, b2, sweight,
                                                    sbias, *ctx.opts)
    gx, g_scale, g_shift = _prologue_grads(ctx, gx, x, in_scale, in_shift)
    return (gx, gw1, _none_if_empty(b1, gb1), _none_if_empty(w2, gw2), _none_if_empty(b2, gb2), gsw,
            _none_if_empty(sbias, gsb)) + (None,) * len(ctx.opts) + _tail_grads(ctx, g) + (g_scale, g_shift, None)


_register_autograd(cbam, _cbam_backward, _cbam_setup)


# ----------------------------------------------------------------------------- spatial halves

@torch.library.custom_op(f"{_LIB}::spatial_pool", mutates_args=())
def spatial_pool(x: Tensor, tie: str, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_forward_kernel(backend, "spatial_pool", x, tie))


@spatial_pool.register_fake
def _(x, tie, backend):
    return _spatial_saved_fake(x)


@torch.library.custom_op(f"{_LIB}::spatial_pool_backward", mutates_args=())
def spatial_pool_backward(grad_smaps: Tensor, x: Tensor, sargmax: Tensor, tie: str, backend: str) -> Tensor:
    return run_kernel(backend, "spatial_pool_backward", (grad_smaps, x, sargmax, tie))


@spatial_pool_backward.register_fake
def _(grad_smaps, x, sargmax, tie, backend):
    return torch.empty_like(x)


def _pool_setup(ctx, inputs, output):
    ctx.tie, ctx.backend = inputs[1:]
    ctx.save_for_backward(inputs[0], output[1])


def _pool_backward(ctx, grad_smaps, _grad_argmax):
    x, sargmax = ctx.saved_tensors
    return _backward_op(ctx, spatial_pool_backward, grad_smaps.contiguous(), x, sargmax, ctx.tie), None, None


_register_autograd(spatial_pool, _pool_backward, _pool_setup)


@torch.library.custom_op(f"{_LIB}::spatial_scale", mutates_args=())
def spatial_scale(x: Tensor, t: Tensor, residual: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _forward_kernel(backend, "spatial_scale", x, t, residual, activation)


@spatial_scale.register_fake
def _(x, t, residual, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::spatial_scale_backward", mutates_args=())
def spatial_scale_backward(grad_y: Tensor, x: Tensor, t: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(run_kernel(backend, "spatial_scale_backward", (grad_y, x, t)))


@spatial_scale_backward.register_fake
def _(grad_y, x, t, backend):
    return torch.empty_like(x), torch.empty_like(t)


def _scale_setup(ctx, inputs, output):
    x, t, residual, activation, ctx.backend = inputs
    ctx.save_for_backward(x, t, _tail_setup(ctx, residual, activation, output))


def _scale_backward(ctx, grad_y):
    x, t, y = ctx.saved_tensors
    g = _tail_backward(ctx, grad_y, y, x)
    gx, gt = _backward_op(ctx, spatial_scale_backward, g, x, t)
    return (gx, gt) + _tail_grads(ctx, g) + (None,)


_register_autograd(spatial_scale, _scale_backward, _scale_setup)


for _op in (channel_attention, channel_attention_backward, spatial_attention, spatial_attention_backward, cbam,
            cbam_backward, spatial_pool, spatial_pool_backward, spatial_scale, spatial_scale_backward):
    _decompose_when_traceable(_op)
