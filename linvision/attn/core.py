"""The shared non-causal linear-attention core.

Every mechanism in ``linvision.attn`` reduces its token mixing to one call of
:func:`linear_attention`. For per-head inputs ``q, k`` of shape ``(B, H, N, d)`` and ``v`` of
shape ``(B, H, N, dv)``, with feature map ``φ``, optional per-key weights ``w_j`` (default 1),
optional rotation ``R`` (2-D RoPE, numerator only) and ``c = scale``::

    n_i  = (c/N) Σ_j w_j (R φ(q_i) · R φ(k_j)) v_j          numerator      (B, H, N, dv)
    z_i  = (c/N) Σ_j w_j (φ(q_i) · φ(k_j))                    normaliser     (B, H, N)
    v̄    = (1/N) Σ_j v_j                                                    (B, H, dv)

    division          out_i = n_i / (z_i + eps)                       focused, RALA, QT, Mirror
    magnitude_aware   out_i = n_i · (1 + 1/(z_i + eps)) − z_i · v̄     MALA
    injective         out_i = n_i + (1 − z_i) · v̄                     InLine
    none              out_i = n_i

It is evaluated linearly through the running sums ``S = (c/N) Σ_j w_j Rφ(k_j)ᵀ v_j`` (d×dv),
``k̄ = (1/N) Σ_j w_j φ(k_j)`` and ``v̄``, all accumulated in float32 whatever the input dtype (and
outside autocast); the output has the dtype of ``v``. The 1/N inside every sum keeps the state
O(1) in N, which is what keeps fp16/bf16 inputs from overflowing at large N.

This module validates and dispatches; the two paths live in :mod:`linvision.attn.ops`: the PyTorch
reference in ``ops.naive`` (``backend="torch"``, and the twin the kernels are tested against) and the
Triton kernels (``backend="triton"``), which share the option names and ids of ``ops.flags``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ops.flags import BACKENDS, FEATURE_MAPS, NORMALIZATIONS, under_dispatch_mode
from .ops.naive import compute_dtype, feature_map_fn, linear_attention_torch
from .rope import RopeGrid

__all__ = ["linear_attention", "NORMALIZATIONS", "FEATURE_MAPS", "BACKENDS", "feature_map_fn", "check_inputs",
           "compute_dtype", "linear_attention_torch"]


def check_inputs(q: Tensor, k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope: Optional[RopeGrid],
                 normalization: str, feature_map: str) -> None:
    """Validate shapes and options; raise ``ValueError`` naming what was expected."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, N, head_dim), got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, heads, N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, heads, N, dv) with (B, heads, N) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[2] < 1:
        raise ValueError("linear attention needs at least one token (N >= 1)")
    if key_weights is not None and key_weights.shape != q.shape[:3]:
        raise ValueError(f"key_weights must have shape (B, heads, N) = {tuple(q.shape[:3])}, "
                         f"got {tuple(key_weights.shape)}")
    if rope is not None:
        n, d = q.shape[2], q.shape[3]
        if rope.height * rope.width != n:
            raise ValueError(f"RoPE grid {rope.height}x{rope.width} does not match N = {n} tokens")
        if rope.angle.numel() * 2 != d:
            raise ValueError(f"RoPE angle has {rope.angle.numel()} entries; head dim {d} needs {d // 2}")


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, normalization: str = "division",
                     feature_map: str = "identity", scale: float = 1.0, eps: float = 1e-6,
                     key_weights: Optional[Tensor] = None, rope: Optional[RopeGrid] = None,
                     backend: str = "auto") -> Tensor:
    """Non-causal kernelized attention over N tokens (see the module docstring for the math).

    Args:
        q, k: ``(B, H, N, d)``; v: ``(B, H, N, dv)``; any float dtype (fp32/bf16/fp16).
        normalization: ``"division"``, ``"magnitude_aware"``, ``"injective"`` or ``"none"``.
        feature_map: ``"identity"``, ``"relu"`` or ``"elu1"`` (ELU+1), applied to q and k.
        scale: the constant ``c`` multiplying both the numerator and the normaliser.
        eps: added to the normaliser (division and magnitude-aware forms).
        key_weights: optional ``(B, H, N)`` per-key weights ``w_j`` (RALA's ``N·α_j``).
        rope: optional :class:`RopeGrid`; rotates φ(q), φ(k) in the numerator only (needs d % 4 == 0).
        backend: ``"torch"`` (reference), ``"triton"`` (fused kernels, ``linvision.attn.ops``; CUDA tensors,
            or CPU tensors under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton for CUDA tensors with
            head dims ≤ 128, the reference otherwise and under fake tensors or the FLOP counter).
    Returns:
        ``(B, H, N, dv)`` in ``v.dtype``. The Triton backend lays it out as ``torch.empty_like(v)`` (and each
        gradient as its input): when q, k, v are ``(B, H, N, d)`` views of a projection's output, the reshape
        back to tokens (``out.transpose(1, 2).reshape(B, N, C)`` or ``out.transpose(-1, -2).reshape(B, C, H, W)``)
        is a view instead of a copy.
    """
    check_inputs(q, k, v, key_weights, rope, normalization, feature_map)
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_supports(q, v) and not under_dispatch_mode() else "torch"
    if backend == "triton":
        from .ops import linear_attention_triton  # lazy: importing linvision never touches Triton

        return linear_attention_triton(q, k, v, normalization=normalization, feature_map=feature_map, scale=scale,
                                       eps=eps, key_weights=key_weights, rope=rope)
    return linear_attention_torch(q, k, v, normalization=normalization, feature_map=feature_map, scale=scale,
                                  eps=eps, key_weights=key_weights, rope=rope)


def _triton_supports(q: Tensor, v: Tensor) -> bool:
    try:
        from .ops import supports
    except ImportError:  # no usable Triton: the reference serves every device
        return False
    return supports(q, v)
