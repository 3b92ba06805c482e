"""The accuracy contract (docs/contract.md §4), in one place for the tests and the benchmarks' parity check."""
from __future__ import annotations

import torch

# ||out - ref|| / ||ref|| against the float64 reference
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# gradients: weight gradients are sums over N*H*W products whose cancellation (a conv bias's
# gradient can sum to near zero) magnifies rounding in the relative error. The oracle checks key
# them by the computation's dtype (under half inputs the float32 weights' gradients are sums of
# half-precision terms); the cpu suite, whose kernels accumulate in float32, by the gradient's own dtype
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def bound(target: float, eager_err: float) -> float:
    """docs/contract.md §4: the target, or twice the error of the PyTorch reference in the same dtype where
    that is larger (a result that nearly cancels is ill-conditioned for any summation order; the
    eager module is the baseline, not the bar)."""
    return max(target, 2.0 * eager_err)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the plain norm of the difference where ref is zero;
    infinity where the difference is NaN)."""
    d = out.detach().double() - ref.detach().double()
    den = ref.detach().double().norm().item()
    num = d.norm().item()
    if num != num:
        return float("inf")
    return num / den if den > 0 else num
