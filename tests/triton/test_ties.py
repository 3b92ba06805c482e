"""The max's tie rule on the Triton kernels: inputs full of ties, for every op that takes a max
(channel attention, spatial attention, CBAM, spatial_pool), both rules ("first": all of a max's
gradient at the first maximal element; "split": divided evenly among all of them, as torch's
`amax`), NCHW and channels_last, float32, against the float64 oracle with the same rule: output
and every gradient (input and weights). Each check also runs the other rule and asserts that it
fails against the oracle: these inputs tell the rules apart.

The inputs: values from {-1, -0.5, 0, 0.5, 1} (ties everywhere, in the max over space and over
channels), an all-zero channel, a whole zero sample (every element its sample's max: a tie of
all C channels at each pixel and of all H*W pixels in each channel), and, for CBAM, pixels where
x = 4 in three channels of which two have equal gates (equal rows of the MLP's second layer and
equal biases): x1 = x * s ties there only in those two (the third, with x equal too, has another
gate). Weights and output gradients are fresh random draws. A NaN in x: NaN where the oracle has
it (under "split" NaN along the whole reduction, as amax's backward: count 0, (g / 0) * 0).

On a GPU when there is one, else on CPU under the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

from attnfused import functional as F
from attnfused.accuracy import bound
from attnfused.reference import functional as R
from tests._util import GRAD_TOLERANCE, TOLERANCE, layout, rand, rel_err
from tests.cases import Case, grad_leaves
from tests.triton._env import DEVICES

B = "triton"
RULES = ("first", "split")
LAYS = ("nchw", "channels_last")
SHAPE = (3, 8, 5, 4)  # several channel and pixel blocks and splits under the interpreter: 8 * 20 > 16
C1, C2, C3 = 2, 5, 6  # CBAM: gates of C1 and C2 equal, C3's not
TIED = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)


def _case(op, tie, **opts):
    return Case(op, tuple(sorted({**opts, "tie": tie}.items())))


# one case per op and option group (sigmoid gates: no kinks of the hard sigmoid at the tied values)
def _cases(tie):
    mlp = dict(kind="mlp", act="relu", gate="sigmoid", bias=True, padding="zeros", k1d=3)
    conv = dict(kind="conv", act="relu", gate="sigmoid", bias=False, padding="circular", k1d=3)
    sp = dict(maps="max_mean", k=3, sbias=True, sgate="sigmoid")
    return {"channel-mlp-avg+max": _case("channel", tie, pool="avg+max", **mlp),
            "channel-conv-max": _case("channel", tie, pool="max", **conv),
            "channel-mlp-mix": _case("channel", tie, pool="mix", **mlp),
            "spatial-max_mean": _case("spatial", tie, **sp),
            "spatial-mix": _case("spatial", tie, **{**sp, "maps": "mix", "k": 1}),
            "cbam-mlp-avg+max": _case("cbam", tie, pool="avg+max", **mlp, **sp),
            "cbam-conv-max": _case("cbam", tie, pool="max", **conv, **{**sp, "maps": "mean_max"}),
            "pool": "pool"}


NAMES = list(_cases("first"))


def tied_input(gen: torch.Generator, shape=SHAPE) -> torch.Tensor:
    """float64 values from TIED, sample 0's channel 1 all zeros, the last sample all zeros."""
    x = TIED[torch.randint(0, len(TIED), shape, generator=gen)]
    x[0, 1] = 0
    x[-1] = 0
    return x


def cbam_ties(x: torch.Tensor, w: dict, gen: torch.Generator):
    """Ties that exist only in x1 = x * s: x = 4 at some pixels in channels C1, C2, C3 (larger than
    any other x1 there), the gates of C1 and C2 equal (equal rows of w2 and b2; a large b2 keeps
    them above 1/4), C3's gate another. Kind "conv": the gates follow the pooled vectors and the
    taps, so only the max's ties in x (and the zero sample) are set."""
    N, C, H, W = x.shape
    if w.get("w2") is None:
        return
    w["w2"][C2] = w["w2"][C1]
    w["b2"][C1] = w["b2"][C2] = 2.0
    w["b2"][C3] = -0.5
    pix = torch.randperm(H * W, generator=gen)[:4]
    for n in range(N - 1):  # (not the zero sample)
        for c in (C1, C2, C3):
            x[n, c].view(-1)[pix] = 4.0


def _weights(case, name, gen):
    if name == "pool":
        return {}
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return case.weights(SHAPE[1])


def _run(case, x, w, backend=None, tie=None):
    """Output of the op (backend None: the oracle) and its inputs that take a gradient."""
    if case == "pool":
        if backend is None:
            mean, mx = R.pool_channels(x, tie)
            return torch.stack((mx, mean), 1)
        return F.spatial_pool(x, tie=tie, backend=backend)
    if tie is not None:
        case = Case(case.op, tuple((k, tie if k == "tie" else v) for k, v in case.opts))
    return case.run(x, w, backend)


def _grads(case, x, w, g, backend, tie, device="cpu", dtype=torch.float64, lay="nchw"):
    """[output, grad x, grad of each weight present] of the op (backend None: the oracle)."""
    xx = layout(x.to(device=device, dtype=dtype), lay).requires_grad_()
    ww = {k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_() for k, v in w.items()}
    out = _run(case, xx, ww, backend, tie)
    gg = g.to(device=device, dtype=dtype)
    if lay != "nchw" and gg.dim() == 4 and gg.shape == xx.shape:
        gg = layout(gg, lay)
    _, leaves = grad_leaves(xx, ww)
    return [out.detach().cpu()] + [t.cpu() for t in torch.autograd.grad(out, leaves, gg)]


