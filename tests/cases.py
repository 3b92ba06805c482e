"""Op configurations the parity tests sweep: every option of SPEC §2 at least once.

Each case builds the functional call and the float64 oracle for one op; backends are
checked against the oracle with tests/_util.py's tolerances.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from attnfused import functional as F
from attnfused._options import CHANNEL_POOLS, CONV_PADDINGS, SPATIAL_MAPS, spatial_in_channels
from attnfused.reference import functional as R

from tests._util import rand


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "channel", "spatial", "cbam"
    opts: tuple  # sorted (name, value) pairs

    @property
    def o(self) -> dict:
        return dict(self.opts)

    def __str__(self):
        return self.op + "[" + ",".join(f"{k}={v}" for k, v in self.opts) + "]"

    def weights(self, C: int, dtype=torch.float64) -> dict:
        """Fresh random weights for C channels (None where the option is off)."""
        o = self.o
        w = {}
        if self.op in ("channel", "cbam"):
            if o["kind"] == "mlp":
                hidden = max(1, C // 2)
                w["w1"] = rand(hidden, C, dtype=dtype, scale=C ** -0.5)
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
        ch = dict(kind=o.get("kind"), pool=o.get("pool"), act=o.get("act"), padding=o.get("padding"))
        if self.op == "channel":
            if backend is None:
                return R.channel_attention(x, w["w1"], w["b1"], w["w2"], w["b2"], gate_kind=o["gate"], **ch)
            return F.channel_attention(x, w["w1"], w["b1"], w["w2"], w["b2"], gate=o["gate"], backend=backend,
                                       **ch)
        if self.op == "spatial":
            if backend is None:
                return R.spatial_attention(x, w["sw"], w["sb"], maps=o["maps"], gate_kind=o["sgate"])
            return F.spatial_attention(x, w["sw"], w["sb"], maps=o["maps"], gate=o["sgate"], backend=backend)
        if backend is None:
            return R.cbam(x, w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"], gate_kind=o["gate"],
                          maps=o["maps"], spatial_gate=o["sgate"], **ch)
        return F.cbam(x, w["w1"], w["b1"], w["w2"], w["b2"], w["sw"], w["sb"], gate=o["gate"], maps=o["maps"],
                      spatial_gate=o["sgate"], backend=backend, **ch)


def _case(op, **opts):
    return Case(op, tuple(sorted(opts.items())))


def _channel_variants():
    """Every pool with both MLP settings (relu/sigmoid/no bias, silu/hardsigmoid/bias), every
    pool with the conv (zero and circular padding, both gates)."""
    for pool, (act, gate, bias) in itertools.product(CHANNEL_POOLS, [("relu", "sigmoid", False),
                                                                      ("silu", "hardsigmoid", True)]):
        yield dict(kind="mlp", pool=pool, act=act, gate=gate, bias=bias, padding="zeros", k1d=3)
    for pool, (padding, gate, k1d) in itertools.product(CHANNEL_POOLS, [("zeros", "sigmoid", 3),
                                                                         ("circular", "hardsigmoid", 5)]):
        yield dict(kind="conv", pool=pool, act="relu", gate=gate, bias=False, padding=padding, k1d=k1d)


def _spatial_variants():
    for maps, (k, sbias, sgate) in zip(SPATIAL_MAPS * 2, [(7, False, "sigmoid"), (3, True, "hardsigmoid"),
                                                          (5, True, "sigmoid"), (1, False, "sigmoid"),
                                                          (3, False, "sigmoid"), (7, True, "hardsigmoid")]):
        yield dict(maps=maps, k=k, sbias=sbias, sgate=sgate)


CHANNEL_CASES = [_case("channel", **v) for v in _channel_variants()]
SPATIAL_CASES = [_case("spatial", **v) for v in _spatial_variants()]
# CBAM: each channel variant once, paired round-robin with the spatial variants
CBAM_CASES = [_case("cbam", **c, **s) for c, s in zip(_channel_variants(), itertools.cycle(_spatial_variants()))]
ALL_CASES = CHANNEL_CASES + SPATIAL_CASES + CBAM_CASES
assert {c.o["padding"] for c in CHANNEL_CASES} == set(CONV_PADDINGS)

# (N, C, H, W): odd channel counts, 1x1 and non-square maps (issue 2)
SHAPES = [(2, 37, 17, 3), (3, 1, 4, 5), (2, 3, 1, 1), (1, 8, 6, 6)]
