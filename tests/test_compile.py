"""torch.compile(fullgraph=True) traces every fused module without graph breaks (CPU)."""
from __future__ import annotations

import pytest
import torch

import attnfused
from tests._util import GRAD_TOLERANCE, TOLERANCE, cpu_backends, rand, rel_err

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
