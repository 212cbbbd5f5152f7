"""Quadratic reference for :func:`linvision.attn.linear_attention` (tests only).

Builds the explicit ``(B, H, N, N)`` attention-weight matrix ``A`` of each normalisation and
returns ``A @ v``; it computes in the dtype of its inputs (use float64 for exactness checks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .core import feature_map_fn
from .rope import RopeGrid, apply_rope

__all__ = ["attention_weights", "quadratic_attention"]


def attention_weights(q: Tensor, k: Tensor, *, normalization: str = "division", feature_map: str = "identity",
                      scale: float = 1.0, eps: float = 1e-6, key_weights: Optional[Tensor] = None,
                      rope: Optional[RopeGrid] = None) -> Tensor:
    """Explicit weights ``A`` (``(B, H, N, N)``) with ``out = A @ v``, except for ``magnitude_aware``
    and ``injective`` whose ``v̄`` term is folded in as ``γ_i / N`` per entry."""
    n = q.shape[2]
    qf, kf = feature_map_fn(feature_map, q), feature_map_fn(feature_map, k)
    w = torch.ones(kf.shape[:3], dtype=kf.dtype, device=kf.device) if key_weights is None else key_weights
    plain = qf @ kf.transpose(-1, -2)                                     # φq_i · φk_j
    if rope is not None:
        sin, cos = (t.to(qf.dtype) for t in rope.tables())
        rotated = apply_rope(qf, sin, cos) @ apply_rope(kf, sin, cos).transpose(-1, -2)
    else:
        rotated = plain
    kernel = rotated * w.unsqueeze(-2) * (scale / n)                    # (c/N) w_j Rφq_i·Rφk_j
    z = (plain * w.unsqueeze(-2)).sum(-1, keepdim=True) * (scale / n)  # (B, H, N, 1)
    if normalization == "division":
        return kernel / (z + eps)
    if normalization == "magnitude_aware":
        return kernel * (1 + 1 / (z + eps)) - z / n
    if normalization == "injective":
        return kernel + (1 - z) / n
    if normalization == "none":
        return kernel
    raise ValueError(f"unknown normalization {normalization!r}")


def quadratic_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``attention_weights(q, k, **kwargs) @ v``."""
    return attention_weights(q, k, **kwargs) @ v
