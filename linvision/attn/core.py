"""The shared non-causal linear-attention core.

Every mechanism in ``linvision.attn`` reduces its token mixing to one call of
:func:`linear_attention`. For per-head inputs ``q, k`` of shape ``(B, H, N, d)`` and ``v`` of
shape ``(B, H, N, dv)``, with feature map ``φ``, optional per-key weights ``w_j`` (default 1),
optional rotation ``R`` (2-D RoPE, numerator only) and ``c = scale``::

    n_i  = (c/N) Σ_j w_j (R φ(q_i) · R φ(k_j)) v_j          numerator      (B, H, N, dv)
    z_i  = (c/N) Σ_j w_j (φ(q_i) · φ(k_j))                    normaliser     (B, H, N)
    v̄    = (1/N) Σ_j v_j                                                    (B, H, dv)

    division          out_i = n_i / (z_i + eps)                       focused, RALA, QT, Mirror
    magnitude_aware   out_i = n_i · (1 + 1/(z_i + eps)) − z_i · v̄     MALA (spec mala_rala §3.1)
    injective         out_i = n_i + (1 − z_i) · v̄                     InLine (spec flatten_inline §2.1)
    none              out_i = n_i

It is evaluated linearly through the running sums ``S = (c/N) Σ_j w_j Rφ(k_j)ᵀ v_j`` (d×dv),
``k̄ = (1/N) Σ_j w_j φ(k_j)`` and ``v̄``, all accumulated in float32 whatever the input dtype (and
outside autocast); the output has the dtype of ``v``. The 1/N inside every sum keeps the state
O(1) in N, which is what keeps fp16/bf16 inputs from overflowing at large N.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import RopeGrid, apply_rope

__all__ = ["linear_attention", "NORMALIZATIONS", "FEATURE_MAPS", "BACKENDS", "feature_map_fn", "check_inputs", "compute_dtype"]

NORMALIZATIONS = ("division", "magnitude_aware", "injective", "none")
FEATURE_MAPS = ("identity", "relu", "elu1")
BACKENDS = ("torch", "triton")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs (exactness tests), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def feature_map_fn(name: str, x: Tensor) -> Tensor:
    """Apply the named elementwise feature map (``identity``, ``relu`` or ``elu1`` = ELU(x)+1)."""
    if name == "identity":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


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


def _combine(n: Tensor, z: Tensor, v_mean: Tensor, normalization: str, eps: float) -> Tensor:
    z = z.unsqueeze(-1)
    if normalization == "division":
        return n / (z + eps)
    if normalization == "magnitude_aware":
        return n * (1.0 + 1.0 / (z + eps)) - z * v_mean
    if normalization == "injective":
        return n + (1.0 - z) * v_mean
    return n


def linear_attention_torch(q: Tensor, k: Tensor, v: Tensor, *, normalization: str = "division",
                           feature_map: str = "identity", scale: float = 1.0, eps: float = 1e-6,
                           key_weights: Optional[Tensor] = None, rope: Optional[RopeGrid] = None) -> Tensor:
    """PyTorch reference path of :func:`linear_attention` (same arguments, no validation)."""
    out_dtype = v.dtype
    acc = compute_dtype(q)
    n_tokens = q.shape[2]
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = feature_map_fn(feature_map, q.to(acc))
        kf = feature_map_fn(feature_map, k.to(acc))
        vf = v.to(acc)
        if key_weights is not None:
            kf = kf * key_weights.to(acc).unsqueeze(-1)
        k_mean = kf.mean(dim=2, keepdim=True)                                   # (B, H, 1, d)
        z = (qf * k_mean).sum(-1) * scale                                        # (B, H, N)
        if rope is not None:
            sin, cos = rope.tables()
            sin, cos = sin.to(qf.device, acc), cos.to(qf.device, acc)
            qr, kr = apply_rope(qf, sin, cos), apply_rope(kf, sin, cos)
        else:
            qr, kr = qf, kf
        state = (kr.transpose(-1, -2) @ vf) * (scale / n_tokens)               # (B, H, d, dv)
        num = qr @ state                                                          # (B, H, N, dv)
        v_mean = vf.mean(dim=2, keepdim=True) if normalization in ("magnitude_aware", "injective") else None
        out = _combine(num, z, v_mean, normalization, eps)
    return out.to(out_dtype)


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
            head dims ≤ 128, the reference otherwise).
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
        backend = "triton" if q.is_cuda and _triton_supports(q, v) else "torch"
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
