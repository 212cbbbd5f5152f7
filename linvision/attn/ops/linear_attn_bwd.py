"""Backward Triton kernels of non-causal linear attention (math: ``linvision.attn.core``; PyTorch twins
of both passes: ``.naive``).

With upstream gradient ``g = ∂L/∂out`` the backward is again two passes over the tokens (q-side
then k/v-side), reading each input and writing each gradient once — no per-token intermediates
(``n_i``, ``z_i`` are recomputed from q and the saved fp32 state, never stored):

1. ``_bwd_q_kernel`` — grid ``(B·H, splits)``; per token i, from φq_i, g_i and the state:
   ``z_i``, ``n_i`` → ``dn_i``, ``dz_i`` (by normalisation), then ``dq_i`` directly and the fp32
   reductions ``dS = Σ_i Rφq_iᵀ dn_i``, ``dk̄ = c Σ_i dz_i φq_i``, ``dv̄ = Σ_i γ_i g_i``
   (γ = −z for magnitude-aware, 1 − z for injective); partials added with fp32 atomics.
2. ``_bwd_kv_kernel`` — grid ``(B·H, splits)``; per key j:
   ``dv_j = (c/N) Rφk_jw_j·dS + dv̄/N``, ``d(w φk)_j = (c/N) Rᵀ(dS v_j) + dk̄/N``,
   ``dw_j = φk_j·d(wφk)_j``, ``dk_j = φ'(k_j) ⊙ w_j d(wφk)_j``.

Per-token terms: division ``dn = g/(z+ε)``, ``dz = −(g·n)/(z+ε)²``; magnitude-aware
``dn = g(1 + 1/(z+ε))``, ``dz = −(g·n)/(z+ε)² − g·v̄``; injective ``dn = g``, ``dz = −g·v̄``;
none ``dn = g``. The gradient buffer ``(B·H, d·dv + d + dv)`` mirrors the forward state layout.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .flags import FEATURE_IDS, INTERPRETING, NORMALIZATION_IDS
from .jit import (column0, feature, feature_grad, head_ptr, in_first_row, load_at, load_tile, mm, rope, row0,
                  start_next_pass, tile_ptrs, tile_range, wait_for_previous_pass)
from .linear_attn_fwd import state_size
from .naive import backward_kv_torch, backward_q_torch
from .policy import (ReduceBuffer, autotune_configs, block, dot_mode, layout_like, reduce_splits, size_class,
                     split_grid, token_grid)
from .runtime import KernelCall, PlanCache, dependent_consts, policy_key, tensor_key

__all__ = ["linear_attention_bwd", "backward_q", "backward_kv"]


@triton.autotune(configs=autotune_configs("reduce"),
                 key=["BD", "BDV", "FEATURE", "NORM", "ROPE", "ATOMIC", "DOT_MODE", "SIZE_CLASS"],
                 reset_to_zero=["dstate_ptr"])
@triton.jit(do_not_specialize=["N", "SIZE_CLASS", "W", "COPIES"])
def _bwd_q_kernel(q_ptr, g_ptr, state_ptr, angle_ptr, dq_ptr, dstate_ptr,
                  sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sdb, sdh, sdn, sdd,
                  H, N, SIZE_CLASS, W, COPIES, copy_stride, scale, eps,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  FEATURE: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                  ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr, PDL: tl.constexpr, BN: tl.constexpr,
                  STRIDED: tl.constexpr):
    start_next_pass(PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    q_base = head_ptr(q_ptr, pid_bh, H, sqb, sqh)
    g_base = head_ptr(g_ptr, pid_bh, H, sgb, sgh)
    dq_base = head_ptr(dq_ptr, pid_bh, H, sdb, sdh)

    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BDV)
    cmask = cols < D
    vmask = vcols < DV
    smask = cmask[:, None] & vmask[None, :]
    s_base = state_ptr + pid_bh * (D * DV + D + DV)
    state = load_tile(s_base, cols, vcols, DV, 1, cmask, vmask)
    if DOT_MODE == 2:
        state = state.to(tl.bfloat16)
    kbar = tl.load(s_base + D * DV + cols, mask=cmask, other=0.0) * scale
    if NORM == 1 or NORM == 2:
        vbar = tl.load(s_base + D * DV + D + vcols, mask=vmask, other=0.0)

    dstate = tl.zeros((BD, BDV), dtype=tl.float32)
    # Weighted row sums (dk̄ = c Σ dz φq, dv̄ = Σ γ g) on the tensor cores. With magnitude-aware and injective,
    # the column form used elsewhere (xᵀ @ [γ, 0…]) got dk and dw wrong (6e-2 relative for magnitude-aware, 1.7
    # for injective) or faulted on the H100 (triton 3.6, bf16, d = 64, q and g with a token stride of 1, or key
    # weights): they take the row form ([γ, 0…]ᵀ @ x, no transposed operand). Division keeps the column form: in
    # the row form its forward + backward took 10 % longer at (2048,3,196,32) (docs/kernels.md).
    if NORM == 1 or NORM == 2:
        dk_acc = tl.zeros((16, BD), dtype=tl.float32)
        dv_acc = tl.zeros((16, BDV), dtype=tl.float32)
    else:
        col16 = tl.arange(0, 16)[None, :] == 0
        dk_acc = tl.zeros((BD, 16), dtype=tl.float32)

    count, row_step, row_end, rows = tile_range(N, BN, STRIDED)
    rmask = rows < row_end
    q_ptrs = tile_ptrs(q_base, rows, cols, sqn, sqd)
    g_ptrs = tile_ptrs(g_base, rows, vcols, sgn, sgd)
    dq_ptrs = tile_ptrs(dq_base, rows, cols, sdn, sdd)
    step = row_step.to(tl.int64)
    qx = load_at(q_ptrs, rmask, cmask)
    # g = 0 on masked rows/columns makes dn, dz and every partial sum vanish there (so φ(q) needs no mask: on
    # padded columns k̄ and the state are zero, and what lands in padded rows/columns is not stored).
    gx = load_at(g_ptrs, rmask, vmask)
    for _ in range(0, count):
        nrows = rows + row_step
        nmask = nrows < row_end
        q_ptrs += step * sqn
        g_ptrs += step * sgn
        qx_next = load_at(q_ptrs, nmask, cmask)
        gx_next = load_at(g_ptrs, nmask, vmask)

        qmask = rmask[:, None] & cmask[None, :]
        q32 = qx.to(tl.float32)
        g = gx.to(tl.float32)
        qf = feature(q32, FEATURE)
        qr = qf
        if ROPE:
            qr = rope(qf, rows, angle_ptr, W, D, BD, BN, False)
        if NORM != 3:
            z = tl.sum(qf * kbar[None, :], axis=1)
        if NORM == 0:
            inv = 1.0 / (z + eps)
            dn = g * inv[:, None]
        elif NORM == 1:
            num = mm(qr, state, DOT_MODE)
            inv = 1.0 / (z + eps)
            dn = g * (1.0 + inv)[:, None]
            dz = -tl.sum(g * num, axis=1) * inv * inv - tl.sum(g * vbar[None, :], axis=1)
            dv_acc += mm(in_first_row(-z), g, DOT_MODE)
        elif NORM == 2:
            dn = g
            dz = -tl.sum(g * vbar[None, :], axis=1)
            dv_acc += mm(in_first_row(1.0 - z), g, DOT_MODE)
        else:
            dn = g
        dstate += mm(tl.trans(qr), dn, DOT_MODE)
        dqf = mm(dn, tl.trans(state), DOT_MODE)
        if NORM == 0:
            # Division: dz = −(g·n)/(z+ε)² = −Rφq·(dn Sᵀ)/(z+ε), from the product dq needs anyway, so
            # n = Rφq·S is not formed (3 tensor-core products per tile instead of 4).
            dz = -tl.sum(qr * dqf, axis=1) * inv
        if ROPE:
            dqf = rope(dqf, rows, angle_ptr, W, D, BD, BN, True)
        if NORM != 3:
            dqf += dz[:, None] * kbar[None, :]
            if NORM == 0:
                dk_acc += mm(tl.trans(qf), tl.where(col16, dz[:, None], 0.0), DOT_MODE)
            else:
                dk_acc += mm(in_first_row(dz), qf, DOT_MODE)
        dq = dqf * feature_grad(q32, FEATURE)
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=qmask)
        dq_ptrs += step * sdn

        rows = nrows
        rmask = nmask
        qx = qx_next
        gx = gx_next

    d_base = dstate_ptr + (pid_s % COPIES).to(tl.int64) * copy_stride + pid_bh * (D * DV + D + DV)
    d_ptrs = d_base + cols[:, None] * DV + vcols[None, :]
    if NORM == 1 or NORM == 2:
        dkbar = row0(dk_acc) * scale
    else:
        dkbar = column0(dk_acc) * scale
    if ATOMIC:
        tl.atomic_add(d_ptrs, dstate, mask=smask, sem="relaxed")
        tl.atomic_add(d_base + D * DV + cols, dkbar, mask=cmask, sem="relaxed")
        if NORM == 1 or NORM == 2:
            tl.atomic_add(d_base + D * DV + D + vcols, row0(dv_acc), mask=vmask, sem="relaxed")
    else:
        tl.store(d_ptrs, dstate, mask=smask)
        tl.store(d_base + D * DV + cols, dkbar, mask=cmask)
        if NORM == 1 or NORM == 2:
            tl.store(d_base + D * DV + D + vcols, row0(dv_acc), mask=vmask)


@triton.autotune(configs=autotune_configs("token"),
                 key=["BD", "BDV", "FEATURE", "HAS_W", "ROPE", "NEED_VMEAN", "DOT_MODE", "SIZE_CLASS"])
@triton.jit(do_not_specialize=["N", "SIZE_CLASS", "W"])
def _bwd_kv_kernel(k_ptr, v_ptr, w_ptr, angle_ptr, dstate_ptr, dk_ptr, dv_ptr, dw_ptr,
                   skb, skh, skn, skd, svb, svh, svn, svd, swb, swh, swn,
                   sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdwb, sdwh, sdwn,
                   H, N, SIZE_CLASS, W, state_scale, inv_n,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   FEATURE: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, NEED_VMEAN: tl.constexpr,
                   DOT_MODE: tl.constexpr, PDL: tl.constexpr, BN: tl.constexpr, STRIDED: tl.constexpr):
    pid_bh = tl.program_id(0).to(tl.int64)
    k_base = head_ptr(k_ptr, pid_bh, H, skb, skh)
    v_base = head_ptr(v_ptr, pid_bh, H, svb, svh)
    w_base = head_ptr(w_ptr, pid_bh, H, swb, swh)
    dk_base = head_ptr(dk_ptr, pid_bh, H, sdkb, sdkh)
    dv_base = head_ptr(dv_ptr, pid_bh, H, sdvb, sdvh)
    dw_base = head_ptr(dw_ptr, pid_bh, H, sdwb, sdwh)

    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BDV)
    cmask = cols < D
    vmask = vcols < DV
    count, row_step, row_end, rows = tile_range(N, BN, STRIDED)
    rmask = rows < row_end
    k_ptrs = tile_ptrs(k_base, rows, cols, skn, skd)
    v_ptrs = tile_ptrs(v_base, rows, vcols, svn, svd)
    w_ptrs = w_base + rows.to(tl.int64) * swn
    dk_ptrs = tile_ptrs(dk_base, rows, cols, sdkn, sdkd)
    dv_ptrs = tile_ptrs(dv_base, rows, vcols, sdvn, sdvd)
    dw_ptrs = dw_base + rows.to(tl.int64) * sdwn
    step = row_step.to(tl.int64)
    kx = load_at(k_ptrs, rmask, cmask)
    vx = load_at(v_ptrs, rmask, vmask)
    if HAS_W:
        wx = tl.load(w_ptrs, mask=rmask, other=0.0)

    # k, v, w were written before the q-side pass began; the state gradient only by it (see the forward's
    # output kernel).
    wait_for_previous_pass(PDL)
    d_base = dstate_ptr + pid_bh * (D * DV + D + DV)
    dstate = load_tile(d_base, cols, vcols, DV, 1, cmask, vmask)
    if DOT_MODE == 2:
        dstate = dstate.to(tl.bfloat16)
    dkbar = tl.load(d_base + D * DV + cols, mask=cmask, other=0.0) * inv_n
    if NEED_VMEAN:
        dvbar = tl.load(d_base + D * DV + D + vcols, mask=vmask, other=0.0) * inv_n

    for _ in range(0, count):
        nrows = rows + row_step
        nmask = nrows < row_end
        k_ptrs += step * skn
        v_ptrs += step * svn
        kx_next = load_at(k_ptrs, nmask, cmask)
        vx_next = load_at(v_ptrs, nmask, vmask)
        if HAS_W:
            w_ptrs += step * swn
            wx_next = tl.load(w_ptrs, mask=nmask, other=0.0)

        kmask = rmask[:, None] & cmask[None, :]
        k32 = kx.to(tl.float32)
        # Unmasked φ(k): the state gradient is zero on padded columns (so is dk̄), padded rows are not stored.
        kf = feature(k32, FEATURE)
        kw = kf
        if HAS_W:
            w32 = wx.to(tl.float32)
            kw = kf * w32[:, None]
        if ROPE:
            kw = rope(kw, rows, angle_ptr, W, D, BD, BN, False)
        dvx = mm(kw, dstate, DOT_MODE) * state_scale
        if NEED_VMEAN:
            dvx += dvbar[None, :]
        dkw = mm(vx, tl.trans(dstate), DOT_MODE) * state_scale
        if ROPE:
            dkw = rope(dkw, rows, angle_ptr, W, D, BD, BN, True)
        dkw += dkbar[None, :]
        if HAS_W:
            dwx = tl.sum(kf * dkw, axis=1)
            tl.store(dw_ptrs, dwx.to(dw_ptr.dtype.element_ty), mask=rmask)
            dw_ptrs += step * sdwn
            dkw = dkw * w32[:, None]
        dk = dkw * feature_grad(k32, FEATURE)
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
        tl.store(dv_ptrs, dvx.to(dv_ptr.dtype.element_ty), mask=rmask[:, None] & vmask[None, :])
        dk_ptrs += step * sdkn
        dv_ptrs += step * sdvn

        rows = nrows
        rmask = nmask
        kx = kx_next
        vx = vx_next
        if HAS_W:
            wx = wx_next


def linear_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_weights: Optional[Tensor],
                         rope_angle: Optional[Tensor], state: Tensor, rope_width: int, normalization: str,
                         feature_map: str, scale: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(dq, dk, dv, dw)`` in the dtypes and layouts (``torch.empty_like``) of q, k, v, key_weights;
    ``dw`` is None without weights."""
    mode = dot_mode(q, k, v)
    if mode == 0 and max(q.shape[-1], v.shape[-1]) > 64 and not INTERPRETING:
        # 3×tf32 products of wide fp32 tiles need more shared memory than a Hopper SM has
        # (330–450 KB): fp32 inputs with head dims > 64 take the backward in PyTorch (exact, slower).
        dq, dstate = backward_q_torch(grad_out, q, state, rope_angle, rope_width, normalization, feature_map,
                                      scale, eps)
        dk, dv, dw = backward_kv_torch(k, v, key_weights, rope_angle, dstate, rope_width, normalization,
                                       feature_map, scale)
        # The same layouts as the kernels' (the custom op's fake kernel promises them to torch.compile).
        return (_in_layout_of(dq, q), _in_layout_of(dk, k), _in_layout_of(dv, v),
                None if dw is None else _in_layout_of(dw, key_weights))
    def q_side_pass() -> Tuple[Tensor, Tensor]:
        return backward_q(grad_out, q, state, rope_angle, rope_width, normalization, feature_map, scale, eps, mode)
    dq, dstate = q_side_pass()
    dk, dv, dw = backward_kv(k, v, key_weights, rope_angle, dstate, rope_width, normalization, feature_map, scale,
                             mode, preceding_pass=q_side_pass)
    return dq, dk, dv, dw


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides of ``torch.empty_like(like)`` (copied only if it has others)."""
    strides = layout_like(like)
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, device=t.device, dtype=t.dtype).copy_(t)


class _QSidePass:
    """Backward pass 1 for one signature: the gradient buffer's layout and the kernel call."""

    def __init__(self, grad_out: Tensor, q: Tensor, rope_angle: Optional[Tensor], rope_width: int,
                 normalization: str, feature_map: str, scale: float, eps: float, mode: int):
        bsz, heads, n, d = q.shape
        dv_dim = grad_out.shape[-1]
        bh = bsz * heads
        splits = reduce_splits(bh, n, q.device)
        self.buffer = ReduceBuffer(bh, state_size(d, dv_dim), splits)
        self.dq_strides = layout_like(q)
        self.call = KernelCall(_bwd_q_kernel, split_grid(bh, n, splits), (
            *q.stride(), *grad_out.stride(), *self.dq_strides,
            heads, n, size_class(n), max(rope_width, 1), self.buffer.copies, bh * state_size(d, dv_dim), scale,
            eps), dict(
            D=d, DV=dv_dim, BD=block(d), BDV=block(dv_dim), FEATURE=FEATURE_IDS[feature_map],
            NORM=NORMALIZATION_IDS[normalization], ROPE=rope_angle is not None, ATOMIC=splits > 1, DOT_MODE=mode,
            **dependent_consts(q.device, second_pass=False)))


