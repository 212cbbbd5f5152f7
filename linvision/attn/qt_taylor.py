"""QT-ViT: linear attention with the quadratic Taylor kernel (AMD_QTViT ``LiteMLA.relu_linear_att``).

The released kernel is not the full second-order expansion but its diagonal ("compact") part plus a learnable constant ``s`` (init 1)::

    x̂ = x/(‖x‖ + ε),  x̃ = x̂ ⊙ x̂,  x̄ = x̃/(‖x̃‖ + ε),  φ(x) = [x̄ ; s] ∈ ℝ^{d+1}     (ε = 1e-15)
    κ(q, k) = φ(q)·φ(k) = Σ_i q_i² k_i² / (‖q²‖ ‖k²‖) + s²
    o_i = Σ_j κ(q_i, k_j) v_j / (Σ_j κ(q_i, k_j) + ε)  +  GELU(BN_d(v_i))

with a learnable positional encoding added to K only (before φ), the whole core in fp32, and the
value residual ``GELU(BN(V))`` — a BatchNorm over the d channels shared by every head, no conv.
The division is the core's ``division`` normalisation with ``eps = ε/N`` (the core averages over
tokens; the official code sums, so this is the same number).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .core import compute_dtype, linear_attention
from .grid import GridSize, as_grid, check_mixer_inputs, resize_token_table
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["QuadraticTaylorAttention", "quadratic_taylor_feature_map"]


def quadratic_taylor_feature_map(x: Tensor, constant: Tensor, eps: float = 1e-15) -> Tensor:
    """QT-ViT's feature map ``[x̄ ; s]`` (module docstring), in the official order and eps.

    ``x``: ``(B, heads, N, d)`` float32/float64; ``constant``: scalar tensor ``s``.
    Returns ``(B, heads, N, d + 1)`` in the dtype of ``x``. The first normalisation only guards
    against inf/NaN; ignoring ε it does not change the result (official code comment).
    """
    x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)
    x = x * x
    x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)
    return torch.cat([x, constant.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)


class QuadraticTaylorAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)`` (dtype of ``v``).

    In the official EfficientViT host the 1×1 and DW5×5-aggregated scales act as ``2h`` independent
    heads: build this mixer with ``dim = 2hd`` and ``num_heads = 2h`` there.

    Args:
        dim, num_heads: channels C and heads of the attention (d = C/heads).
        positional_encoding_size: the learnable K positional encoding ``(1, C, h, w)`` (official
            ``positional_encoding``, zero-init, size ``224/stride``), resized bicubically to the
            runtime grid when it differs (official behaviour), or ``None`` for none. Default
            ``None``: the LinViT host accepts any resolution and has its own CPE/LePE.
        value_residual: add ``GELU(BN_d(V))`` (official: always).
        eps: ε of the feature map and of the denominator (official 1e-15).
        norm_eps: ε of the value-residual BatchNorm (official: 1e-5, but 1e-7 in the L-series models,
            whose every norm layer gets that ε).
    Parameters: ``constant`` (official ``ones_scale1``, init 1), ``positional_encoding`` or None,
    ``bn`` (BatchNorm over d channels; same state-dict entries as the official ``BatchNorm2d(d)``).
    """

    uses_rope = False

    def __init__(self, dim: int, num_heads: int, *, positional_encoding_size: Optional[GridSize] = None,
                 value_residual: bool = True, eps: float = 1e-15, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.eps = eps
        self.backend = backend
        self.constant = nn.Parameter(torch.tensor(1.0))
        if positional_encoding_size is None:
            self.register_parameter("positional_encoding", None)
        else:
            self.positional_encoding = nn.Parameter(torch.zeros(1, dim, *as_grid(positional_encoding_size)))
        self.bn = nn.BatchNorm1d(self.head_dim, eps=norm_eps) if value_residual else None
        self.act = nn.GELU()

    def key_positional_encoding(self, hw: Tuple[int, int]) -> Optional[Tensor]:
        """``P`` for a ``H×W`` grid as ``(1, heads, H·W, d)``, or ``None``.

        Official layout: channel ``head·d + i``, tokens row-major (``reshape(1, h, d, HW).transpose``).
        """
        if self.positional_encoding is None:
            return None
        table = resize_token_table(self.positional_encoding, hw)
        return table.reshape(1, self.num_heads, self.head_dim, hw[0] * hw[1]).transpose(-1, -2)

    def value_residual(self, v: Tensor) -> Tensor:
        """``GELU(BN(v))`` per token: ``(B, heads, N, d)`` → same shape (BN stats over B·heads·N)."""
        b, h, n, d = v.shape
        y = self.bn(v.reshape(b * h, n, d).transpose(1, 2))
        return self.act(y).transpose(1, 2).reshape(b, h, n, d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        """``q, k, v``: raw ``(B, heads, H·W, d)`` projections; any grid shape (the official code
        assumes a square one). ``rope`` and ``token_mean`` are ignored."""
        check_mixer_inputs(q, k, v, num_heads=self.num_heads, head_dim=self.head_dim, hw=hw)
        n = q.shape[2]
        dt = compute_dtype(v)
        # The official attention core runs with autocast disabled, in fp32.
        with torch.autocast(device_type=q.device.type, enabled=False):
            pe = self.key_positional_encoding(hw)
            k_in = k.to(dt) if pe is None else k.to(dt) + pe.to(dt)
            q_phi = quadratic_taylor_feature_map(q.to(dt), self.constant, self.eps)
            k_phi = quadratic_taylor_feature_map(k_in, self.constant, self.eps)
            out = linear_attention(q_phi, k_phi, v.to(dt), normalization="division", feature_map="identity",
                                   scale=1.0, eps=self.eps / n, backend=self.backend)
            if self.bn is not None:
                out = out + self.value_residual(v.to(dt))
        return out.to(v.dtype)
