"""Triton forward kernel of :func:`linvision.ops.fused_depthwise_conv` and its host function.

One program computes a tile of ``BLOCK_P`` pixels (flattened ``(b, h, w)``, row-major) by ``BLOCK_C``
channels of the channels_last output: for each of the k×k taps it loads the shifted input tile (masked
at the image border, which is the zero padding) and accumulates ``w[c, t] · x`` in
float32; then bias, identity, add, gate, and (``NORM``, one channel block spanning all channels) the
LayerNorm statistics of the rounded result. Neighbouring taps re-read the same lines from L1/L2, so HBM
sees each input about once. Inputs are addressed through their strides (slices of a wider channels_last
tensor are read in place); the output is written dense channels_last.

Launches: the first call for a (shapes, strides, dtypes, options) key compiles through ``JITFunction.run``
and keeps the compiled kernel; later calls with the same key launch it directly
(``linvision.attn.ops.runtime.launch_plain``), a few µs of host time.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..attn.ops.flags import INTERPRETING
from ..attn.ops.runtime import PlanCache, launch_plain, tensor_key

__all__ = ["depthwise_conv_triton", "supports"]



def supports(x: Tensor) -> bool:
    return x.is_cuda or INTERPRETING


@triton.jit
def _depthwise_kernel(
        x_ptr, w_ptr, b_ptr, add_ptr, gate_ptr, nw_ptr, nb_ptr, out_ptr, norm_ptr,
        P, H, W, C,
        sxb, sxc, sxh, sxw,
        swc, swh, sww,
        sab, sac, sah, saw,
        sgb, sgc, sgh, sgw,
        eps,
        K: tl.constexpr, CONV: tl.constexpr, IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_ADD: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    wi = offs_p % W
    rest = offs_p // W
    hi = rest % H
    bi = (rest // H).to(tl.int64)
    x_base = x_ptr + bi[:, None] * sxb + (offs_c * sxc)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # Rows of taps in a loop that is not unrolled, columns unrolled: unrolling all k×k taps lets the
    # compiler issue every tap's load at once, and k² tiles in flight spill registers (30× slower on an H100).
    for kh in tl.range(0, K, loop_unroll_factor=1):
        hh = hi + (kh - K // 2)
        ok_h = mask_p & (hh >= 0) & (hh < H)
        for kw in tl.static_range(K):
            ww = wi + (kw - K // 2)
            ok = ok_h & (ww >= 0) & (ww < W)
            xv = tl.load(x_base + (hh.to(tl.int64) * sxh + ww * sxw)[:, None],
                         mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            if CONV:
                wv = tl.load(w_ptr + offs_c * swc + kh * swh + kw * sww, mask=mask_c, other=0.0).to(tl.float32)
                acc += xv * wv[None, :]
            if IDENTITY:
                if kw == K // 2:
                    if kh == K // 2:
                        acc += xv
    mask = mask_p[:, None] & mask_c[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        a_off = bi[:, None] * sab + (offs_c * sac)[None, :] + (hi.to(tl.int64) * sah + wi * saw)[:, None]
        acc += tl.load(add_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g_off = bi[:, None] * sgb + (offs_c * sgc)[None, :] + (hi.to(tl.int64) * sgh + wi * sgw)[:, None]
        acc = acc * tl.load(gate_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    out_off = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_off, y, mask=mask)
    if NORM:
        # Statistics of the stored (rounded) values, as a separate LayerNorm over this output would see them.
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        mean = tl.sum(yf, axis=1) / C
        diff = tl.where(mask, yf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
        nw = tl.load(nw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        nb = tl.load(nb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        n = diff * rstd[:, None] * nw[None, :] + nb[None, :]
        tl.store(norm_ptr + out_off, n.to(norm_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


TILE_ELEMENTS = 2048   # accumulators per program: 16 per thread at 4 warps
MAX_BLOCK_C = 64       # channels per program without norm


def _blocks(c: int, norm: bool) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): tiles of ``TILE_ELEMENTS`` fp32 accumulators, at most 64 channels wide
    (128 contiguous bytes of bf16 per pixel); with ``norm`` one channel block covers every channel (the
    statistics need the whole row)."""
    block_c = _next_pow2(c) if norm else min(_next_pow2(c), MAX_BLOCK_C)
    block_p = max(TILE_ELEMENTS // block_c, 2)
    return block_p, block_c, 8 if block_p * block_c >= 4096 else 4


_PLANS = PlanCache()


def _strides(t: Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def depthwise_conv_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], *, identity: bool,
                          add: Optional[Tensor], gate: Optional[Tensor],
                          norm: Optional[Tuple[Tensor, Tensor, float]], out_dtype: torch.dtype):
    """Host function (inputs validated by the dispatcher; no autograd). Returns the channels_last output,
    or ``(output, normalised output)`` with ``norm``."""
    if not supports(x):
        raise ValueError(f"the Triton depthwise-conv kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got a {x.device} tensor")
    bsz, c, h, w = x.shape
    k = weight.shape[-1] if weight is not None else 1
    out = torch.empty((bsz, c, h, w), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    norm_out = torch.empty_like(out) if norm is not None else out
    # Absent optional inputs are passed as x (never read: their HAS_* flag is off), so every launch has the
    # same argument kinds and the compiled kernel can be kept.
    w_t = weight if weight is not None else x
    b_t = bias if bias is not None else x
    a_t = add if add is not None else x
    g_t = gate if gate is not None else x
    nw_t, nb_t, eps = (norm[0], norm[1], float(norm[2])) if norm is not None else (x, x, 0.0)
    tensors = (x, w_t, b_t, a_t, g_t, nw_t, nb_t, out, norm_out)
    key = (tensor_key(*tensors), weight is not None, identity, bias is not None, add is not None, gate is not None,
           norm is not None, eps)
    direct = _PLANS.get(key)
    if direct is not None:
        direct(tensors)
    else:
        block_p, block_c, warps = _blocks(c, norm is not None)
        p = bsz * h * w
        grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
        w_strides = (w_t.stride(0), w_t.stride(2), w_t.stride(3)) if weight is not None else (0, 0, 0)
        scalars = (p, h, w, c, *_strides(x), *w_strides,
                   *_strides(a_t), *_strides(g_t), eps)
        consts = dict(K=k, CONV=weight is not None, IDENTITY=identity, HAS_BIAS=bias is not None,
                      HAS_ADD=add is not None, HAS_GATE=gate is not None, NORM=norm is not None,
                      BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
        direct = launch_plain(_depthwise_kernel, grid, tensors, scalars, consts)
        if direct is not None:
            _PLANS.put(key, direct)
    return (out, norm_out) if norm is not None else out
