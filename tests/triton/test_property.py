"""Property-based parity of the Triton backend against the float64 reference (tests/_property.py's
strategy and check): on a GPU when there is one, else on CPU under the Triton interpreter."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import _property as P
from tests.triton._env import DEVICES, INTERPRET


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=P.budget(20 if INTERPRET else 200))
@given(data=st.data())
def test_matches_float64_reference(device, data):
    P.check(data.draw(P.examples(P.available("triton", device)), label="example"), "triton", device)
