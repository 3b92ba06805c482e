"""Op configurations the parity tests sweep: every option of docs/contract.md §2 at least once.

Each case builds the functional call and the float64 oracle for one op; backends are
checked against the oracle with tests/_util.py's tolerances.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from attnfused import functional as F
from attnfused._options import CHANNEL_POOLS, CONV_PADDINGS, SPATIAL_MAPS, TIE_RULES, spatial_in_channels
from attnfused.accuracy import bound
from attnfused.reference import functional as R

from tests._util import GRAD_TOLERANCE, TOLERANCE, autocast_for, layout, rand, rand_distinct, rel_err


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "channel", "spatial", "cbam"
    opts: tuple  # sorted (name, value) pairs

    @property
    def o(self) -> dict:
        return dict(self.opts)

    def __str__(self):
        return self.op + "[" + ",".join(f"{k}={v}" for k, v in self.opts) + "]"

    def weights(self, C: int, dtype=torch.float64, shape=None) -> dict:
        """Fresh random weights for C channels (None where the option is off); a case with the tail's
        `residual` also draws that input, of x's `shape`."""
        o = self.o
        w = {}
        if o.get("residual"):
            if shape is None:
                raise ValueError(f"{self} takes a residual: give weights() x's shape")
            w["residual"] = rand(*shape, dtype=dtype)
        if o.get("prologue"):  # an eval-mode BatchNorm's scale (either sign, away from 0) and shift
            sign = torch.where(torch.rand(C, dtype=torch.float64) < 0.8, 1.0, -1.0)
            w["in_scale"] = ((0.5 + torch.rand(C, dtype=torch.float64)) * sign).to(dtype)
            w["in_shift"] = rand(C, dtype=dtype, scale=0.5)
        if self.op in ("channel", "cbam"):
            if o["kind"] == "mlp":
                hidden = max(1, C // 2)
                w["w1"] = rand(hidden, C, dtype=dtype, scale=max(C, 1) ** -0.5)
                w["b1"] = rand(hidden, dtype=dtype, scale=0.3) if o["bias"] else None
                w["w2"] = rand(C, hidden, dtype=dtype, scale=hidden ** -0.5)
                w["b2"] = rand(C, dtype=dtype, scale=0.3) if o["bias"] else None
            else:
                w["w1"] = rand(1, 1, o["k1d"], dtype=dtype, scale=0.7)
                w["b1"] = w["w2"] = w["b2"] = None
        if self.op in ("spatial", "cbam"):
            m = spatial_in_channels(o["maps"])
            w["sw"] = rand(1, m, o["k"], o["k"], dtype=dtype, scale=0.4)
            w["sb"] = rand(1, dtype=dtype, scale=0.3) if o["sbias"] else None
        return w

    def run(self, x, w: dict, backend=None):
        """The fused functional call (backend given) or the float64 oracle (backend None)."""
        o = self.o
        ch = dict(kind=o.get("kind"), pool=o.get("pool"), act=o.get("act"), padding=o.get("padding"), tie=o["tie"],
                  residual=w.get("residual"), activation=o.get("activation"), in_scale=w.get("in_scale"),
                  in_shift=w.get("in_shift"))
        around = {k: ch[k] for k in ("residual", "activation", "in_scale", "in_shift")}  # the tail, the prologue
        if self.op == "channel":
            if backend is None:
                return R.channel_attention(x, w["w1"], w["b1"], w["w2"], w["b2"], gate_kind=o["gate"], **ch)
            return F.channel_attention(x, w["w1"], w["b1"], w["w2"], w["b2"], gate=o["gate"], backend=backend,
                                       **ch)
        if self.op == "spatial":
            if backend is None:
                return R.spatial_attention(x, w["sw"], w["sb"], maps=o["maps"], gate_kind=o["sgate"], tie=o["tie"],
                                           **around)
            return F.spatial_attention(x, w["sw"], w["sb"], maps=o["maps"], gate=o["sgate"], tie=o["tie"],
                                       backend=backend, **around)
        if backend is None:
            return R.cbam(x, w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"], gate_kind=o["gate"],
                          maps=o["maps"], spatial_gate=o["sgate"], **ch)
        return F.cbam(x, w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"], gate=o["gate"], maps=o["maps"],
                      spatial_gate=o["sgate"], backend=backend, **ch)


def _case(op, **opts):
    return Case(op, tuple(sorted(opts.items())))


def _channel_variants():
    """Every pool with both MLP settings (relu/sigmoid/no bias/first tie rule, silu/hardsigmoid/bias/
    split), every pool with the conv (zero padding/sigmoid/first, circular/hardsigmoid/split)."""
    for pool, (act, gate, bias, tie) in itertools.product(CHANNEL_POOLS, [("relu", "sigmoid", False, "first"),
                                                                           ("silu", "hardsigmoid", True, "split")]):
        yield dict(kind="mlp", pool=pool, act=act, gate=gate, bias=bias, padding="zeros", k1d=3, tie=tie)
    for pool, (padding, gate, k1d, tie) in itertools.product(CHANNEL_POOLS, [("zeros", "sigmoid", 3, "first"),
                                                                              ("circular", "hardsigmoid", 5, "split")]):
        yield dict(kind="conv", pool=pool, act="relu", gate=gate, bias=False, padding=padding, k1d=k1d, tie=tie)


def _spatial_variants():
    for maps, (k, sbias, sgate, tie) in zip(SPATIAL_MAPS * 2, [
            (7, False, "sigmoid", "first"), (3, True, "hardsigmoid", "split"), (5, True, "sigmoid", "first"),
            (1, False, "sigmoid", "split"), (3, False, "sigmoid", "split"), (7, True, "hardsigmoid", "first")]):
        yield dict(maps=maps, k=k, sbias=sbias, sgate=sgate, tie=tie)


CHANNEL_CASES = [_case("channel", **v) for v in _channel_variants()]
SPATIAL_CASES = [_case("spatial", **v) for v in _spatial_variants()]
# CBAM: each channel variant once, paired round-robin with the spatial variants
# (one tie rule for both maxima: the channel variant's)
CBAM_CASES = [_case("cbam", **{**s, **c}) for c, s in zip(_channel_variants(), itertools.cycle(_spatial_variants()))]
ALL_CASES = CHANNEL_CASES + SPATIAL_CASES + CBAM_CASES


def with_tail(case: Case, residual: bool, activation) -> Case:
    """`case` with the block's tail: activation(out + residual), the residual an input of x's shape."""
    return _case(case.op, **case.o, residual=residual, activation=activation)


# The tail on each op, each tie rule, both pools of a max and the avg-only pool: residual and relu
# (a ResNet block), relu alone, the residual alone
TAIL_CASES = [with_tail(CHANNEL_CASES[0], True, "relu"), with_tail(CHANNEL_CASES[5], False, "relu"),
              with_tail(CHANNEL_CASES[11], True, None), with_tail(SPATIAL_CASES[0], True, "relu"),
              with_tail(SPATIAL_CASES[1], True, None), with_tail(CBAM_CASES[4], True, "relu"),
              with_tail(CBAM_CASES[3], False, "relu")]
assert {c.o["padding"] for c in CHANNEL_CASES} == set(CONV_PADDINGS)


def with_prologue(case: Case) -> Case:
    """`case` with the input's per-channel affine (an eval-mode BatchNorm's) read in x's place."""
    return _case(case.op, **case.o, prologue=True)


# The prologue on each op and tie rule, with and without a max and the tail
PROLOGUE_CASES = [with_prologue(CHANNEL_CASES[0]), with_prologue(CHANNEL_CASES[3]), with_prologue(CHANNEL_CASES[10]),
                  with_prologue(SPATIAL_CASES[0]), with_prologue(SPATIAL_CASES[1]), with_prologue(CBAM_CASES[2]),
                  with_prologue(CBAM_CASES[5]), with_prologue(TAIL_CASES[0]), with_prologue(TAIL_CASES[5])]

# (N, C, H, W): odd channel counts, 1x1 and non-square maps (issue 2)
SHAPES = [(2, 37, 17, 3), (3, 1, 4, 5), (2, 3, 1, 1), (1, 8, 6, 6)]


# ----------------------------------------------------------------------------- checks every backend's suite runs

def grad_leaves(x, w: dict):
    """(names of the weights present, [x, *those weights]): what gradients are taken of."""
    names = [k for k, v in w.items() if v is not None]
    return names, [x] + [w[k] for k in names]


def case_inputs(case, shape, lay="nchw", dtype=torch.float32):
    """Fresh x and `case`'s other inputs (weights; a residual laid out like x), each wanting a gradient."""
    x = layout(rand(*shape, dtype=dtype), lay).requires_grad_()
    w = {k: None if v is None else (layout(v, lay) if k == "residual" else v).requires_grad_()
         for k, v in case.weights(shape[1], dtype=dtype, shape=shape).items()}
    return x, w


def check_gradcheck(case, backend, shape=(2, 5, 4, 3)):
    """torch.autograd.gradcheck of `backend`'s fused call in float64, over x and every other input."""
    x, w = case_inputs(case, shape, dtype=torch.float64)
    names, leaves = grad_leaves(x, w)

    def run(*leaves):
        return case.run(leaves[0], {**w, **dict(zip(names, leaves[1:]))}, backend)

    assert torch.autograd.gradcheck(run, tuple(leaves), eps=1e-6, atol=1e-7)


def check_compiled_matches_eager(case, shape, backend="cpu"):
    """torch.compile(fullgraph=True) of the fused call (channels_last): the op's fake implementation and
    autograd formula give eager's output and gradients, bit for bit."""
    x, w = case_inputs(case, shape, "channels_last")
    g = torch.randn_like(x)

    def step(run):
        out = run(x, w)
        return [out, *torch.autograd.grad(out, grad_leaves(x, w)[1], g)]

    def forward(x, w):
        return case.run(x, w, backend)

    torch._dynamo.reset()
    for a, b in zip(step(forward), step(torch.compile(forward, fullgraph=True, backend="aot_eager"))):
        assert torch.equal(a, b)


def _to(w: dict, **kw) -> dict:
    return {k: None if v is None else v.to(**kw) for k, v in w.items()}


# relative size of the input perturbations of the float32 noise floor: float32's unit roundoff
FLOAT32_ROUNDOFF = 2.0**-24


def nudge(t):
    """t (a tensor, None, or a dict of them) with every element moved by about one float32 roundoff."""
    if isinstance(t, dict):
        return {k: nudge(v) for k, v in t.items()}
    return None if t is None else t * (1 + FLOAT32_ROUNDOFF * torch.randn_like(t))


def float32_noise_floor(run, args, ref, draws=2):
    """Per output of run(*args): the worst relative move of the float64 result `ref` over `draws`
    random nudges of every input by one float32 roundoff (0 for int64 and empty outputs)."""
    worst = [0.0] * len(ref)
    for _ in range(draws):
        moved = run(*[nudge(a) for a in args])
        worst = [w if r.dtype == torch.int64 or not r.numel() else max(w, rel_err(m, r))
                 for w, m, r in zip(worst, moved, ref)]
    return worst


def grad_bounds(case, x64, w64, g64, dtype, ref_grads, targets, draws=2):
    """The bound on each gradient's error: its target, or twice the error of plain PyTorch run in
    float32 (accuracy.bound, as the benchmarks' parity check; the larger of two runs that sum in
    different orders, the oracle's autograd and the reference backend's explicit backward: a bias
    gradient that nearly cancels measured 2.5e-5 in one and 1.7e-4 in the other), or twice the float32
    noise floor, whichever is largest. The floor is how far the float64 oracle's own gradient moves
    when x, the weights and dy move by one float32 roundoff (the worst of `draws` random draws): a
    weight gradient that nearly cancels (a bias gradient, a sum of ~1000 terms of both signs) is
    determined no better than that by float32 inputs, whatever the kernel does, and the one eager
    error can be a lucky draw. Other dtypes keep their targets (float64's own errors are far below;
    the half targets are loose)."""
    if dtype != torch.float32:
        return targets
    eager = [0.0] * len(ref_grads)
    for plain in (None, "reference"):
        xe = x64.float().requires_grad_()
        we = {k: None if v is None else v.float().requires_grad_() for k, v in w64.items()}
        grads = torch.autograd.grad(case.run(xe, we, plain), grad_leaves(xe, we)[1], g64.float())
        eager = [max(m, rel_err(e, r)) for m, e, r in zip(eager, grads, ref_grads)]

    def run(xp, wp, gp):
        xp = xp.requires_grad_()
        wp = {k: None if v is None else v.requires_grad_() for k, v in wp.items()}
        return torch.autograd.grad(case.run(xp, wp), grad_leaves(xp, wp)[1], gp)

    floor = float32_noise_floor(run, (x64, w64, g64), ref_grads, draws)
    return [bound(t, max(e, f)) for t, e, f in zip(targets, eager, floor)]


def forward_ok(case, x64, w64, ref, err, dtype, draws=2):
    """Whether a forward's error `err` against the float64 result `ref` is within its bound: the
    target, or, where the error exceeds it, twice the error of the plain PyTorch reference run in
    float32 or twice the float32 noise floor, whichever is larger (as grad_bounds). A CBAM whose
    hardsigmoid gates are mostly saturated (97% of the outputs exactly 0) moved by 3.8e-5 when its
    inputs moved by one float32 roundoff: no float32 computation meets 1e-5 there but by luck."""
    if err <= TOLERANCE[dtype] or dtype != torch.float32:
        return err <= TOLERANCE[dtype]
    eager = rel_err(case.run(x64.float(), _to(w64, dtype=torch.float32)), ref)
    floor = float32_noise_floor(lambda x, w: [case.run(x, w)], (x64, w64), [ref], draws)[0]
    return err <= bound(TOLERANCE[dtype], max(eager, floor))


def _input_dtype(name: str, dtype, wdt):
    """The dtype an input of the weights dict takes: the residual is an activation, of x's dtype."""
    return dtype if name == "residual" else wdt


def check_against_oracle(case, shape, backend, dtype=torch.float32, lay="nchw", device="cpu"):
    """Forward and every gradient of `backend` on `device` against the float64 oracle on the CPU.

    The oracle sees exactly the values the backend gets (rounded to dtype; pairwise distinct, so
    every max has one right gradient); half-precision inputs take float32 weights, as under autocast
    (a residual takes x's dtype and layout).
    """
    wdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x64 = rand_distinct(*shape, dtype=dtype).to(dtype).double()
    w64 = {k: None if v is None else v.to(_input_dtype(k, dtype, wdt)).double()
           for k, v in case.weights(shape[1], shape=shape).items()}
    xr = x64.clone().requires_grad_()
    wr = {k: None if v is None else v.clone().requires_grad_() for k, v in w64.items()}
    ref = case.run(xr, wr)
    g = rand(*ref.shape).to(dtype).double()
    names, leaves = grad_leaves(xr, wr)
    ref_grads = torch.autograd.grad(ref, leaves, g)

    x = layout(x64.to(device=device, dtype=dtype), lay).requires_grad_()
    w = {k: None if v is None else v.to(device=device, dtype=_input_dtype(k, dtype, wdt)) for k, v in w64.items()}
    if w.get("residual") is not None:
        w["residual"] = layout(w["residual"], lay)
    w = {k: None if v is None else v.requires_grad_() for k, v in w.items()}
    with autocast_for(dtype, device):
        out = case.run(x, w, backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if lay != "strided":  # a strided view is copied once; the output is then plain NCHW
        assert out.stride() == x.stride(), f"{case} output strides {out.stride()}, x's {x.stride()} ({lay})"
    err = rel_err(out.cpu(), ref)
    assert forward_ok(case, x64, w64, ref.detach(), err, dtype), f"{case} forward rel err {err:.3g}"
    _, leaves = grad_leaves(x, w)
    dense = lay if lay != "strided" else "nchw"
    grads = torch.autograd.grad(out, leaves, layout(g.to(device=device, dtype=dtype), dense))
    # the computation's precision bounds every gradient: with half inputs, the float32 weights'
    # gradients are sums of half-precision terms (a bias gradient often nearly cancels)
    tols = grad_bounds(case, x64, w64, g, dtype, ref_grads, [GRAD_TOLERANCE[dtype]] * len(leaves))
    for name, gr, gref, leaf, tol in zip(["x"] + names, grads, ref_grads, leaves, tols):
        assert gr.shape == leaf.shape and gr.dtype == leaf.dtype, name
        if name == "x" and lay != "strided":
            assert gr.stride() == leaf.stride(), "grad of x must keep x's layout"
        err = rel_err(gr.cpu(), gref)
        assert err <= tol, f"{case} grad of {name} rel err {err:.3g} (bound {tol:.3g})"


def check_deterministic(case, backend, shape, lay, device="cpu"):
    """Bit-identical output and gradients run after run."""
    x = layout(rand(*shape, dtype=torch.float32, device=device), lay)
    w = _to(case.weights(shape[1], shape=shape), dtype=torch.float32, device=device)
    g = layout(rand(*shape, dtype=torch.float32, device=device), lay)

    def run():
        xx = x.clone().requires_grad_()
        ww = {k: None if v is None else v.clone().requires_grad_() for k, v in w.items()}
        out = case.run(xx, ww, backend)
        return [out] + list(torch.autograd.grad(out, grad_leaves(xx, ww)[1], g))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def check_empty_batch(case, backend, device="cpu", C=4):
    """N = 0, in each layout and dtype the backend takes: an output and an input gradient like x
    (shape, dtype, strides: an empty tensor may be both NCHW- and channels_last-contiguous, so the
    strides themselves are compared), and weight gradients of zeros of the weights' shapes and dtypes."""
    from attnfused.backends import unavailable_reason

    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if unavailable_reason(backend, device, dtype) is None:
            for lay in ("nchw", "channels_last"):
                _check_empty_batch(case, backend, device, C, dtype, lay)


def _check_empty_batch(case, backend, device, C, dtype, lay):
    wdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x = layout(torch.empty(0, C, 5, 6, device=device, dtype=dtype), lay).requires_grad_()
    w = {k: None if v is None else v.requires_grad_()
         for k, v in _to(case.weights(C), dtype=wdt, device=device).items()}
    with autocast_for(dtype, device):
        out = case.run(x, w, backend)
    assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device), (out.shape, out.dtype, out.device)
    assert out.stride() == x.stride(), f"output strides {out.stride()}, x's {x.stride()}"
    out.backward(torch.empty_like(out))
    assert (x.grad.shape, x.grad.dtype, x.grad.stride()) == (x.shape, x.dtype, x.stride()), \
        f"grad of x: {x.grad.shape} {x.grad.dtype} {x.grad.stride()}, x: {x.shape} {x.dtype} {x.stride()}"
    for name, v in w.items():
        if v is not None:
            assert v.grad is not None and v.grad.dtype == v.dtype and v.grad.shape == v.shape, name
            assert torch.equal(v.grad, torch.zeros_like(v)), f"grad of {name} must be zeros, got {v.grad}"


def check_nonfinite(case, backend, special, device="cpu"):
    """A NaN or infinity in x propagates to the same places as in the float64 reference."""
    x = rand(2, 6, 5, 4, dtype=torch.float32)
    x[1, 2, 3, 1] = special
    w = _to(case.weights(6), dtype=torch.float32)
    ref = case.run(x.double(), _to(w, dtype=torch.float64))
    out = case.run(x.to(device), _to(w, device=device), backend).cpu()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert rel_err(out[finite], ref[finite]) <= TOLERANCE[torch.float32]


def mlp_pre_activations(pooled, w1, b1, pool):
    """The MLP's first-layer pre-activations [N, P * Cr] in float64, from the saved pooled vectors."""
    avg, mx = pooled.double().unbind(1)
    v = {"avg": [avg], "max": [mx], "avg+max": [avg, mx], "mix": [0.5 * avg + 0.5 * mx]}[pool]
    return torch.cat([u @ w1.double().T + (0 if b1 is None else b1.double()) for u in v], 1)


def check_pooled_contract(backend, lay="nchw", device="cpu"):
    """What the channel ops save, whatever the backend, for every pool: mean and (max, first
    argmax) over space as torch computes them (for pool "avg" nothing reads the max, and it and
    argmax are zeros), and `hidden`, the MLP's pre-activations of those vectors (empty for the conv)."""
    ops = torch.ops.attnfused
    x = layout(rand_distinct(2, 6, 5, 3, dtype=torch.float32).float(), lay)
    mean, (mx, idx) = x.mean((2, 3)), x.flatten(2).max(2)
    w1, b1, w2, sw = rand(3, 6), rand(3), rand(6, 3), rand(1, 2, 3, 3)
    for pool in CHANNEL_POOLS:
        copts = ("mlp", pool, "relu", "sigmoid", "zeros")
        wts = tuple(v.to(device) if v is not None else None for v in (w1, b1, w2, None))
        saved = (ops.channel_attention(x.to(device), *wts, *copts, "first", None, "none", None, None, backend)[1:],
                 ops.cbam(x.to(device), *wts, sw.to(device), None, *copts, "max_mean", "sigmoid", "first", None,
                          "none", None, None, backend)[1:])
        for pooled, argmax, *_, hidden in saved:
            pooled, argmax, hidden = pooled.cpu(), argmax.cpu(), hidden.cpu()
            assert rel_err(pooled[:, 0], mean) <= TOLERANCE[torch.float32], pool
            if pool == "avg":
                assert not pooled[:, 1].any() and not argmax.any(), pool
            else:
                assert torch.equal(pooled[:, 1], mx) and torch.equal(argmax, idx), pool
            assert hidden.dtype == pooled.dtype and hidden.shape == (2, 3 * (2 if pool == "avg+max" else 1)), pool
            assert rel_err(hidden, mlp_pre_activations(pooled, w1, b1, pool)) <= TOLERANCE[torch.float32], pool
    conv = ops.channel_attention(x.to(device), rand(1, 1, 3).to(device), None, None, None, "conv", "avg+max",
                                 "relu", "sigmoid", "zeros", "first", None, "none", None, None, backend)
    assert conv[-1].shape == (0,), "hidden is empty for the conv"


OPCHECK_CASES = (CHANNEL_CASES[5], CHANNEL_CASES[9], SPATIAL_CASES[1], CBAM_CASES[3], TAIL_CASES[0], TAIL_CASES[4],
                 TAIL_CASES[5], PROLOGUE_CASES[1], PROLOGUE_CASES[4], PROLOGUE_CASES[8])


def op_samples(backend, device="cpu", C=6, saved_by=None, cases=OPCHECK_CASES):
    """(op, args) for every public forward and backward op on fresh inputs on `device`; the saved
    tensors the backward ops take come from `saved_by` (default: `backend` itself)."""
    ops = torch.ops.attnfused
    saver = saved_by or backend
    x = rand(2, C, 5, 3, dtype=torch.float32, device=device)
    g = rand(2, C, 5, 3, dtype=torch.float32, device=device)
    for case in cases:
        o, w = case.o, _to(case.weights(C, shape=x.shape), dtype=torch.float32, device=device)
        copts = (o.get("kind"), o.get("pool"), o.get("act"), o.get("gate"), o.get("padding"))
        # the forward's last inputs: the tail's, then the prologue's
        last = (w.get("residual"), o.get("activation") or "none", w.get("in_scale"), w.get("in_shift"))
        if case.op == "channel":
            wts = (w["w1"], w["b1"], w["w2"], w["b2"])
            saved = ops.channel_attention(x, *wts, *copts, o["tie"], *last, saver)[1:]
            yield ops.channel_attention.default, (x, *wts, *copts, o["tie"], *last, backend)
            yield ops.channel_attention_backward.default, (g, x, *saved, *wts, *copts, o["tie"], backend)
        elif case.op == "spatial":
            sopts = (o["maps"], o["sgate"], o["tie"])
            saved = ops.spatial_attention(x, w["sw"], w["sb"], *sopts, *last, saver)[1:]
            yield ops.spatial_attention.default, (x, w["sw"], w["sb"], *sopts, *last, backend)
            yield ops.spatial_attention_backward.default, (g, x, *saved, w["sw"], w["sb"], *sopts, backend)
        else:
            wts = (w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"])
            opts = (*copts, o["maps"], o["sgate"], o["tie"])
            saved = ops.cbam(x, *wts, *opts, *last, saver)[1:]
            yield ops.cbam.default, (x, *wts, *opts, *last, backend)
            yield ops.cbam_backward.default, (g, x, *saved, *wts, *opts, backend)
    for tie in TIE_RULES:
        smaps, sargmax = ops.spatial_pool(x, tie, saver)
        yield ops.spatial_pool.default, (x, tie, backend)
        yield ops.spatial_pool_backward.default, (rand(*smaps.shape, dtype=torch.float32, device=device), x,
                                                  sargmax, tie, backend)
    t = torch.rand(2, 5, 3, device=device)
    yield ops.spatial_scale.default, (x, t, None, "none", backend)
    yield ops.spatial_scale.default, (x, t, rand(*x.shape, dtype=torch.float32, device=device), "relu", backend)
    yield ops.spatial_scale_backward.default, (g, x, t, backend)


def check_opcheck_every_op(backend, device="cpu", C=6, saved_by=None, cases=OPCHECK_CASES, test_utils=None):
    """torch.library.opcheck of every public op; forward ops with autograd (floating inputs
    require grad), backward ops without."""
    import attnfused

    seen = set()
    for op, args in op_samples(backend, device, C, saved_by, cases):
        grad = "backward" not in op.name()
        args = tuple(a.detach().clone().requires_grad_(grad and a.is_floating_point())
                     if isinstance(a, torch.Tensor) else a for a in args)
        if test_utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=test_utils)
        seen.add(op.name().split("::")[1].split(".")[0])
    assert seen == set(attnfused.backends.OPS)
