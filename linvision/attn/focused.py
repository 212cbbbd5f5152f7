"""FLatten: Focused Linear Attention (LeapLabTHU/FLatten-Transformer ``FocusedLinearAttention``).

With ``s = softplus(θ)`` (per channel, learnable, θ zero-initialised) and focusing power ``p`` (default 3), for T ∈ {Q, K + P}::

    U    = (ReLU(T) + 1e-6) / s
    φ(T) = ‖U‖ · U^p / ‖U^p‖            norms over ALL C channels of a token (all heads jointly)
    Y_i  = φq_i · M / (φq_i · k̄ + 1e-6),   M = (1/N) Σ_j φk_jᵀ v_j,  k̄ = (1/N) Σ_j φk_j
    out  = Y + DWC(V)                     one 5×5 depthwise conv on raw V, shared by all heads

i.e. the core's ``division`` normalisation with ``scale = 1`` on features computed here. The
positional encoding ``P`` goes on K only, before the ReLU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import compute_dtype, linear_attention
from .grid import GridSize, as_grid, check_mixer_inputs, conv_over_tokens, resize_token_table
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["FocusedLinearAttention", "focused_feature_map"]

def focused_feature_map(x: Tensor, scale: Tensor, focusing_power: float) -> Tensor:
    """FLatten's focused kernel ``φ(x) = ‖U‖·U^p/‖U^p‖`` with ``U = (ReLU(x) + 1e-6)/scale``.

    Args:
        x: ``(B, heads, N, d)``, any float dtype.
        scale: ``(1, heads, 1, d)`` positive per-channel scale (``softplus(θ)``).
        focusing_power: ``p`` (> 0).
    Returns:
        ``(B, heads, N, d)`` float32 (float64 if ``x`` is float64).

    The norms run over dims (heads, d), i.e. over all C channels of a token jointly (FLatten issue #30).
    ``U`` is divided by its per-token max before powering: φ is exactly invariant to that (the official
    2023 code does it for p > 6), and it keeps ``U^p`` and its norm inside the fp32 range.
    """
    dtype = compute_dtype(x)
    u = (F.relu(x.to(dtype)) + 1e-6) / scale.to(dtype)
    peak = u.amax(dim=(1, 3), keepdim=True)                           # > 0 since u >= 1e-6 / scale
    u = u / peak
    powered = u ** focusing_power
    u_norm = torch.linalg.vector_norm(u, dim=(1, 3), keepdim=True)
    p_norm = torch.linalg.vector_norm(powered, dim=(1, 3), keepdim=True)
    return powered * (peak * u_norm / p_norm)


class FocusedLinearAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)`` (dtype of ``v``).

    Args:
        dim, num_heads: channels C and heads h of the attention (d = C/h).
        focusing_power: p of the focusing function (official ``focusing_factor`` = 3).
        kernel_size: kernel of the rank-restoration depthwise conv on V (official 5).
        positional_encoding_size: the learnable K positional encoding ``P`` (official
            ``positional_encoding``, shape ``(1, h·w, C)``, zero-init), or ``None`` for none.
            Official models pass their fixed stage/window grid (e.g. 56 for Swin stage 1 at 224).
            At a different runtime grid the table is resized bicubically as an ``h×w`` image, as the
            official 384 fine-tune loader does. Default ``None``: the LinViT host accepts
            any resolution and has its own CPE/LePE.
        normalizer_form: ``"mean"`` — the 2024 HEAD code, ``Y = φq·M/(φq·k̄ + eps)`` with means
            (fp16/AMP-safe; default); ``"sum"`` — the 2023 training-time code,
            ``Y = φq·Σφkᵀv/(φq·Σφk + eps)``. They differ only in where eps sits.
        eps: the denominator epsilon (official 1e-6).
    Parameters: ``scale`` ``(1, 1, C)`` (θ), ``positional_encoding`` ``(1, h·w, C)`` or None,
    ``dwc`` Conv2d(d, d, k, groups=d) with bias — the official names and shapes.
    """

    uses_rope = False

    def __init__(self, dim: int, num_heads: int, *, focusing_power: float = 3.0, kernel_size: int = 5,
                 positional_encoding_size: Optional[GridSize] = None, normalizer_form: str = "mean",
                 eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if focusing_power <= 0:
            raise ValueError(f"focusing_power must be > 0, got {focusing_power}")
        if normalizer_form not in ("mean", "sum"):
            raise ValueError(f"normalizer_form must be 'mean' or 'sum', got {normalizer_form!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.focusing_power = focusing_power
        self.normalizer_form = normalizer_form
        self.eps = eps
        self.backend = backend
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        if positional_encoding_size is None:
            self.positional_encoding_grid = None
            self.register_parameter("positional_encoding", None)
        else:
            self.positional_encoding_grid = as_grid(positional_encoding_size)
            n = self.positional_encoding_grid[0] * self.positional_encoding_grid[1]
            self.positional_encoding = nn.Parameter(torch.zeros(1, n, dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)

    def _heads(self, t: Tensor) -> Tensor:
        """``(1, n, C)`` → ``(1, heads, n, d)`` (channel = head·d + c)."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def key_positional_encoding(self, hw: Tuple[int, int]) -> Optional[Tensor]:
        """``P`` for a ``H×W`` grid as ``(1, heads, H·W, d)`` float32, or ``None``."""
        if self.positional_encoding is None:
            return None
        gh, gw = self.positional_encoding_grid
        table = self.positional_encoding.transpose(1, 2).reshape(1, self.dim, gh, gw)
        table = resize_token_table(table, hw).reshape(1, self.dim, hw[0] * hw[1]).transpose(1, 2)
        return self._heads(table)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        """``q, k, v``: raw ``(B, heads, H·W, d)`` projections; ``rope`` and ``token_mean`` are ignored."""
        check_mixer_inputs(q, k, v, num_heads=self.num_heads, head_dim=self.head_dim, hw=hw)
        n = q.shape[2]
        # Cubing after ÷softplus overflows fp16: the focusing runs in fp32 outside autocast.
        with torch.autocast(device_type=q.device.type, enabled=False):
            pe = self.key_positional_encoding(hw)
            k_in = k if pe is None else k.to(compute_dtype(k)) + pe.to(compute_dtype(k))
            scale = self._heads(F.softplus(self.scale))
            q_phi = focused_feature_map(q, scale, self.focusing_power)
            k_phi = focused_feature_map(k_in, scale, self.focusing_power)
        eps = self.eps if self.normalizer_form == "mean" else self.eps / n
        out = linear_attention(q_phi, k_phi, v, normalization="division", feature_map="identity", scale=1.0,
                               eps=eps, backend=self.backend)
        return out + conv_over_tokens(self.dwc, v, hw).to(out.dtype)