class _KVSidePass:
    """Backward pass 2 for one signature: the kernel call and the layouts of dk, dv, dw (those of k, v, w)."""

    def __init__(self, k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor],
                 rope_width: int, normalization: str, feature_map: str, scale: float, mode: int):
        bsz, heads, n, d = k.shape
        dv_dim = v.shape[-1]
        has_w = key_weights is not None
        self.strides = (layout_like(k), layout_like(v), layout_like(key_weights) if has_w else (0, 0, 0))
        self.call = KernelCall(_bwd_kv_kernel, token_grid(bsz * heads, n, k.device), (
            *k.stride(), *v.stride(), *(key_weights.stride() if has_w else (0, 0, 0)), *self.strides[0],
            *self.strides[1], *self.strides[2],
            heads, n, size_class(n), max(rope_width, 1), scale / n, 1.0 / n), dict(
            D=d, DV=dv_dim, BD=block(d), BDV=block(dv_dim), FEATURE=FEATURE_IDS[feature_map], HAS_W=has_w,
            ROPE=rope_angle is not None, NEED_VMEAN=NORMALIZATION_IDS[normalization] in (1, 2), DOT_MODE=mode,
            **dependent_consts(k.device, second_pass=True)))


_Q_SIDE_PASSES = PlanCache()
_KV_SIDE_PASSES = PlanCache()


