"""PyTorch reference of the linear-attention op: the ``torch`` backend, and the twin every kernel is tested
against (the maths is in :mod:`linvision.attn.core`'s docstring).

* :func:`linear_attention_torch`: the linear form through the running sums (``backend="torch"``);
* :func:`backward_q_torch`, :func:`backward_kv_torch`: the two backward passes of the Triton kernels,
  by autograd through the matching half of the forward (the GPU path for fp32 heads wider than 64, and
  the twins the kernels' passes are tested against);
* :func:`attention_weights`, :func:`quadratic_attention`: the explicit ``(N, N)`` form, for tests.

Everything here is plain PyTorch (no Triton) and computes in float32, or float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rope import RopeGrid, apply_rope, rope_tables
from .flags import FEATURE_MAPS

__all__ = ["compute_dtype", "feature_map_fn", "apply_normalization", "linear_attention_torch", "backward_q_torch",
           "backward_kv_torch", "attention_weights", "quadratic_attention"]


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


def apply_normalization(n: Tensor, z: Tensor, v_mean: Optional[Tensor], normalization: str, eps: float) -> Tensor:
    """Combine the numerator ``n`` ``(B, H, N, dv)``, normaliser ``z`` ``(B, H, N)`` and ``v̄`` ``(B, H, 1, dv)``
    (None for ``division``/``none``) by the named normalisation."""
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
    """PyTorch path of :func:`linvision.attn.linear_attention` (same arguments, no validation).

    q, k: ``(B, H, N, d)``, v: ``(B, H, N, dv)``; returns ``(B, H, N, dv)`` in ``v.dtype``, computed in float32
    (float64 for float64 inputs) outside autocast.
    """
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
        out = apply_normalization(num, z, v_mean, normalization, eps)
    return out.to(out_dtype)


def backward_q_torch(grad_out: Tensor, q: Tensor, state: Tensor, rope_angle: Optional[Tensor], rope_width: int,
                     normalization: str, feature_map: str, scale: float, eps: float) -> Tuple[Tensor, Tensor]:
    """Twin of the q-side backward pass (``linear_attn_bwd.backward_q``): autograd through the q-side of the
    forward, in fp32. ``state``: the forward's ``(B·H, d·dv + d + dv)`` fp32 buffer. Returns ``dq`` in q's dtype
    and the state's gradient in the same layout as ``state``."""
    bsz, heads, n, d = q.shape
    dv_dim = grad_out.shape[-1]
    s_mat = state[:, :d * dv_dim].view(bsz, heads, d, dv_dim).detach().requires_grad_()
    k_mean = state[:, d * dv_dim:d * dv_dim + d].view(bsz, heads, 1, d).detach().requires_grad_()
    v_mean = state[:, d * dv_dim + d:].view(bsz, heads, 1, dv_dim).detach().requires_grad_()
    uses_vmean = normalization in ("magnitude_aware", "injective")
    with torch.enable_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        qf32 = q.detach().float().requires_grad_()
        qf = feature_map_fn(feature_map, qf32)
        z = (qf * k_mean).sum(-1) * scale
        if rope_angle is not None:
            sin, cos = rope_tables(rope_angle, n // rope_width, rope_width)
            qf = apply_rope(qf, sin, cos)
        out = apply_normalization(qf @ s_mat, z, v_mean if uses_vmean else None, normalization, eps)
        leaves = (qf32, s_mat, k_mean) + ((v_mean,) if uses_vmean else ())
        grads = torch.autograd.grad(out, leaves, grad_out.float(), allow_unused=True)
    dstate = torch.zeros_like(state)
    dstate[:, :d * dv_dim] = grads[1].reshape(bsz * heads, -1)
    if grads[2] is not None:
        dstate[:, d * dv_dim:d * dv_dim + d] = grads[2].reshape(bsz * heads, -1)
    if uses_vmean:
        dstate[:, d * dv_dim + d:] = grads[3].reshape(bsz * heads, -1)
    return grads[0].to(q.dtype), dstate


def backward_kv_torch(k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor],
                      dstate: Tensor, rope_width: int, normalization: str, feature_map: str,
                      scale: float) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Twin of the k/v-side backward pass (``linear_attn_bwd.backward_kv``): autograd through the k/v-side of
    the forward, in fp32. Returns ``(dk, dv, dw)`` in the dtypes of k, v and the key weights (dw None without)."""
    bsz, heads, n, d = k.shape
    dv_dim = v.shape[-1]
    uses_vmean = normalization in ("magnitude_aware", "injective")
    with torch.enable_grad(), torch.autocast(device_type=k.device.type, enabled=False):
        k32 = k.detach().float().requires_grad_()
        v32 = v.detach().float().requires_grad_()
        w32 = key_weights.detach().float().requires_grad_() if key_weights is not None else None
        kf = feature_map_fn(feature_map, k32)
        if w32 is not None:
            kf = kf * w32.unsqueeze(-1)
        k_mean = kf.mean(dim=2)
        if rope_angle is not None:
            sin, cos = rope_tables(rope_angle, n // rope_width, rope_width)
            kf = apply_rope(kf, sin, cos)
        s_mat = (kf.transpose(-1, -2) @ v32) * (scale / n)
        outs = [s_mat, k_mean]
        grads_out = [dstate[:, :d * dv_dim].view(bsz, heads, d, dv_dim), dstate[:, d * dv_dim:d * dv_dim + d].view(
            bsz, heads, d)]
        if uses_vmean:
            outs.append(v32.mean(dim=2))
            grads_out.append(dstate[:, d * dv_dim + d:].view(bsz, heads, dv_dim))
        leaves = (k32, v32) + ((w32,) if w32 is not None else ())
        grads = torch.autograd.grad(outs, leaves, grads_out)
    dw = grads[2].to(key_weights.dtype) if key_weights is not None else None
    return grads[0].to(k.dtype), grads[1].to(v.dtype), dw


def attention_weights(q: Tensor, k: Tensor, *, normalization: str = "division", feature_map: str = "identity",
                      scale: float = 1.0, eps: float = 1e-6, key_weights: Optional[Tensor] = None,
                      rope: Optional[RopeGrid] = None) -> Tensor:
    """Explicit weights ``A`` (``(B, H, N, N)``, in the dtype of the inputs) with ``out = A @ v``, except for
    ``magnitude_aware`` and ``injective`` whose ``v̄`` term is folded in as ``γ_i / N`` per entry."""
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
    """``attention_weights(q, k, **kwargs) @ v`` (``(B, H, N, dv)``): the quadratic form, for tests."""
    return attention_weights(q, k, **kwargs) @ v
