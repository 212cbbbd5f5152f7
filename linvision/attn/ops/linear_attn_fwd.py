"""Forward Triton kernels of non-causal linear attention (math: ``linvision.attn.core``; reference:
``.naive``).

Two passes over the tokens, the fewest a non-causal op can make (every output depends on the
whole reduction):

1. ``_state_kernel`` — grid ``(B·H, splits)``: each program streams its run of tokens of one head,
   reading k, v (and w) once, and accumulates in float32

       S = (c/N) Σ_j w_j Rφ(k_j)ᵀ v_j   (d×dv),   k̄ = (1/N) Σ_j w_j φ(k_j),   v̄ = (1/N) Σ_j v_j.

   When B·H is small the token axis is split across programs (``policy.reduce_splits``) and the
   partial states are added with fp32 atomics into a zeroed buffer — into several copies, summed
   afterwards, when more than ``REDUCE_SPLITS_PER_COPY`` programs share a head (atomics on one
   address serialise); with one program per head the state is stored directly.
2. ``_output_kernel`` — grid ``(B·H, splits)``: reads q once, writes the output once:
   ``z = c φq·k̄``, ``n = Rφq·S``, combined by the normalisation, cast to ``v.dtype``.

Every loop issues the loads of tile t+1 before computing tile t (software prefetch). φ, the key
weights, RoPE (angles from the buffer and the grid width), the 1/N scaling and every normalisation
are fused; inputs are read through their strides (views of a projection output
need no ``.contiguous()``). The state buffer is ``(B·H, d·dv + d + dv)`` float32: ``S`` row-major,
then ``k̄``, then ``v̄`` (written only for the forms that use it).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .flags import FEATURE_IDS, NORMALIZATION_IDS
from .jit import (column0, feature, first_column, head_ptr, load_at, load_tile, mm, rope, start_next_pass, tile_ptrs,
                  tile_range, wait_for_previous_pass)
from .policy import (ReduceBuffer, autotune_configs, block, dot_mode, layout_like, reduce_splits, size_class,
                     split_grid, token_grid)
from .runtime import KernelCall, PlanCache, dependent_consts, policy_key, tensor_key

__all__ = ["linear_attention_fwd", "forward_state", "forward_output", "state_size"]

_KEY = ["BD", "BDV", "FEATURE", "HAS_W", "ROPE", "NEED_VMEAN", "ATOMIC", "DOT_MODE", "SIZE_CLASS"]


@triton.autotune(configs=autotune_configs("reduce"), key=_KEY, reset_to_zero=["state_ptr"])
@triton.jit(do_not_specialize=["N", "SIZE_CLASS", "W", "COPIES"])
def _state_kernel(k_ptr, v_ptr, w_ptr, angle_ptr, state_ptr,
                  skb, skh, skn, skd, svb, svh, svn, svd, swb, swh, swn,
                  H, N, SIZE_CLASS, W, COPIES, copy_stride, state_scale, inv_n,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  FEATURE: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, NEED_VMEAN: tl.constexpr,
                  ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr, PDL: tl.constexpr, BN: tl.constexpr,
                  STRIDED: tl.constexpr):
    start_next_pass(PDL)
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    k_base = head_ptr(k_ptr, pid_bh, H, skb, skh)
    v_base = head_ptr(v_ptr, pid_bh, H, svb, svh)
    w_base = head_ptr(w_ptr, pid_bh, H, swb, swh)

    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BDV)
    cmask = cols < D
    vmask = vcols < DV
    ones = first_column(BN)
    acc = tl.zeros((BD, BDV), dtype=tl.float32)
    ksum = tl.zeros((BD, 16), dtype=tl.float32)
    vsum = tl.zeros((BDV, 16), dtype=tl.float32)

    # Software prefetch: the loads of tile t+1 are issued before tile t is reduced.
    count, row_step, row_end, rows = tile_range(N, BN, STRIDED)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    kx = load_tile(k_base, rows64, cols, skn, skd, rmask, cmask)
    vx = load_tile(v_base, rows64, vcols, svn, svd, rmask, vmask)
    if HAS_W:
        wx = tl.load(w_base + rows64 * swn, mask=rmask, other=0.0)
    for _ in range(0, count):
        nrows = rows + row_step
        nmask = nrows < row_end
        nrows64 = nrows.to(tl.int64)
        kx_next = load_tile(k_base, nrows64, cols, skn, skd, nmask, cmask)
        vx_next = load_tile(v_base, nrows64, vcols, svn, svd, nmask, vmask)
        if HAS_W:
            wx_next = tl.load(w_base + nrows64 * swn, mask=nmask, other=0.0)

        kf = tl.where(rmask[:, None] & cmask[None, :], feature(kx.to(tl.float32), FEATURE), 0.0)
        if HAS_W:
            kf = kf * wx.to(tl.float32)[:, None]
        ksum += mm(tl.trans(kf), ones, DOT_MODE)
        if NEED_VMEAN:
            vsum += mm(tl.trans(vx), ones, DOT_MODE)
        if ROPE:
            kf = rope(kf, rows, angle_ptr, W, D, BD, BN, False)
        acc += mm(tl.trans(kf), vx, DOT_MODE)

        rows = nrows
        rmask = nmask
        kx = kx_next
        vx = vx_next
        if HAS_W:
            wx = wx_next

    s_base = state_ptr + (pid_s % COPIES).to(tl.int64) * copy_stride + pid_bh * (D * DV + D + DV)
    s_ptrs = s_base + cols[:, None] * DV + vcols[None, :]
    smask = cmask[:, None] & vmask[None, :]
    acc = acc * state_scale
    kmean = column0(ksum) * inv_n
    if ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=smask, sem="relaxed")
        tl.atomic_add(s_base + D * DV + cols, kmean, mask=cmask, sem="relaxed")
        if NEED_VMEAN:
            tl.atomic_add(s_base + D * DV + D + vcols, column0(vsum) * inv_n, mask=vmask, sem="relaxed")
    else:
        tl.store(s_ptrs, acc, mask=smask)
        tl.store(s_base + D * DV + cols, kmean, mask=cmask)
        if NEED_VMEAN:
            tl.store(s_base + D * DV + D + vcols, column0(vsum) * inv_n, mask=vmask)


@triton.autotune(configs=autotune_configs("token"),
                 key=["BD", "BDV", "FEATURE", "NORM", "ROPE", "DOT_MODE", "SIZE_CLASS"])
@triton.jit(do_not_specialize=["N", "SIZE_CLASS", "W"])
def _output_kernel(q_ptr, state_ptr, o_ptr, angle_ptr,
                   sqb, sqh, sqn, sqd, sob, soh, son, sod,
                   H, N, SIZE_CLASS, W, scale, eps,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   FEATURE: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                   DOT_MODE: tl.constexpr, PDL: tl.constexpr, BN: tl.constexpr, STRIDED: tl.constexpr):
    pid_bh = tl.program_id(0).to(tl.int64)
    q_base = head_ptr(q_ptr, pid_bh, H, sqb, sqh)
    o_base = head_ptr(o_ptr, pid_bh, H, sob, soh)

    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BDV)
    cmask = cols < D
    vmask = vcols < DV
    count, row_step, row_end, rows = tile_range(N, BN, STRIDED)
    rmask = rows < row_end
    # Pointers are formed once and advanced by the row step (forming 64-bit row offsets for every tile took
    # ~20 more integer instructions per tile).
    q_ptrs = tile_ptrs(q_base, rows, cols, sqn, sqd)
    o_ptrs = tile_ptrs(o_base, rows, vcols, son, sod)
    step = row_step.to(tl.int64)
    qx = load_at(q_ptrs, rmask, cmask)

    # q was written before the state pass began; the state only by it (launched as a dependent, this
    # program may start while the state pass finishes).
    wait_for_previous_pass(PDL)
    s_base = state_ptr + pid_bh * (D * DV + D + DV)
    state = load_tile(s_base, cols, vcols, DV, 1, cmask, vmask)
    if DOT_MODE == 2:
        state = state.to(tl.bfloat16)
    kbar = tl.load(s_base + D * DV + cols, mask=cmask, other=0.0) * scale
    if NORM == 1 or NORM == 2:
        vbar = tl.load(s_base + D * DV + D + vcols, mask=vmask, other=0.0)

    for _ in range(0, count):
        nrows = rows + row_step
        nmask = nrows < row_end
        q_ptrs += step * sqn
        qx_next = load_at(q_ptrs, nmask, cmask)

        # φ(0) ≠ 0 on padded rows and columns needs no mask here: k̄ and the state are zero on padded columns,
        # and padded rows are not stored.
        qf = feature(qx.to(tl.float32), FEATURE)
        z = tl.sum(qf * kbar[None, :], axis=1)
        if ROPE:
            qf = rope(qf, rows, angle_ptr, W, D, BD, BN, False)
        num = mm(qf, state, DOT_MODE)
        if NORM == 0:
            out = num * (1.0 / (z + eps))[:, None]
        elif NORM == 1:
            out = num * (1.0 + 1.0 / (z + eps))[:, None] - z[:, None] * vbar[None, :]
        elif NORM == 2:
            out = num + (1.0 - z)[:, None] * vbar[None, :]
        else:
            out = num
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & vmask[None, :])
        o_ptrs += step * son

        rows = nrows
        rmask = nmask
        qx = qx_next


def state_size(d: int, dv: int) -> int:
    """float32 entries per head of the state buffer: ``S`` (d·dv), ``k̄`` (d), ``v̄`` (dv)."""
    return d * dv + d + dv


def linear_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor],
                         rope_width: int, normalization: str, feature_map: str, scale: float,
                         eps: float) -> Tuple[Tensor, Tensor]:
    """Run both forward passes. Returns ``(out (B, H, N, dv) in v.dtype, state (B·H, d·dv+d+dv) fp32)``.

    ``rope_angle``: ``(d/2,)`` float32 contiguous on q's device, or None; ``rope_width``: grid width.
    """
    mode = dot_mode(q, k, v)

    def state_pass() -> Tensor:
        return forward_state(k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, mode)
    state = state_pass()
    out = forward_output(q, v, state, rope_angle, rope_width, normalization, feature_map, scale, eps, mode,
                         preceding_pass=state_pass)
    return out, state


class _StatePass:
    """Pass 1 for one signature: the state buffer's layout and the kernel call (host work done once)."""

    def __init__(self, k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor],
                 rope_width: int, normalization: str, feature_map: str, scale: float, mode: int):
        bsz, heads, n, d = k.shape
        dv = v.shape[-1]
        bh = bsz * heads
        has_w = key_weights is not None
        splits = reduce_splits(bh, n, k.device)
        self.buffer = ReduceBuffer(bh, state_size(d, dv), splits)
        self.call = KernelCall(_state_kernel, split_grid(bh, n, splits), (
            *k.stride(), *v.stride(), *(key_weights.stride() if has_w else (0, 0, 0)),
            heads, n, size_class(n), max(rope_width, 1), self.buffer.copies, bh * state_size(d, dv), scale / n,
            1.0 / n), dict(
            D=d, DV=dv, BD=block(d), BDV=block(dv), FEATURE=FEATURE_IDS[feature_map], HAS_W=has_w,
            ROPE=rope_angle is not None, NEED_VMEAN=NORMALIZATION_IDS[normalization] in (1, 2), ATOMIC=splits > 1,
            DOT_MODE=mode, **dependent_consts(k.device, second_pass=False)))


