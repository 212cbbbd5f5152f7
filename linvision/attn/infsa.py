"""Infinite self-attention: pure InfSA and Linear-InfSA (giorgioroffo/infinite-self-attention).

With ``q' = q/√d``, ``k' = k/√d`` and the discount ``ρ = sigmoid(rho_logit)``:

* pure (O(N²·d), short sequences only)::

      S = ReLU(q' k'ᵀ)           (logits are q·k/d, not /√d)
      Â = ρ · S / (‖S‖_F + 1e-6)  (Frobenius norm of each (b, head) N×N slice; no row normalisation)
      out = Â v

* linear (O(N·d))::

      α_i = ‖q'_i‖ / (Σ_t ‖q'_t‖ + 1e-6),   q̄ = Σ_i α_i q'_i          (norm-weighted pooled query)
      a_j = ReLU(q̄ · k'_j)
      g   = ρ · Σ_j a_j v_j / (Σ_j a_j + 1e-6)
      out_i = g   for EVERY token i

  Linear-InfSA therefore gives every token of a (sample, head) the same mixed vector, as the
  released code does: token-specific information flows only through the host's
  residual and MLP. The pooling ``g`` is the core's ``division`` form with constant features
  (φ ≡ 1) and per-key weights ``a_j``, with ``eps = 1e-6/N`` (the core averages; the official code sums).

Unlike the released module, whose ``sigmoid(rho_logit).item()`` cuts the gradient so ρ never
trains, ρ here is a tensor in the graph and receives a gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import compute_dtype, linear_attention
from .grid import check_mixer_inputs
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["InfiniteSelfAttention", "INFSA_FORMS"]

INFSA_FORMS = ("linear", "pure")


class InfiniteSelfAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)`` (dtype of ``v``).

    Args:
        dim, num_heads: channels C and heads h (d = C/h).
        form: ``"linear"`` (Linear-InfSA, O(N·d); default, the one for backbones) or ``"pure"``
            (explicit N×N operator; quadratic memory, for short sequences).
        rho_init: initial discount ρ ∈ (0, 1) (official default 0.95).
        rho_trainable: whether ρ is learned (the official README's intent; default True).
        eps: the official 1e-6 of every normalisation.
        num_prefix_tokens: tokens (e.g. a ViT's cls) in front of the ``H×W`` patch tokens. InfSA
            treats every token alike, so this only sets the expected ``N = prefix + H·W``.
    Parameter: ``rho_logit`` (scalar), the official name.
    """

    uses_rope = False

    def __init__(self, dim: int, num_heads: int, *, form: str = "linear", rho_init: float = 0.95,
                 rho_trainable: bool = True, eps: float = 1e-6, num_prefix_tokens: int = 0, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if form not in INFSA_FORMS:
            raise ValueError(f"form must be one of {INFSA_FORMS}, got {form!r}")
        if not 0.0 < rho_init < 1.0:
            raise ValueError(f"rho_init must lie in (0, 1), got {rho_init}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.form = form
        self.eps = eps
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        self.rho_logit = nn.Parameter(torch.tensor(math.log(rho_init / (1.0 - rho_init))),
                                      requires_grad=rho_trainable)

    @property
    def rho(self) -> Tensor:
        """ρ = sigmoid(rho_logit), a 0-d tensor that stays in the autograd graph."""
        return torch.sigmoid(self.rho_logit)

    def pure_operator(self, q: Tensor, k: Tensor) -> Tensor:
        """Â = ρ·ReLU(q'k'ᵀ)/(‖·‖_F + eps): ``(B, heads, N, N)`` float32 (float64 for float64 input)."""
        dt = compute_dtype(q)
        s = F.relu(q.to(dt) @ k.to(dt).transpose(-1, -2) / self.head_dim)
        frob = torch.linalg.vector_norm(s, dim=(-2, -1), keepdim=True)
        return self.rho.to(dt) * s / (frob + self.eps)

    def key_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Linear-InfSA's unnormalised key scores ``a_j = ReLU(q̄·k'_j)``: ``(B, heads, N)`` float32/64."""
        dt = compute_dtype(q)
        s = self.head_dim ** -0.5
        qs, ks = q.to(dt) * s, k.to(dt) * s
        energy = torch.linalg.vector_norm(qs, dim=-1)                                   # (B, h, N)
        alpha = energy / (energy.sum(dim=-1, keepdim=True) + self.eps)
        q_bar = (alpha.unsqueeze(-1) * qs).sum(dim=2, keepdim=True)                     # (B, h, 1, d)
        return F.relu((q_bar * ks).sum(-1))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        """``q, k, v``: raw ``(B, heads, N, d)`` projections with ``N = num_prefix_tokens + H·W``. The
        official module accepts masks and ignores them (bidirectional); there is none here. ``rope``
        and ``token_mean`` are ignored."""
        check_mixer_inputs(q, k, v, num_heads=self.num_heads, head_dim=self.head_dim, hw=hw,
                           num_prefix_tokens=self.num_prefix_tokens)
        with torch.autocast(device_type=q.device.type, enabled=False):
            if self.form == "pure":
                attn = self.pure_operator(q, k)
                return (attn @ v.to(attn.dtype)).to(v.dtype)
            scores = self.key_scores(q, k)
            b, h, n, _ = q.shape
            ones = torch.ones(1, 1, 1, 1, dtype=scores.dtype, device=q.device).expand(b, h, n, 1)
            pooled = linear_attention(ones, ones, v, normalization="division", feature_map="identity", scale=1.0,
                                      eps=self.eps / n, key_weights=scores, backend=self.backend)
            return (pooled.to(scores.dtype) * self.rho.to(scores.dtype)).to(v.dtype)
