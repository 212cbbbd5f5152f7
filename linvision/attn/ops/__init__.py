"""Triton kernels of the linear-attention core (fla-style: kernels beside their reference).

``linear_attention_triton`` is the ``backend="triton"`` path of
:func:`linvision.attn.linear_attention`; ``linear_attention_fwd``/``linear_attention_bwd`` are the
raw two-pass forward and backward (no autograd). Importing this package imports Triton: set
``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors.
"""
from .linear_attn import linear_attention_triton, supports
from .linear_attn_bwd import linear_attention_bwd
from .linear_attn_fwd import linear_attention_fwd

__all__ = ["linear_attention_triton", "linear_attention_fwd", "linear_attention_bwd", "supports"]