class _OutputPass:
    """Pass 2 for one signature: the output's shape and layout (``v``'s, see ``policy.layout_like``) and the
    kernel call."""

    def __init__(self, q: Tensor, v: Tensor, rope_angle: Optional[Tensor], rope_width: int, normalization: str,
                 feature_map: str, scale: float, eps: float, mode: int):
        bsz, heads, n, d = q.shape
        dv = v.shape[-1]
        self.shape = (bsz, heads, n, dv)
        self.strides = layout_like(v)
        self.call = KernelCall(_output_kernel, token_grid(bsz * heads, n, q.device), (
            *q.stride(), *self.strides,
            heads, n, size_class(n), max(rope_width, 1), scale, eps), dict(
            D=d, DV=dv, BD=block(d), BDV=block(dv), FEATURE=FEATURE_IDS[feature_map],
            NORM=NORMALIZATION_IDS[normalization], ROPE=rope_angle is not None, DOT_MODE=mode,
            **dependent_consts(q.device, second_pass=True)))


_STATE_PASSES = PlanCache()
_OUTPUT_PASSES = PlanCache()


def forward_state(k: Tensor, v: Tensor, key_weights: Optional[Tensor], rope_angle: Optional[Tensor], rope_width: int,
                  normalization: str, feature_map: str, scale: float, mode: int) -> Tensor:
    """Pass 1: the fp32 state buffer ``(B·H, d·dv + d + dv)``."""
    key = (tensor_key(k, v, key_weights, rope_angle), rope_width, normalization, feature_map, scale, mode,
           policy_key())
    plan = _STATE_PASSES.get(key) or _STATE_PASSES.put(key, _StatePass(
        k, v, key_weights, rope_angle, rope_width, normalization, feature_map, scale, mode))
    buf = plan.buffer.allocate(k.device)
    plan.call(k, v, key_weights if key_weights is not None else k, rope_angle if rope_angle is not None else k, buf)
    return plan.buffer.total(buf)


