"""Softmax attention (SDPA) with 2-D RoPE, for the hybrid models' low-resolution stages.

``U = softmax_j((s·Rq_i)·Rk_j) v`` on the raw (not φ-mapped) q and k, with s = head_dim^-½; no mask, no dropout. Cost is quadratic in N.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from .mixer import TokenMixer
from .rope import RopeGrid, apply_rope

__all__ = ["SoftmaxAttention"]


class SoftmaxAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)``. No parameters."""

    uses_rope = True
    backend = "sdpa"    # no linear core: PyTorch's scaled_dot_product_attention picks its kernel

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        if rope is not None:
            sin, cos = (t.to(q.device) for t in rope.tables())
            q = apply_rope(q, sin, cos).to(v.dtype)
            k = apply_rope(k, sin, cos).to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
