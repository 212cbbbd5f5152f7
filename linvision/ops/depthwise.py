"""Depthwise convolution with its neighbours fused in: the memory-bound work around the attention core.

In LinViT-style blocks a depthwise conv is always followed (or preceded) by elementwise work over the same
activations: the conditional positional encoding ``x + DWConv3(x) + b`` feeds a LayerNorm, LePE
``(u + DWConv5(v) + b) ⊙ o`` gates the attention output, and a residual add feeds the next LayerNorm.
Run as PyTorch ops each step is a full read and write of the activations (and cuDNN adds the conv bias in
a separate broadcast pass); the Triton kernel reads each input once and writes the result once.
:func:`fused_depthwise_conv` computes, per channel ``c`` and pixel ``p``::

    y   = Σ_t w[c, t] x[p + t] (+ x[p] if identity) + bias[c]   (k×k taps, zero padding k//2)
    y   = y + add[p]                                           if add is given
    y   = y ⊙ gate[p]                                          if gate is given
    out = y,  or (y, LayerNorm_c(y)) with ``norm=(weight, bias, eps)``

``weight=None`` leaves the conv out (``y = x (if identity) + bias``): with ``identity=True, add=a, norm=n``
that is a residual add fused with the LayerNorm after it.

Inputs are ``(B, C, H, W)`` with any strides: channels_last tensors and channel slices of a wider
channels_last tensor (q/k/v/o of a fused projection) are read in place. The output is channels_last in the
autocast dtype when autocast is on for the input's device, else in ``x.dtype``; the kernel accumulates in
float32.

The Triton path is forward only: it serves calls that record no autograd graph (inference), and the
reference (``backend="torch"``), plain PyTorch ops with autograd, serves training. ``"auto"`` picks Triton
for CUDA tensors when no gradient is recorded.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attn.ops.flags import records_grad, under_dispatch_mode

__all__ = ["fused_depthwise_conv", "fused_depthwise_conv_torch", "triton_available", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")

Norm = Tuple[Tensor, Tensor, float]


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor], gate: Optional[Tensor],
           norm: Optional[Norm]) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    k = weight.shape[-1] if weight is not None else 1
    if weight is not None and (weight.shape != (c, 1, k, k) or k % 2 == 0):
        raise ValueError(f"weight must be a depthwise kernel ({c}, 1, k, k) with k odd, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {tuple(bias.shape)}")
    for name, t in (("add", add), ("gate", gate)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if norm is not None and (norm[0].shape != (c,) or norm[1].shape != (c,)):
        raise ValueError(f"norm weight and bias must have shape ({c},)")


def output_dtype(x: Tensor) -> torch.dtype:
    """The dtype PyTorch's conv would return for ``x``: autocast's when it is on for x's device."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def fused_depthwise_conv_torch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, *,
                               identity: bool = False, add: Optional[Tensor] = None,
                               gate: Optional[Tensor] = None,
                               norm: Optional[Norm] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The reference: the same function as PyTorch ops (differentiable; the Triton kernel's twin)."""
    if weight is None:    # no conv: the identity term (if asked) and the bias
        y = x if identity else torch.zeros_like(x)
        y = y + bias[:, None, None] if bias is not None else y
    else:
        k = weight.shape[-1]
        if identity:
            centre = torch.zeros_like(weight)
            centre[:, :, k // 2, k // 2] = 1.0
            weight = weight + centre
        y = F.conv2d(x, weight, bias, 1, k // 2, 1, x.shape[1])
    if add is not None:
        y = add + y
    if gate is not None:
        y = y * gate
    if norm is None:
        return y
    n = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), norm[0].to(y.dtype), norm[1].to(y.dtype), norm[2])
    return y, n.permute(0, 3, 1, 2).to(y.dtype)   # autocast runs layer_norm in fp32


_KERNELS = []   # the kernel module once imported; [None] if Triton is unusable


def triton_available(x: Tensor) -> bool:
    """Whether the Triton kernel can take ``x``: a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``."""
    if not _KERNELS:
        try:
            from . import depthwise_triton
        except ImportError:   # no usable Triton
            depthwise_triton = None
        _KERNELS.append(depthwise_triton)
    return _KERNELS[0] is not None and _KERNELS[0].supports(x)


def fused_depthwise_conv(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, *, identity: bool = False,
                         add: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                         norm: Optional[Norm] = None,
                         backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Depthwise k×k conv (stride 1, zero padding k//2) with its neighbours fused in (module docstring).

    Args:
        x: ``(B, C, H, W)``, fp32/bf16/fp16, any strides.
        weight: ``(C, 1, k, k)``, k odd; or None: no conv, so that ``identity=True, add=a, norm=n`` is the
            residual add ``x + a`` fused with the LayerNorm that follows it. bias: ``(C,)`` or None.
        identity: add the input itself (``x + DWConv(x)`` in one pass; 1 added to the centre tap).
        add, gate: ``(B, C, H, W)`` tensors added to, then multiplied with, the result.
        norm: ``(weight, bias, eps)`` of a LayerNorm over channels: also return the normalised result.
        backend: ``"torch"`` (reference, differentiable), ``"triton"`` (forward only) or ``"auto"``
            (Triton for CUDA tensors when autograd records nothing, else the reference; also the reference
            under fake tensors or the FLOP counter).
    Returns:
        ``(B, C, H, W)`` channels_last (Triton) in the autocast dtype, or ``x.dtype`` without autocast;
        with ``norm`` a pair ``(y, LayerNorm(y))``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(x, weight, bias, add, gate, norm)
    grad = records_grad(x, weight, bias, add, gate, *(norm[:2] if norm is not None else ()))
    if backend == "auto":
        backend = "triton" if x.is_cuda and not grad and not under_dispatch_mode() and triton_available(x) else "torch"
    if backend == "torch":
        return fused_depthwise_conv_torch(x, weight, bias, identity=identity, add=add, gate=gate, norm=norm)
    if grad:
        raise ValueError("the Triton depthwise-conv path is forward only: call it under torch.no_grad() or "
                         "torch.inference_mode(), or use backend='torch'")
    from .depthwise_triton import depthwise_conv_triton

    return depthwise_conv_triton(x, weight, bias, identity=identity, add=add, gate=gate, norm=norm,
                                 out_dtype=output_dtype(x))