def _inputs(name, case, seed, nan=False):
    gen = torch.Generator().manual_seed(seed)
    x = tied_input(gen)
    w = _weights(case, name, gen)
    if name.startswith("cbam"):
        cbam_ties(x, w, gen)
    if nan:
        x[0, 3, 2, 1] = float("nan")
    oshape = (SHAPE[0], 2, SHAPE[2], SHAPE[3]) if case == "pool" else SHAPE
    torch.manual_seed(seed + 1)
    return x, w, rand(*oshape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYS)
@pytest.mark.parametrize("tie", RULES)
@pytest.mark.parametrize("name", NAMES)
def test_ties_against_oracle(name, tie, lay, device):
    case = _cases(tie)[name]
    seed = 1000 * NAMES.index(name) + 10 * RULES.index(tie) + LAYS.index(lay)
    x, w, g = _inputs(name, case, seed)
    w = {k: None if v is None else v.float().double() for k, v in w.items()}  # float32 weights, exactly
    ref = _grads(case, x, w, g.float().double(), None, tie)
    got = _grads(case, x, w, g, B, tie, device, torch.float32, lay)
    # the bound: the target, or twice the float32 oracle's own error where larger (accuracy.bound: a weight
    # gradient that nearly cancels, a spatial tap's over 60 pixels, is ill-conditioned in any order)
    eager = _grads(case, x, w, g, None, tie, "cpu", torch.float32, lay)
    names = ["y", "x"] + [k for k, v in w.items() if v is not None]
    for i, (what, a, r, e) in enumerate(zip(names, got, ref, eager)):
        tol = bound(TOLERANCE[torch.float32] if i == 0 else GRAD_TOLERANCE[torch.float32], rel_err(e, r))
        assert a.shape == r.shape, what
        err = rel_err(a, r)
        assert err <= tol, f"{name} tie={tie} {lay}: {'output' if i == 0 else 'grad of ' + what} rel err " \
                           f"{err:.3g} (bound {tol:.3g})"
    assert got[1].stride() == layout(x, lay).stride(), "grad of x must keep x's layout"
    # the other rule is wrong here: its input gradient misses the oracle's by far
    other = RULES[1 - RULES.index(tie)]
    wrong = _grads(case, x, w, g, B, other, device, torch.float32, lay)
    assert torch.equal(wrong[0], got[0]), "the forward is the same under both rules"
    assert rel_err(wrong[1], ref[1]) > 10 * GRAD_TOLERANCE[torch.float32], \
        f"{name}: tie={other} passes against the tie={tie} oracle: the inputs do not tell the rules apart"


@pytest.mark.parametrize("device", DEVICES)
def test_cbam_ties_only_after_the_gate(device):
    """The premise of CBAM's inputs: x1 = x * s ties in channels C1 and C2 at the pixels where x = 4,
    in the Triton kernels' float32 gates as in the oracle's float64 ones, and not in C3; so "split"
    gives C1 and C2 each half of the spatial max's gradient there, "first" all of it to C1."""
    from attnfused.backends.triton.channel import channel_gate

    case = _cases("split")["cbam-mlp-avg+max"]
    o = case.o
    x, w, g = _inputs("cbam-mlp-avg+max", case, 7)
    wf = {k: None if v is None else v.float().to(device) for k, v in w.items()}
    xf = x.float().to(device)
    out = torch.ops.attnfused.cbam(xf, wf["w1"], wf["b1"], wf["w2"], wf["b2"], wf["sw"], wf["sb"], o["kind"],
                                   o["pool"], o["act"], o["gate"], o["padding"], o["maps"], o["sgate"], "split", None,
                                   "none", None, None, B)
    pooled, smaps = out[1], out[3]
    s = channel_gate(pooled, wf["w1"], wf["b1"], wf["w2"], wf["b2"], o["kind"], o["pool"], o["act"], o["gate"],
                     o["padding"])[0].cpu()
    s64 = R.gate(R.channel_logits(*R.pool_space(x), w["w1"], w["b1"], w["w2"], w["b2"], kind="mlp",
                                  pool=o["pool"], act="relu", padding="zeros"), "sigmoid")
    for gates in (s, s64):
        assert torch.equal(gates[:, C1], gates[:, C2]) and not (gates[:, C1] == gates[:, C3]).any()
    at4 = x[0, C1] == 4
    x1 = xf.cpu()[0] * s[0][:, None, None]
    assert at4.any() and torch.equal(smaps.cpu()[0, 0][at4], x1[C1][at4]) and torch.equal(x1[C1][at4], x1[C2][at4])


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", RULES)
@pytest.mark.parametrize("name", ["pool", "spatial-max_mean", "channel-mlp-avg+max", "cbam-mlp-avg+max"])
def test_nan_like_oracle(name, tie, device):
    """A NaN in x: NaN in the output and in every gradient exactly where the float64 oracle has it
    (under "split" along the whole reduction through the NaN max), the rest within tolerance."""
    case = _cases(tie)[name]
    x, w, g = _inputs(name, case, 3 + RULES.index(tie), nan=True)
    w = {k: None if v is None else v.float().double() for k, v in w.items()}
    ref = _grads(case, x, w, g.float().double(), None, tie)
    got = _grads(case, x, w, g, B, tie, device, torch.float32)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert torch.equal(a.isnan(), r.isnan()), f"{name} tie={tie}: NaN of output {i} not where the oracle's are"
        fin = ~r.isnan()
        tol = TOLERANCE[torch.float32] if i == 0 else GRAD_TOLERANCE[torch.float32]
        assert rel_err(a[fin], r[fin]) <= tol, f"{name} tie={tie}: output {i}"
    if name == "pool":  # the rules differ: split makes the NaN pixel's whole column NaN, first does not
        column = got[1][0, :, 2, 1]
        assert column.isnan().all() if tie == "split" else column.isnan().sum() <= 1
