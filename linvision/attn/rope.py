"""2-D axial rotary position embedding (RoPE) as used by MAViT and RAVLT.

As in the official MAViT/RAVLT code. For head dim ``d`` (divisible by 4):

* ``θ_p = 1 / 10000 ** linspace(0, 1, d/4)`` (both ends included, *not* the usual ``p/n``);
* the ``angle`` buffer is θ with every entry repeated twice: ``[θ0, θ0, θ1, θ1, ...]`` (``d/2``);
* token ``(y, x)`` (row-major, ``t = y*W + x``) gets angle ``y*angle[c]`` on channels ``c < d/2`` and
  ``x*angle[c - d/2]`` on the rest;
* adjacent channel pairs ``(2m, 2m+1)`` are rotated together by that angle.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor, nn

__all__ = ["RopeGrid", "Rope2d", "rope_angle", "rope_tables", "apply_rope"]


def rope_angle(head_dim: int) -> Tensor:
    """The ``angle`` buffer, shape ``(head_dim // 2,)``, float32."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    theta = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
    return theta.unsqueeze(-1).repeat(1, 2).flatten()


class RopeGrid(NamedTuple):
    """What the attention core needs to rotate features: the angle buffer and the token grid.

    ``angle``: ``(d/2,)`` float32; ``height * width`` must equal the number of tokens N.
    """

    angle: Tensor
    height: int
    width: int

    def tables(self) -> Tuple[Tensor, Tensor]:
        return rope_tables(self.angle, self.height, self.width)


def rope_tables(angle: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """``(sin, cos)`` tables of shape ``(H*W, d)``, float32, in row-major token order.

    Computed as the official code does (fp32 outer product of integer positions with ``angle``,
    then sin/cos), so the tables are bit-identical to the official ones.
    """
    angle = angle.float()
    rows = torch.arange(height, device=angle.device, dtype=torch.float32)
    cols = torch.arange(width, device=angle.device, dtype=torch.float32)
    a_rows = (rows[:, None] * angle[None, :])[:, None, :].expand(height, width, -1)
    a_cols = (cols[:, None] * angle[None, :])[None, :, :].expand(height, width, -1)
    a = torch.cat([a_rows, a_cols], dim=-1).reshape(height * width, -1)
    return torch.sin(a), torch.cos(a)


def _rotate_every_two(x: Tensor) -> Tensor:
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (``(..., N, d)``) by the tabulated angles (``(N, d)``)."""
    return x * cos + _rotate_every_two(x) * sin


class Rope2d(nn.Module):
    """Holds the persistent ``angle`` buffer (checkpoint key ``...RoPE.angle``) of one stage."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("angle", rope_angle(head_dim), persistent=True)

    def forward(self, height: int, width: int) -> RopeGrid:
        return RopeGrid(self.angle, height, width)
