"""Names of every option the fused ops take: the one place they are listed.

The ops carry options as strings; C++ and Triton kernels map them to their own
enums, and tests check that each backend accepts exactly these names.
"""
from __future__ import annotations

# Channel attention: what produces the logits from the pooled (N, C) vectors.
CHANNEL_KINDS = ("mlp", "conv")
# "avg+max": f(avg) + f(max) (CBAM); "mix": f(0.5 * avg + 0.5 * max) (timm LightCbam).
CHANNEL_POOLS = ("avg", "max", "avg+max", "mix")
HIDDEN_ACTS = ("relu", "silu")
GATES = ("sigmoid", "hardsigmoid")
CONV_PADDINGS = ("zeros", "circular")
# Spatial maps fed to the k x k conv: [max, mean] (the article), [mean, max] (timm),
# or a single map 0.5 * mean + 0.5 * max (timm LightSpatialAttn).
SPATIAL_MAPS = ("max_mean", "mean_max", "mix")

# Where the gradient of a max goes when several elements equal it: "first", all of it to one of
# them (the index torch.max and AdaptiveMaxPool2d give); "split", evenly among all of them (amax).
TIE_RULES = ("first", "split")

# The block's tail, applied in the pass that writes the output: y = activation(attention(x) + residual).
# The ops take "none" for no activation; the functional layer takes None.
TAIL_ACTIVATIONS = ("none", "relu")

BACKENDS = ("reference", "cpu", "cuda", "triton")

# What torch.compile sees of a fused module: "kernels", its fused op (opaque, except the Triton
# backend's kernels); "original", the forward of the block it replaces (plain PyTorch, which
# Inductor fuses with the layers around it, at compile's own speed).
COMPILE_AS = ("kernels", "original")


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def spatial_in_channels(maps: str) -> int:
    """Input channels of the spatial conv for a map mode."""
    return 1 if maps == "mix" else 2


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA-Net's adaptive kernel size, exactly as the article computes it."""
    import math

    k = int(abs((math.log(channels, 2) + b) / gamma))
    return k if k % 2 else k + 1


def pool_inputs(pool: str) -> int:
    """How many vectors per sample the channel function sees: 2 for "avg+max", else 1
    (small::pool_inputs in C++)."""
    return 2 if pool == "avg+max" else 1
