"""The article's six attention blocks in plain PyTorch: the oracle for every test.

Constructors (positional order), submodule names and `state_dict` keys are exactly the
article's, so its checkpoints load here and into the fused `attnfused.<Name>` classes.
Configuration errors raise at construction (docs/contract.md §5) instead of the article's asserts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import _checks
from .._options import eca_kernel_size


def _mlp(channels: int, ratio: int) -> nn.Sequential:
    hidden = _checks.check_reduced_channels(channels, ratio)
    return nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                         nn.Linear(hidden, channels, bias=False))


def _eca_conv(channels: int, gamma, b) -> nn.Conv1d:
    _checks.check_positive_int("channels", channels)
    for name, v in (("gamma", gamma), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if gamma == 0:
        raise ValueError("gamma must be non-zero, got 0")
    k = eca_kernel_size(channels, gamma, b)
    return nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: `x * sigmoid(MLP(pool(x)))`, pool = "avg" or "max"."""

    def __init__(self, mode: str, channels: int, ratio: int):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
        self.mode = mode
        self.channels = channels
        self.ratio = ratio
        self.avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.max_pooling = nn.AdaptiveMaxPool2d(1)
        self.global_pooling = self.avg_pooling if mode == "avg" else self.max_pooling
        self.fc_layers = _mlp(channels, ratio)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, channels={self.channels}, ratio={self.ratio}"

    def forward(self, x):
        _checks.check_input(x, self.channels)
        b, c = x.shape[:2]
        v = self.global_pooling(x).view(b, c)
        v = self.fc_layers(v).view(b, c, 1, 1)
        return x * self.sigmoid(v)


class ECABlock(nn.Module):
    """Efficient channel attention: `x * sigmoid(conv1d(avg(x)))`."""

    def __init__(self, channels: int, gamma=2, b=1):
        super().__init__()
        self.channels = channels
        self.gamma = gamma
        self.b = b
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _eca_conv(channels, gamma, b)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gamma={self.gamma}, b={self.b}, k={self.conv.kernel_size[0]}"

    def forward(self, x):
        _checks.check_input(x, self.channels)
        v = self.avg_pool(x)
        v = self.conv(v.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(v)


class ChannelAttentionFC(nn.Module):
    """CBAM channel attention, MLP form: `x * sigmoid(MLP(avg) + MLP(max))`."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        self.channels = channels
        self.ratio = ratio
        self.avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.max_pooling = nn.AdaptiveMaxPool2d(1)
        self.fc_layers = _mlp(channels, ratio)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ratio={self.ratio}"

    def forward(self, x):
        _checks.check_input(x, self.channels)
        b, c = x.shape[:2]
        avg_x = self.avg_pooling(x).view(b, c)
        max_x = self.max_pooling(x).view(b, c)
        v = self.fc_layers(avg_x) + self.fc_layers(max_x)
        return x * self.sigmoid(v).view(b, c, 1, 1)


class ChannelAttentionConv(nn.Module):
    """CBAM channel attention, 1D conv form: `x * sigmoid(conv1d(avg) + conv1d(max))`."""

    def __init__(self, channels: int, gamma=2, b=1):
        super().__init__()
        self.channels = channels
        self.gamma = gamma
        self.b = b
        self.avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.max_pooling = nn.AdaptiveMaxPool2d(1)
        self.conv = _eca_conv(channels, gamma, b)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gamma={self.gamma}, b={self.b}, k={self.conv.kernel_size[0]}"

    def forward(self, x):
        _checks.check_input(x, self.channels)
        conv = lambda v: self.conv(v.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)  # noqa: E731
        v = conv(self.avg_pooling(x)) + conv(self.max_pooling(x))
        return x * self.sigmoid(v)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: `x * sigmoid(conv2d([max_c(x), mean_c(x)]))`."""

    def __init__(self, k: int):
        super().__init__()
        self.k = _checks.check_spatial_kernel("k", k)
        self.conv = nn.Conv2d(2, 1, kernel_size=(k, k), stride=(1, 1), padding=((k - 1) // 2, (k - 1) // 2),
                              bias=False)
        self.sigmoid = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"k={self.k}"

    def forward(self, x):
        _checks.check_input(x)
        avg_x = torch.mean(x, dim=1, keepdim=True)
        max_x, _ = torch.max(x, dim=1, keepdim=True)
        v = self.conv(torch.cat((max_x, avg_x), dim=1))
        return x * self.sigmoid(v)


class CBAMBlock(nn.Module):
    """Channel attention (`"FC"` or `"Conv"`), then spatial attention on its output."""

    # the classes of the two halves; the fused CBAMBlock names its own
    _channel_classes = {"FC": ChannelAttentionFC, "Conv": ChannelAttentionConv}
    _spatial_class = SpatialAttention

    def __init__(self, channel_attention_mode: str, spatial_attention_kernel_size: int, channels: int = None,
                 ratio: int = None, gamma: int = None, b: int = None):
        super().__init__()
        mode = channel_attention_mode
        if mode == "FC":
            if channels is None or ratio is None:
                raise ValueError("CBAMBlock('FC', ...) needs channels and ratio, "
                                 f"got channels={channels}, ratio={ratio}")
            block = self._channel_classes["FC"](channels, ratio)
        elif mode == "Conv":
            if channels is None or gamma is None or b is None:
                raise ValueError("CBAMBlock('Conv', ...) needs channels, gamma and b, "
                                 f"got channels={channels}, gamma={gamma}, b={b}")
            block = self._channel_classes["Conv"](channels, gamma, b)
        else:
            raise ValueError(f"channel_attention_mode must be 'FC' or 'Conv', got {mode!r}")
        self.channel_attention_mode = mode
        self.channel_attention_block = block
        self.spatial_attention_block = self._spatial_class(spatial_attention_kernel_size)

    def forward(self, x):
        x = self.channel_attention_block(x)
        return self.spatial_attention_block(x)
