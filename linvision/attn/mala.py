"""MALA: Magnitude-Aware Linear Attention (MAViT, qhfan/MALA ``AddLinearAttention``).

With φ = ELU+1 and s = head_dim^-½::

    z_i   = s · φ(q_i) · mean_j φ(k_j)                       (un-rotated features)
    out_i = (s/N) Σ_j (Rφq_i · Rφk_j) v_j · (1 + 1/(z_i + 1e-6)) − z_i · mean_j v_j

i.e. the core's ``magnitude_aware`` normalisation with ``scale = s``; RoPE rotates the numerator only.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .core import linear_attention
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["MagnitudeAwareLinearAttention"]


class MagnitudeAwareLinearAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)``. No parameters."""

    uses_rope = True

    def __init__(self, dim: int, num_heads: int, *, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.eps = eps
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        return linear_attention(q, k, v, normalization="magnitude_aware", feature_map="elu1", scale=self.scale,
                                eps=self.eps, rope=rope, backend=self.backend)
