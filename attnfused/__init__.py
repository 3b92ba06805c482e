"""attnfused: fused kernels for the attention blocks of CNNs (SE, ECA, CBAM).

`attnfused.<Name>` are drop-in fused versions of `attnfused.reference.<Name>` (the
article's classes); `attnfused.functional` has the functional forms; the custom ops live
under `torch.ops.attnfused`. Nothing compiles at import.
"""
from . import functional, ops, reference
from .backends import BackendUnavailableError, available_backends
from .backends.extension import build_info
from .modules import CBAMBlock, ChannelAttentionConv, ChannelAttentionFC, ECABlock, SEBlock, SpatialAttention
from .convert import ConvertEntry, convert, set_compile_as  # after .modules: convert builds on them

__version__ = "0.1.0"

__all__ = ["SEBlock", "ECABlock", "ChannelAttentionFC", "ChannelAttentionConv", "SpatialAttention", "CBAMBlock",
           "available_backends", "BackendUnavailableError", "functional", "ops", "reference", "convert",
           "set_compile_as", "ConvertEntry", "build_info"]
