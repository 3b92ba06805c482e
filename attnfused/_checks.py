"""Argument checks shared by the modules, the functional layer and the ops (docs/contract.md §5).

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


_STRIDED = torch.strided


def _layout_error(name: str, t: torch.Tensor) -> TypeError:
    # sparse, mkldnn and nested tensors have no strides for the kernels (nor sizes, for nested)
    return TypeError(f"{name} must be a dense (strided) tensor, got layout "
                     f"{'nested' if t.is_nested else t.layout}; convert it first (e.g. .to_dense())")


def check_input(x, channels: int | None = None, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not _STRIDED or x.is_nested:
        raise _layout_error(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1), got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    # an empty batch returns an empty result whatever C, H and W (docs/contract.md §5)
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0 or x.shape[1] == 0):
        raise ValueError(f"{name} must have non-empty C, H and W when N > 0, got shape {tuple(x.shape)}")


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_dtypes(x: torch.Tensor, names: tuple[str, ...], weights: tuple) -> None:
    """torch's rule for layers: each weight (None, or checked by check_weight) has x's dtype, except
    under torch.autocast, where half-precision x meets float32 weights (float64 is never mixed:
    autocast does not cast it). Called after every shape check, which says more when both are off."""
    dtype = x.dtype
    for w in weights:  # the common case, all alike, in as few steps as it takes
        if w is not None and w.dtype is not dtype:
            break
    else:
        return
    for name, w in zip(names, weights):
        if w is not None and w.dtype is not dtype and (
                torch.float64 in (w.dtype, dtype) or not _autocast_on(x.device.type)):
            raise TypeError(f"{name} must have the input's dtype {dtype} (as torch's layers require, outside "
                            f"torch.autocast), got {w.dtype}; convert the module or the input (.to(dtype))")


def check_weight(name: str, w, x: torch.Tensor, shape: tuple[int, ...] | None = None,
                 optional: bool = False) -> None:
    """`w` is a dense floating tensor on x's device (of `shape`, if given); dtypes: `check_dtypes`."""
    if w is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.layout is not _STRIDED:
        raise _layout_error(name, w)
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"{name} must be on the input's device {x.device}, got {w.device}")
    if shape is not None and tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
