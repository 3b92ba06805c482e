"""The cpu backend's max gradients on inputs full of ties, under both tie rules ("first": all of it
at the saved argmax; "split": shared evenly by every element equal to the max, as torch's amax),
against the float64 oracle (attnfused.reference.functional with the same rule): every op that takes
a max, both layouts, float32 / float64 / bfloat16. Plus: the two rules' gradients differ on these
inputs (a kernel that ignored the rule would fail), and the "first" rule's results are bitwise
those of the kernels before the split rule came (a baseline saved by the earlier build, when present).
"""
from __future__ import annotations

import os

import pytest
import torch

from attnfused import functional as F
from attnfused.backends import extension
from attnfused.reference import functional as R
from tests._util import GRAD_TOLERANCE, TOLERANCE, autocast_for, layout, rel_err
from tests.cases import CBAM_CASES, CHANNEL_CASES, SPATIAL_CASES, Case, grad_leaves

pytestmark = pytest.mark.skipif(extension.unavailable_reason("cpu") is not None,
                                reason=f"C++ extension unavailable: {extension.unavailable_reason('cpu')}")

SHAPE = (3, 10, 5, 7)  # C = 10 and H*W = 35: vector bodies and tails along both layouts' rows
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
INPUTS = ("grid", "zeros", "after_gate", "bf16", "nan")
# where the first tie rule's results of the build before the split rule are kept (tests/test_cpu_ties.py
# baseline(): written with that build's library)
BASELINE = os.environ.get("ATTNFUSED_TIE_BASELINE", "/tmp/attnfused_tie_first_baseline.pt")


def _with(case: Case, **opts) -> Case:
    return Case(case.op, tuple(sorted({**case.o, **opts}.items())))


# one MLP case with a max pool per op (equal MLP rows give equal gates), and one conv case
def _pick(cases, **want):
    return next(c for c in cases if all(c.o.get(k) == v for k, v in want.items()))


BASE_CASES = {
    "channel_mlp": _pick(CHANNEL_CASES, kind="mlp", pool="avg+max"),
    "channel_conv": _pick(CHANNEL_CASES, kind="conv", pool="max"),
    "spatial": _pick(SPATIAL_CASES, maps="max_mean"),
    "spatial_mix": _pick(SPATIAL_CASES, maps="mix"),
    "cbam_mlp": _pick(CBAM_CASES, kind="mlp", pool="avg+max"),
    "cbam_conv": _pick(CBAM_CASES, kind="conv", pool="mix"),
}


def tied_input(kind: str, shape=SHAPE, seed=0) -> torch.Tensor:
    """float64 x made of ties, exact in every dtype tested."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    if kind == "bf16":  # activations rounded to bfloat16 (8 bits): many equal values
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.25).to(torch.bfloat16).double()
    x = (torch.randint(-2, 3, shape, generator=gen).double() / 2)  # {-1, -0.5, 0, 0.5, 1}
    if kind == "zeros":
        x[:, 1] = 0  # an all-zero channel
        x[-1] = 0  # a whole zero sample
    elif kind == "after_gate":
        # channels 0 and 1 equal and largest: with equal gates (equal MLP rows) x1 = x * s ties there
        x[:, 0] = torch.rand((N, H, W), generator=gen, dtype=torch.float64) + 2
        x[:, 1] = x[:, 0]
    elif kind == "nan":
        x[0, 2, 1, 3] = float("nan")
    return x


def case_weights(case: Case, kind: str, wdt, name: str = "", C: int = SHAPE[1]) -> dict:
    torch.manual_seed(1)
    if name == "pool":
        return {}
    w = case.weights(C)
    if kind == "after_gate" and case.o.get("kind") == "mlp":
        w["w2"][1] = w["w2"][0]
        if w["b2"] is not None:
            w["b2"][1] = w["b2"][0]
    return {k: None if v is None else v.to(wdt).double() for k, v in w.items()}


def run_op(name: str, case: Case, x, w: dict, backend=None):
    """The op's output: the fused call (backend given) or the float64 oracle (None); spatial_pool's
    maps ([max, mean]) for "pool"."""
    if name == "pool":
        if backend is None:
            mean, mx = R.pool_channels(x, case.o["tie"])
            return torch.stack((mx, mean), 1)
        return F.spatial_pool(x, tie=case.o["tie"], backend=backend)
    return case.run(x, w, backend)


OPS = list(BASE_CASES) + ["pool"]


def _case(name: str, tie: str) -> Case:
    return _with(BASE_CASES["spatial" if name == "pool" else name], tie=tie)


def _grads(name, case, x, w, g, backend, dtype=None):
    names, leaves = grad_leaves(x, w)
    with autocast_for(dtype) if dtype is not None else autocast_for(torch.float64):
        out = run_op(name, case, x, w, backend)
    return [out] + list(torch.autograd.grad(out, leaves, g.to(out.dtype))), names


def _close(out, ref, tol) -> bool:
    """Within tol (relative), NaN exactly where the oracle has NaN."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.equal(out.isnan(), ref.isnan()):
        return False
    ok = ~ref.isnan()
    return rel_err(out[ok], ref[ok]) <= tol


