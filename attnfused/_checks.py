"""Argument checks shared by the modules, the functional layer and the ops (SPEC §5).

Every message names the argument, what was expected and what came.
"""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_reduced_channels(channels: int, ratio) -> int:
    """Hidden width of the channel MLP; `channels // ratio` must be at least 1."""
    check_positive_int("channels", channels)
    check_positive_int("ratio", ratio)
    hidden = channels // ratio
    if hidden < 1:
        raise ValueError(
            f"channels // ratio must be >= 1, got channels={channels}, ratio={ratio} (hidden width 0)")
    return hidden


def check_spatial_kernel(name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int (padding (k-1)//2 keeps the size), got {k}")
    return k


def check_input(x, channels: int | None = None, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1), got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0 or x.shape[1] == 0):
        raise ValueError(f"{name} must have non-empty C, H and W, got shape {tuple(x.shape)}")


def check_weight(name: str, w, x: torch.Tensor, shape: tuple[int, ...] | None = None,
                 optional: bool = False) -> None:
    if w is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype, got {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"{name} must be on the input's device {x.device}, got {w.device}")
    if shape is not None and tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
