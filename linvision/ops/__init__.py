"""Fused model-level ops: the memory-bound work around the attention core, as Triton kernels beside their
PyTorch references (the attention core itself is :mod:`linvision.attn.ops`).

* ``depthwise`` — :func:`fused_depthwise_conv`: a depthwise conv with its residual, bias, add, gate and
  LayerNorm neighbours in one pass; the dispatcher and the reference (Triton-free);
* ``depthwise_triton`` — its forward kernel and host function (imports Triton).
"""
from .depthwise import fused_depthwise_conv, fused_depthwise_conv_torch, triton_available

__all__ = ["fused_depthwise_conv", "fused_depthwise_conv_torch", "triton_available"]
