"""The parity check made before any timing: a provider's output (and gradients) against the
float64 reference, as ||out - ref|| / ||ref|| (SPEC §4)."""
from __future__ import annotations

import torch

# SPEC §4 accuracy targets
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = out.detach().double() - ref.detach().double()
    den = ref.detach().double().norm().item()
    num = d.norm().item()
    if num != num:  # NaN where the reference has none
        return float("inf")
    return num / den if den > 0 else num


def max_rel_err(outs, refs, names) -> tuple[float, str]:
    """The worst relative error over matching tensors and the name of the worst one."""
    errs = [(rel_err(o, r), n) for o, r, n in zip(outs, refs, names, strict=True)]
    return max(errs, key=lambda e: e[0])


def bound(dtype: torch.dtype, eager_err: float) -> float:
    """SPEC §4: the dtype's target, or twice the error of the PyTorch reference in the same
    dtype where that is larger (the half-precision eager module is the baseline, not the bar)."""
    return max(TOLERANCE[dtype], 2.0 * eager_err)
