"""Pure-PyTorch reference: the article's classes and the functional oracle."""
from . import functional
from .modules import (CBAMBlock, ChannelAttentionConv, ChannelAttentionFC, ECABlock, SEBlock,
                      SpatialAttention)

__all__ = ["SEBlock", "ECABlock", "ChannelAttentionFC", "ChannelAttentionConv", "SpatialAttention",
           "CBAMBlock", "functional"]
