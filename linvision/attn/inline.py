"""InLine: Injective Linear Attention (LeapLabTHU/InLine ``InLineAttention``).

On raw q, k (no kernel function, no positional encoding, no epsilon, as in the official code) with ``α = d^-½``::

    w_ij  = (s_ij − mean_t s_it)/N + 1/N,   s_ij = α q_i·k_j     (rows sum to 1, entries may be < 0)
    Y_i   = Σ_j w_ij v_j = (α/N) Σ_j (q_i·k_j) v_j + (1 − α q_i·k̄) v̄

i.e. the core's ``injective`` normalisation with ``scale = α``. The local term adds a per-sample
3×3 depthwise conv of V whose kernels are predicted, per image and channel, from the token mean
through a grouped (by head) 1×1 Conv1d MLP (``residual``: C→C, GELU, C→9C).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import linear_attention
from .grid import check_mixer_inputs
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["InjectiveLinearAttention"]


class InjectiveLinearAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)`` (dtype of ``v``).

    Args:
        dim, num_heads: channels C and heads h of the attention (d = C/h).
        num_prefix_tokens: tokens (e.g. DeiT's cls) in front of the ``H×W`` patch tokens. They take
            part in the attention and in the token mean, but are excluded from the local conv and
            receive no local term. Default 0 (hierarchical hosts).
        local_kernel_size: kernel of the dynamic depthwise conv (official 3).
        local_residual: add the dynamic local term (official: always). ``False`` leaves the pure
            injective attention (ablations, tests).
    Parameters: ``residual`` = Sequential(Conv1d(C, C, 1, groups=h), GELU, Conv1d(C, k²·C, 1, groups=h)),
    the official names and shapes.
    """

    uses_rope = False

    def __init__(self, dim: int, num_heads: int, *, num_prefix_tokens: int = 0, local_kernel_size: int = 3,
                 local_residual: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.local_kernel_size = local_kernel_size
        self.backend = backend
        if local_residual:
            self.residual = nn.Sequential(
                nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads),
                nn.GELU(),
                nn.Conv1d(dim, dim * local_kernel_size ** 2, kernel_size=1, groups=num_heads),
            )
        else:
            self.residual = None

    def local_term(self, v: Tensor, token_mean: Tensor, hw: Tuple[int, int]) -> Tensor:
        """Dynamic depthwise conv of the patch tokens of ``v``.

        ``v``: ``(B, heads, P + H·W, d)``; ``token_mean``: ``(B, C)``. Returns ``(B, heads, H·W, d)``.
        Channel ``c = head·d + i`` of sample ``b`` is convolved (zero padding, no bias) with the
        ``k×k`` kernel in outputs ``[k²c, k²c + k²)`` of the MLP, in row-major order.
        """
        b, h, _, d = v.shape
        c, ks = self.dim, self.local_kernel_size
        kernels = self.residual(token_mean.unsqueeze(-1)).reshape(b * c, 1, ks, ks)
        patches = v[:, :, self.num_prefix_tokens:]                                  # (B, h, HW, d)
        img = patches.transpose(2, 3).reshape(1, b * c, hw[0], hw[1])
        out = F.conv2d(img, kernels.to(img.dtype), None, padding=ks // 2, groups=b * c)
        return out.reshape(b, h, d, hw[0] * hw[1]).transpose(2, 3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int], rope: Optional[RopeGrid] = None,
                token_mean: Optional[Tensor] = None) -> Tensor:
        """``q, k, v``: raw ``(B, heads, P + H·W, d)`` projections (``P = num_prefix_tokens``).

        ``token_mean``: ``(B, C)``, the mean over all N tokens (prefix included) of the attention
        input X from which the official code predicts the local kernels (post-norm1 X; CSWin: the
        pre-norm block input). Hosts that load official weights must pass it. When it is
        ``None`` the mean of ``v`` over all tokens is used instead — an affine image of mean(X), the
        choice for hosts such as LinViT that hand the mixer only its projections.
        ``rope`` is ignored (``uses_rope = False``).
        """
        check_mixer_inputs(q, k, v, num_heads=self.num_heads, head_dim=self.head_dim, hw=hw,
                           num_prefix_tokens=self.num_prefix_tokens)
        b, h, n, d = v.shape
        # No epsilon and no clamping: the weights may be negative.
        out = linear_attention(q, k, v, normalization="injective", feature_map="identity", scale=self.scale,
                               backend=self.backend)
        if self.residual is None:
            return out
        if token_mean is None:
            token_mean = v.mean(dim=2).reshape(b, h * d)
        elif token_mean.shape != (b, self.dim):
            raise ValueError(f"token_mean must have shape (B, C) = ({b}, {self.dim}), got {tuple(token_mean.shape)}")
        local = self.local_term(v, token_mean, hw).to(out.dtype)
        p = self.num_prefix_tokens
        if p == 0:
            return out + local
        return torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2)
