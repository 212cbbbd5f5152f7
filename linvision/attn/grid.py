"""Token-grid helpers shared by the mechanism modules (mixer-interface checks, convs over tokens)."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GridSize", "check_mixer_inputs", "conv_over_tokens", "as_grid", "resize_token_table"]

GridSize = Union[int, Tuple[int, int]]


def check_mixer_inputs(q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, head_dim: int, hw: Sequence[int],
                       num_prefix_tokens: int = 0) -> None:
    """Shape checks of the mixer interface; raise ``ValueError`` naming the expected shape.

    ``q, k, v`` must be ``(B, num_heads, N, head_dim)`` with ``N = num_prefix_tokens + H·W``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, N, head_dim), got shape {tuple(t.shape)}")
    if q.shape != k.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape (B, heads, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    expected = f"(B, {num_heads}, N, {head_dim})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[1] != num_heads or t.shape[3] != head_dim:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if len(hw) != 2 or hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"hw must be a pair (H, W) of positive ints, got {hw!r}")
    if num_prefix_tokens + hw[0] * hw[1] != q.shape[2]:
        raise ValueError(f"N = {q.shape[2]} tokens does not match {num_prefix_tokens} prefix tokens + "
                         f"H*W = {hw[0]}*{hw[1]}")


def conv_over_tokens(conv: nn.Module, x: Tensor, hw: Tuple[int, int]) -> Tensor:
    """Apply a 2-D ``conv`` with ``d`` in/out channels to each head's tokens as an image.

    ``x``: ``(B, heads, H·W, d)`` (row-major tokens) → ``(B, heads, H·W, d)``. The conv is shared by
    all heads (it sees a batch of ``B·heads`` images of ``d`` channels).
    """
    b, h, n, d = x.shape
    img = x.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, hw[0], hw[1])
    return conv(img).reshape(b, h, d, n).transpose(2, 3)


def as_grid(size: GridSize) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_token_table(table: Tensor, hw: Tuple[int, int]) -> Tensor:
    """Bicubically resize an image-shaped table ``(1, C, h, w)`` to ``(1, C, H, W)`` (identity if equal)."""
    if tuple(table.shape[-2:]) == tuple(hw):
        return table
    return F.interpolate(table, size=tuple(hw), mode="bicubic", align_corners=False)
