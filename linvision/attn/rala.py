"""RALA: Rank-Augmented Linear Attention (RAVLT, qhfan/RALA ``GateLinearAttentionNoSilu``).

With φ = ELU+1 and s = head_dim^-½, a global query reweights the keys (KV-buffer rank augmentation)::

    α_j   = softmax_j( s · mean_i φ(q_i) · φ(k_j) )
    out_i = Σ_j α_j (Rφq_i · Rφk_j) v_j / (Σ_j α_j φq_i · φk_j + 1e-6)

i.e. the core's ``division`` normalisation with per-key weights ``w_j = N·α_j`` and ``scale = 1``.
The output-feature rank augmentation (the ``(U + LePE) ⊙ O`` gate) lives in the host block.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .core import compute_dtype, feature_map_fn, linear_attention
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["RankAugmentedLinearAttention", "global_query_key_weights"]


def global_query_key_weights(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """RALA's key weights ``N · softmax_j(s · mean_i φ(q_i) · φ(k_j))``, ``(B, H, N)``, fp32 (fp64 for fp64).

    ``q, k``: raw ``(B, H, N, d)`` projections (φ = ELU+1 is applied here, in fp32).
    """
    n = q.shape[2]
    acc = compute_dtype(q)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_mean = feature_map_fn("elu1", q.to(acc)).mean(dim=2, keepdim=True)            # (B, H, 1, d)
        logits = (q_mean * scale) @ feature_map_fn("elu1", k.to(acc)).transpose(-1, -2)  # (B, H, 1, N)
        return logits.softmax(dim=-1).squeeze(2) * n


class RankAugmentedLinearAttention(TokenMixer):
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
        weights = global_query_key_weights(q, k, self.scale)
        return linear_attention(q, k, v, normalization="division", feature_map="elu1", scale=1.0, eps=self.eps,
                                key_weights=weights, rope=rope, backend=self.backend)
