"""The parity check made before any timing: a provider's output (and gradients) against the
float64 reference, as ||out - ref|| / ||ref|| (docs/contract.md §4)."""
from __future__ import annotations

import torch

from attnfused import accuracy
from attnfused.accuracy import TOLERANCE, rel_err  # noqa: F401 (docs/contract.md §4, one source)


def max_rel_err(outs, refs, names) -> tuple[float, str]:
    """The worst relative error over matching tensors and the name of the worst one."""
    errs = [(rel_err(o, r), n) for o, r, n in zip(outs, refs, names, strict=True)]
    return max(errs, key=lambda e: e[0])


def bound(dtype: torch.dtype, eager_err: float) -> float:
    """docs/contract.md §4: the dtype's target, or twice the PyTorch reference's error where larger."""
    return accuracy.bound(TOLERANCE[dtype], eager_err)