def backend_and_oracle(name, tie, kind, dtype, lay, backend="cpu", device="cpu", shape=SHAPE):
    """(the backend's output and gradients, the float64 oracle's, their labels) on tied input `kind`."""
    case = _case(name, tie)
    wdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x64 = tied_input(kind, shape).to(dtype).double()
    w64 = case_weights(case, kind, wdt, name, shape[1])
    xr = x64.clone().requires_grad_()
    wr = {k: None if v is None else v.clone().requires_grad_() for k, v in w64.items()}
    gen = torch.Generator().manual_seed(2)
    out_shape = run_op(name, case, x64, w64).shape
    g = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype if name != "pool" else torch.float32).double()
    ref, names = _grads(name, case, xr, wr, g, None)
    x = layout(x64.to(dtype), lay).to(device).requires_grad_()
    w = {k: None if v is None else v.to(wdt).to(device).requires_grad_() for k, v in w64.items()}
    got, _ = _grads(name, case, x, w, g.to(device), backend, dtype)
    return [t.cpu() for t in got], ref, ["out", "x"] + names


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("tie", ["first", "split"])
@pytest.mark.parametrize("name", OPS)
def test_ties_against_oracle(name, tie, kind, dtype, lay):
    check_ties_against_oracle(name, tie, kind, dtype, lay)


def check_ties_against_oracle(name, tie, kind, dtype, lay, backend="cpu", device="cpu", shape=SHAPE):
    """The output (dtype's tolerance) and every gradient (its gradient tolerance) of `backend` within
    reach of the float64 oracle, NaN exactly where the oracle's are."""
    got, ref, labels = backend_and_oracle(name, tie, kind, dtype, lay, backend, device, shape)
    for i, (label, a, b) in enumerate(zip(labels, got, ref)):
        tol = (TOLERANCE if i == 0 else GRAD_TOLERANCE)[dtype]
        assert _close(a, b, tol), (label, rel_err(a[~b.isnan()], b[~b.isnan()]) if a.shape == b.shape else a.shape)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("name", OPS)
def test_rules_differ_on_ties(name, lay):
    """On inputs full of ties the two rules' input gradients differ, and each matches the oracle of
    its own rule only (so a kernel that ignored the rule, or spread the split wrongly, fails)."""
    kind = "after_gate" if name.startswith("cbam") else "grid"
    first, ref_first, _ = backend_and_oracle(name, "first", kind, torch.float64, lay)
    split, ref_split, _ = backend_and_oracle(name, "split", kind, torch.float64, lay)
    assert torch.equal(first[0], split[0])  # the forward is the same
    assert rel_err(first[1], split[1]) > 1e-3
    assert rel_err(split[1], ref_split[1]) <= 1e-12 and rel_err(first[1], ref_first[1]) <= 1e-12
    assert rel_err(split[1], ref_first[1]) > 1e-3


def test_cbam_ties_after_gate_only():
    """The CBAM spatial max ties on x1 = x * s where channels 0 and 1 have equal x and equal gates
    (equal MLP rows): the split share goes to both, as the oracle's."""
    got, ref, _ = backend_and_oracle("cbam_mlp", "split", "after_gate", torch.float32, "nchw")
    first, _, _ = backend_and_oracle("cbam_mlp", "first", "after_gate", torch.float32, "nchw")
    assert rel_err(got[1], ref[1]) <= GRAD_TOLERANCE[torch.float32]
    assert rel_err(got[1], first[1]) > 1e-3


# ----------------------------------------------------------------------------- "first" unchanged, bitwise

BASELINE_SHAPES = [(2, 19, 20, 15), (3, 10, 5, 7), (8, 16, 9, 9)]


def baseline_results(backend="cpu") -> dict:
    """Outputs and gradients under tie "first" for each op, shape, layout and dtype (the baseline)."""
    res = {}
    for name in OPS:
        case = _case(name, "first")
        for si, shape in enumerate(BASELINE_SHAPES):
            for dtype in DTYPES:
                wdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
                gen = torch.Generator().manual_seed(10 + si)
                x64 = (torch.randint(-2, 3, shape, generator=gen).double() / 2
                       + (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).to(torch.bfloat16).double())
                w64 = case_weights(case, "", wdt, name, shape[1])
                out_shape = run_op(name, case, x64, w64).shape
                g = torch.randn(out_shape, generator=gen, dtype=torch.float64)
                for lay in LAYOUTS:
                    x = layout(x64.to(dtype), lay).requires_grad_()
                    w = {k: None if v is None else v.to(wdt).requires_grad_() for k, v in w64.items()}
                    out, _ = _grads(name, case, x, w, g, backend, dtype)
                    res[f"{name}/{si}/{dtype}/{lay}"] = [t.detach().clone() for t in out]
    return res


@pytest.mark.skipif(not os.path.exists(BASELINE), reason=f"no baseline of the earlier build at {BASELINE}")
def test_first_rule_bitwise_unchanged():
    base = torch.load(BASELINE)
    now = baseline_results()
    assert base.keys() == now.keys()
    for key in base:
        for i, (a, b) in enumerate(zip(now[key], base[key])):
            same = a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a.isnan(), b.isnan())
            same = same and torch.equal(a.nan_to_num(), b.nan_to_num())
            assert same, (key, i)


if __name__ == "__main__":  # python -m tests.test_cpu_ties: write the baseline with the loaded build
    torch.save(baseline_results(), BASELINE)
    print("saved", BASELINE)
