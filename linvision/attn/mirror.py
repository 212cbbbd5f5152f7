"""MirrorLA: learnable Householder reflections before a ReLU feature map (arXiv 2602.04346).

**No official code, checkpoints or method text exist**:
the abstract only states "block-wise isometries → variance-aware (angle) modulation → cross-head
reflections" applied before a non-negative map. Everything concrete below is this module's
reconstruction; each choice is a constructor argument.

The same orthogonal map ``T`` is applied to q and k of a sample, so ``Σ_h ⟨Tq, Tk⟩ = Σ_h ⟨q, k⟩``
before the non-negativity; then ``φ = ReLU`` and the core's ``division`` normalisation::

    out_i = φ(Tq_i) · (1/N) Σ_j φ(Tk_j) v_jᵀ / (φ(Tq_i) · (1/N) Σ_j φ(Tk_j) + eps)

``T`` is a product of Householder reflections ``H(u) = I − 2uuᵀ/‖u‖²`` (each orthogonal and
symmetric, ``H² = I``; applied in O(m) per token):

* block-wise: each head's d channels are split into blocks of ``block_size``; block (head, j) is
  rotated by the product of two reflections ``H(t) H(â + t)``, which maps a learnable unit direction
  ``â`` exactly onto ``t = normalize((1 − λ)·â + λ·𝟙/√b)`` and acts only in span(â, 𝟙): it turns
  ``â`` a fraction λ of the way towards the positive diagonal ("into the non-negative orthant").
  λ = 0 is the identity; λ = 1 is the full data-aligned rotation. (Two reflections,
  not one: a single reflection has det −1 and cannot approach the identity;
  a product of two reflections is a rotation.)
* variance-aware angle modulation: ``λ = sigmoid(γ · log(σ² + 1e-6) + β)`` per sample and block,
  with σ² the token variance of q and k in that block (pooled, so q and k share ``T``), γ and β
  learnable per (head, block). With ``variance_modulation=False``, ``λ = sigmoid(β)``.
* cross-head: ``cross_head_reflections`` learnable reflections of the full C-vector (all heads).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .core import compute_dtype, linear_attention
from .grid import check_mixer_inputs, conv_over_tokens
from .mixer import TokenMixer
from .rope import RopeGrid

__all__ = ["MirrorLinearAttention", "householder"]


def householder(x: Tensor, u: Tensor) -> Tensor:
    """Reflect ``x`` across the hyperplane orthogonal to ``u`` along the last dim.

    ``H(u) x = x − 2 (u·x / u·u) u``; ``u`` broadcasts against ``x``; ``u = 0`` gives the identity.
    Exactly orthogonal and involutive (``‖Hx‖ = ‖x‖``, ``H(Hx) = x``) up to rounding.
    """
    uu = (u * u).sum(-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    return x - (2.0 * (x * u).sum(-1, keepdim=True) / uu) * u


class MirrorLinearAttention(TokenMixer):
    """Token mixer: ``(B, heads, N, d)`` q, k, v → ``(B, heads, N, d)`` (dtype of ``v``).

    Args (all reconstructed design choices):
        dim, num_heads: channels C and heads h (d = C/h).
        block_size: size of the block-wise isometries; ``None`` = d (one block per head).
        variance_modulation: make the block rotation angle λ depend on the token variance.
        cross_head_reflections: number of full-width (cross-head) reflections; 0 disables them.
        cross_head_position: ``"last"`` (the abstract's order: blocks, modulation, cross-head;
            default) or ``"first"`` (the reverse order: cross-head first).
        value_conv_kernel_size: optional depthwise conv on V shared by heads (as in the group's
            PolaFormer), added to the output; ``None`` (default) — the LinViT host has LePE.
        eps: denominator epsilon of the division normalisation.
    Not implemented: the speculative auxiliary "Householder loss".
    """

    uses_rope = False

    def __init__(self, dim: int, num_heads: int, *, block_size: Optional[int] = None,
                 variance_modulation: bool = True, cross_head_reflections: int = 1,
                 cross_head_position: str = "last", value_conv_kernel_size: Optional[int] = None,
                 eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        head_dim = dim // num_heads
        block_size = head_dim if block_size is None else block_size
        if block_size < 1 or head_dim % block_size:
            raise ValueError(f"block_size ({block_size}) must divide head_dim ({head_dim})")
        if cross_head_position not in ("first", "last"):
            raise ValueError(f"cross_head_position must be 'first' or 'last', got {cross_head_position!r}")
        if cross_head_reflections < 0:
            raise ValueError(f"cross_head_reflections must be >= 0, got {cross_head_reflections}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.block_size, self.num_blocks = block_size, head_dim // block_size
        self.cross_head_position = cross_head_position
        self.eps = eps
        self.backend = backend
        self.block_direction = nn.Parameter(torch.randn(num_heads, self.num_blocks, block_size) * block_size ** -0.5)
        self.angle_bias = nn.Parameter(torch.zeros(num_heads, self.num_blocks))
        if variance_modulation:
            self.angle_gain = nn.Parameter(torch.zeros(num_heads, self.num_blocks))
        else:
            self.register_parameter("angle_gain", None)
        self.cross_head_direction = nn.Parameter(torch.randn(cross_head_reflections, dim) * dim ** -0.5)
        if value_conv_kernel_size is None:
            self.dwc = None
        else:
            self.dwc = nn.Conv2d(head_dim, head_dim, value_conv_kernel_size, padding=value_conv_kernel_size // 2,
                                 groups=head_dim)

    def block_reflection_vectors(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """The two reflection vectors ``(â + t(λ), t(λ))`` of every block, applied in that order.

        ``q, k``: ``(B, heads, N, d)`` float32/64 — the features about to be block-reflected.
        Returns two ``(B, heads, num_blocks, block_size)`` tensors.
        """
        b, h, n, _ = q.shape
        nb, bs = self.num_blocks, self.block_size
        src = nn.functional.normalize(self.block_direction.to(q.dtype), dim=-1)           # â: (h, nb, bs)
        diag = torch.full((bs,), bs ** -0.5, dtype=q.dtype, device=q.device)
        logit = self.angle_bias.to(q.dtype).expand(b, h, nb)
        if self.angle_gain is not None:
            var = 0.5 * (q.reshape(b, h, n, nb, bs).var(dim=2, unbiased=False)
                         + k.reshape(b, h, n, nb, bs).var(dim=2, unbiased=False)).mean(-1)   # (B, h, nb)
            logit = logit + self.angle_gain.to(q.dtype) * torch.log(var + 1e-6)
        lam = torch.sigmoid(logit).unsqueeze(-1)
        target = nn.functional.normalize((1.0 - lam) * src + lam * diag, dim=-1)
        return src + target, target

    def block_rotate(self, x: Tensor, vectors: Tuple[Tensor, Tensor]) -> Tensor:
        """Apply the block rotations ``H(t) H(â + t)`` to ``(B, heads, N, d)``."""
        b, h, n, d = x.shape
        y = x.reshape(b, h, n, self.num_blocks, self.block_size)
        for u in vectors:
            y = householder(y, u.unsqueeze(2))
        return y.reshape(b, h, n, d)

    def cross_head(self, x: Tensor) -> Tensor:
        """Apply the cross-head reflections to ``(B, heads, N, d)`` viewed as C-vectors per token."""
        if self.cross_head_direction.shape[0] == 0:
            return x
        b, h, n, d = x.shape
        y = x.transpose(1, 2).reshape(b, n, h * d)
        for u in self.cross_head_direction.to(x.dtype):
            y = householder(y, u)
        return y.reshape(b, n, h, d).transpose(1, 2)

    def reflect(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """``T q, T k`` (same ``T`` for both), float32 (float64 for float64 input), ``(B, heads, N, d)``."""
        dt = compute_dtype(q)
        q, k = q.to(dt), k.to(dt)
        if self.cross_head_position == "first":
            q, k = self.cross_head(q), self.cross_head(k)
        vectors = self.block_reflection_vectors(q, k)
        q, k = self.block_rotate(q, vectors), self.block_rotate(k, vectors)
        if self.cross_head_position == "last":
            q, k = self.cross_head(q), self.cross_head(k)
        return q, k

    def reflection_vectors(self, q: Tensor, k: Tensor) -> List[Tensor]:
        """Every reflection vector ``u`` that :meth:`reflect` applies (for inspection and tests):
        the two block ones ``(B, heads, num_blocks, block_size)`` then each cross-head one ``(C,)``."""
        dt = compute_dtype(q)
        q, k = q.to(dt), k.to(dt)
        if self.cross_head_position == "first":
            q, k = self.cross_head(q), self.cross_head(k)
        return list(self.block_reflection_vectors(q, k)) + list(self.cross_head_direction.to(dt))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, hw: Tuple[int, int],
                rope: Optional[RopeGrid] = None, token_mean: Optional[Tensor] = None) -> Tensor:
        """``q, k, v``: raw ``(B, heads, H·W, d)`` projections; ``rope`` and ``token_mean`` are ignored."""
        check_mixer_inputs(q, k, v, num_heads=self.num_heads, head_dim=self.head_dim, hw=hw)
        # Norms, variances and reflections in fp32, outside autocast.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q_ref, k_ref = self.reflect(q, k)
        out = linear_attention(q_ref, k_ref, v, normalization="division", feature_map="relu", scale=1.0,
                               eps=self.eps, backend=self.backend)
        if self.dwc is not None:
            out = out + conv_over_tokens(self.dwc, v, hw).to(out.dtype)
        return out