def forward_output(q: Tensor, v: Tensor, state: Tensor, rope_angle: Optional[Tensor], rope_width: int,
                   normalization: str, feature_map: str, scale: float, eps: float, mode: int,
                   preceding_pass: Optional[Callable[[], object]] = None) -> Tensor:
    """Pass 2: ``out (B, H, N, dv)`` in ``v.dtype`` and ``v``'s layout (``torch.empty_like(v)``) from q and the
    state. On sm_90+ it is launched as a
    programmatic dependent and reads q before the previous kernel has finished: call it right after
    :func:`forward_state` (q must not be written by the kernel just before it). ``preceding_pass`` (that
    :func:`forward_state` call, on buffers of its own) lets its config be tuned together with it
    (``runtime.tune_after``)."""
    key = (tensor_key(q, v, state, rope_angle), rope_width, normalization, feature_map, scale, eps, mode,
           policy_key())
    plan = _OUTPUT_PASSES.get(key) or _OUTPUT_PASSES.put(key, _OutputPass(
        q, v, rope_angle, rope_width, normalization, feature_map, scale, eps, mode))
    out = torch.empty_strided(plan.shape, plan.strides, device=q.device, dtype=v.dtype)
    plan.call(q, state, out, rope_angle if rope_angle is not None else q, preceding_pass=preceding_pass)
    return out
