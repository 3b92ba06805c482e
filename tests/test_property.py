"""Property-based parity of the backends this process runs on CPU ("reference", "cpu") against the
float64 reference: random shapes, layouts, dtypes, options and special values (tests/_property.py;
the Triton backend's run is tests/triton/test_property.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfused._options import TIE_RULES
from tests import _property as P
from tests._util import cpu_backends

@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in cpu_backends()])
@settings(max_examples=P.budget(100))
@given(data=st.data())
def test_matches_float64_reference(backend, data):
    P.check(data.draw(P.examples(P.available(backend)), label="example"), backend)


@pytest.mark.parametrize("tie", TIE_RULES)
@pytest.mark.parametrize("shape", [(0, 3, 0, 4), (0, 3, 5, 0), (0, 0, 0, 0)], ids=str)
@pytest.mark.parametrize("op", P.OPS)
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in cpu_backends()])
def test_empty_batch_and_space(backend, op, shape, tie):
    """An empty batch with empty C, H or W, every op (the property test draws such shapes rarely)."""
    case = P.Case(op, (("act", "relu"), ("bias", True), ("gate", "sigmoid"), ("k", 3), ("k1d", 3),
                       ("kind", "mlp"), ("maps", "max_mean"), ("padding", "zeros"), ("pool", "avg+max"),
                       ("sbias", True), ("sgate", "sigmoid"), ("tie", tie))) \
        if op in ("channel", "spatial", "cbam") else None
    for lay in ("nchw", "channels_last"):
        P.check(P.Example(op, tie, case, shape, torch.float32, lay, "none", 1.0, 0), backend)
