"""Autograd and ``torch.library`` wiring of the Triton linear-attention kernels.

Two entry points share the same host functions (:func:`linear_attention_fwd`,
:func:`linear_attention_bwd`):

* eager mode calls a ``torch.autograd.Function`` directly (the least host overhead per call —
  this op runs in tens of microseconds, so dispatcher overhead shows);
* under ``torch.compile`` the call goes through the custom ops ``linvision::linear_attention_fwd``
  / ``linvision::linear_attention_bwd`` (``torch.library.custom_op`` + ``register_autograd`` +
  fake kernels), so Dynamo puts one node in the graph instead of breaking it.

Saved for backward: q, k, v, the key weights and the fp32 state (``(B·H, d·dv+d+dv)``): the
output is not saved; the backward recomputes ``n_i``, ``z_i`` from q and the state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .flags import INTERPRETING, MAX_HEAD_DIM, records_grad
from .linear_attn_bwd import linear_attention_bwd
from .linear_attn_fwd import linear_attention_fwd, state_size

__all__ = ["linear_attention_triton", "supports"]


def supports(q: Tensor, v: Tensor) -> bool:
    """Whether the kernels take these inputs: CUDA tensors (or the interpreter), head dims ≤ 128."""
    return (q.is_cuda or INTERPRETING) and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM


# --------------------------------------------------------------------------------------------
# Custom ops (the torch.compile path)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("linvision::linear_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor],
            rope_width: int, normalization: str, feature_map: str, scale: float,
            eps: float) -> Tuple[Tensor, Tensor]:
    return linear_attention_fwd(q, k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, eps)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, eps):
    bsz, heads, n, d = q.shape
    out = torch.empty_like(v)                      # the kernels write v's layout (policy.layout_like)
    state = q.new_empty((bsz * heads, state_size(d, v.shape[-1])), dtype=torch.float32)
    return out, state


@torch.library.custom_op("linvision::linear_attention_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_weights: Optional[Tensor],
            rope_angle: Optional[Tensor], state: Tensor, rope_width: int, normalization: str, feature_map: str,
            scale: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dw = linear_attention_bwd(grad_out, q, k, v, key_weights, rope_angle, state, rope_width,
                                          normalization, feature_map, scale, eps)
    return dq, dk, dv, (dw if dw is not None else q.new_empty((0,)))


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, key_weights, rope_angle, state, rope_width, normalization, feature_map, scale, eps):
    dw = torch.empty_like(key_weights) if key_weights is not None else q.new_empty((0,))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dw)


def _setup_context(ctx, inputs, output):
    q, k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, eps = inputs
    ctx.save_for_backward(q, k, v, key_weights, rope_angle, output[1])
    ctx.options = (rope_width, normalization, feature_map, scale, eps)


def _op_backward(ctx, grad_out, grad_state):
    q, k, v, key_weights, rope_angle, state = ctx.saved_tensors
    dq, dk, dv, dw = _bwd_op(grad_out, q, k, v, key_weights, rope_angle, state, *ctx.options)
    return dq, dk, dv, (dw if key_weights is not None else None), None, None, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Eager path
# --------------------------------------------------------------------------------------------

class _LinearAttentionFunction(torch.autograd.Function):
    # The non-tensor options travel as one tuple argument: each argument of ``apply`` (and each ``None``
    # gradient returned for it) costs host time on every call.
    @staticmethod
    def forward(ctx, q, k, v, key_weights, rope_angle, options):
        out, state = linear_attention_fwd(q, k, v, key_weights, rope_angle, *options)
        ctx.save_for_backward(q, k, v, key_weights, rope_angle, state)
        ctx.options = options
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, key_weights, rope_angle, state = ctx.saved_tensors
        dq, dk, dv, dw = linear_attention_bwd(grad_out, q, k, v, key_weights, rope_angle, state, *ctx.options)
        return dq, dk, dv, dw, None, None


def linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, normalization: str = "division",
                            feature_map: str = "identity", scale: float = 1.0, eps: float = 1e-6,
                            key_weights: Optional[Tensor] = None, rope=None) -> Tensor:
    """Triton path of :func:`linvision.attn.linear_attention` (same arguments; inputs already validated).

    q, k: ``(B, H, N, d)``, v: ``(B, H, N, dv)`` with d, dv ≤ 128, any strides, fp32/fp16/bf16.
    Returns ``(B, H, N, dv)`` in ``v.dtype`` and v's layout (``torch.empty_like(v)``); the gradients take the
    layouts of q, k, v and the key weights (``policy.layout_like``: for views of a projection's output, the
    inverse reshape back to tokens is then a view, not a copy).
    """
    if not supports(q, v):
        raise ValueError(f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1) and head dims <= "
                         f"{MAX_HEAD_DIM}; got {q.device} tensors with d={q.shape[-1]}, dv={v.shape[-1]}")
    if rope is not None:
        angle = rope.angle.to(device=q.device, dtype=torch.float32).contiguous()
        width = int(rope.width)
    else:
        angle, width = None, 0
    options = (width, normalization, feature_map, float(scale), float(eps))
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, key_weights, angle, *options)[0]
    if not records_grad(q, k, v, key_weights):
        # Nothing to record (inference): the forward alone, without the autograd Function's context (its
        # apply costs host time on every call, and a 224² forward is bound by host time).
        return linear_attention_fwd(q, k, v, key_weights, angle, *options)[0]
    return _LinearAttentionFunction.apply(q, k, v, key_weights, angle, options)