def backward_q(grad_out: Tensor, q: Tensor, state: Tensor, rope_angle: Optional[Tensor], rope_width: int,
               normalization: str, feature_map: str, scale: float, eps: float, mode: int) -> Tuple[Tensor, Tensor]:
    """Backward pass 1: ``dq`` (q's dtype and layout) and the fp32 gradient of the state ``(B·H, d·dv + d + dv)``."""
    key = (tensor_key(grad_out, q, state, rope_angle), rope_width, normalization, feature_map, scale, eps, mode,
           policy_key())
    plan = _Q_SIDE_PASSES.get(key) or _Q_SIDE_PASSES.put(key, _QSidePass(
        grad_out, q, rope_angle, rope_width, normalization, feature_map, scale, eps, mode))
    buf = plan.buffer.allocate(q.device)
    dq = torch.empty_strided(q.shape, plan.dq_strides, device=q.device, dtype=q.dtype)
    plan.call(q, grad_out, state, rope_angle if rope_angle is not None else q, dq, buf)
    return dq, plan.buffer.total(buf)


def backward_kv(k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor], dstate: Tensor,
                rope_width: int, normalization: str, feature_map: str, scale: float, mode: int,
                preceding_pass: Optional[Callable[[], object]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Backward pass 2: ``dk, dv, dw`` from k, v, w and the state gradient. Launched as a programmatic
    dependent on sm_90+ (reads k, v, w before the previous kernel has finished): call it right after
    :func:`backward_q`. ``preceding_pass`` (that call, on buffers of its own) lets its config be tuned together
    with it (``runtime.tune_after``)."""
    key = (tensor_key(k, v, key_weights, rope_angle, dstate), rope_width, normalization, feature_map, scale, mode,
           policy_key())
    plan = _KV_SIDE_PASSES.get(key) or _KV_SIDE_PASSES.put(key, _KVSidePass(
        k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, mode))
    dk = torch.empty_strided(k.shape, plan.strides[0], device=k.device, dtype=k.dtype)
    dv = torch.empty_strided(v.shape, plan.strides[1], device=k.device, dtype=v.dtype)
    dw = None if key_weights is None else torch.empty_strided(key_weights.shape, plan.strides[2], device=k.device,
                                                              dtype=key_weights.dtype)
    plan.call(k, v, key_weights if key_weights is not None else k, rope_angle if rope_angle is not None else k, dstate,
              dk, dv, dw if dw is not None else dk, preceding_pass=preceding_pass)
    return dk, dv, dw
