"""``@triton.jit`` helpers shared by the forward and backward kernels.

* ``feature``/``feature_grad``: the elementwise feature maps φ (ids in :mod:`.flags`: 0 identity, 1 relu,
  2 elu1 = ELU+1) and their derivatives, in float32;
* ``rope``: numerator-only 2-D RoPE computed in-kernel from the ``(d/2,)`` angle buffer and the grid width
  (no sin/cos tables in HBM); ``INVERSE`` applies ``Rᵀ`` (for gradients);
* ``mm``: tensor-core products with the dot-operand mode of ``policy.dot_mode``;
* tiles: ``tile_range`` (a program's run of token tiles, contiguous or strided), ``head_ptr``/``tile_ptrs``,
  masked loads, and the one-hot row/column forms of weighted sums on the tensor cores;
* ``start_next_pass``/``wait_for_previous_pass``: the in-kernel side of programmatic dependent launches
  (``runtime.DEPENDENT_LAUNCH``; no-ops without it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .flags import INTERPRETING
from .runtime import DEPENDENT_LAUNCH

__all__ = ["start_next_pass", "wait_for_previous_pass", "mm", "tile_range", "head_ptr", "tile_ptrs", "load_at",
           "load_tile", "first_column", "column0", "in_first_row", "row0", "feature", "feature_grad", "rope"]

if DEPENDENT_LAUNCH:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start_next_pass(PDL: tl.constexpr):
        """Let the next kernel (a second pass launched as a programmatic dependent) start its programs
        once every program of this one has begun: they fill SMs as this pass's programs finish."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_previous_pass(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible (no-op unless ``PDL``)."""
        if PDL:
            gdc_wait()
else:
    @triton.jit
    def start_next_pass(PDL: tl.constexpr):
        pass

    @triton.jit
    def wait_for_previous_pass(PDL: tl.constexpr):
        pass


@triton.jit
def mm(a, b, DOT_MODE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands as ``DOT_MODE`` says (see :func:`dot_mode`)."""
    if DOT_MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_MODE == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return out


@triton.jit
def tile_range(N, BN: tl.constexpr, STRIDED: tl.constexpr):
    """This program's share of the ``cdiv(N, BN)`` token tiles of a head, split over grid axis 1's S programs.

    Contiguous (``STRIDED`` False): program s takes a run of adjacent tiles. Strided: program s takes tiles
    s, s+S, s+2S, … — a head's S programs then stream adjacent tiles at the same time, which DRAM serves
    faster for the long reductions (state pass 42.4 → 38.6 µs at (2,4,50176,64), H100, docs/kernels.md) but
    not at every shape, so the autotuner chooses. Returns ``(tile count, row step, end row, token indices of
    the first tile)``; rows at or past the end row are masked.
    """
    n_tiles = tl.cdiv(N, BN)
    if STRIDED:
        first = tl.program_id(1)
        count = tl.cdiv(n_tiles - first, tl.num_programs(1))
        row_step = tl.num_programs(1) * BN
        row_end = N
    else:
        per = tl.cdiv(n_tiles, tl.num_programs(1))
        first = tl.program_id(1) * per
        last = tl.minimum(first + per, n_tiles)
        count = last - first
        row_step = BN
        row_end = tl.minimum(last * BN, N)
    return count, row_step, row_end, first * BN + tl.arange(0, BN)


@triton.jit
def head_ptr(ptr, pid_bh, H, stride_b, stride_h):
    """Pointer to head ``pid_bh`` (= b·H + h) of a ``(B, H, ...)`` tensor with batch/head strides."""
    return ptr + (pid_bh // H) * stride_b + (pid_bh % H) * stride_h


@triton.jit
def tile_ptrs(base, rows, cols, stride_row, stride_col):
    """``(rows, cols)`` pointers into one head (int64 row offsets: they can pass 2³¹); loops advance them by a
    scalar row step rather than forming them again per tile."""
    return base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def load_at(ptrs, rmask, cmask):
    """Masked 2-D tile at pointers formed by :func:`tile_ptrs` (and advanced by a loop), zeros outside
    ``rmask × cmask``."""
    return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, rmask, cmask):
    """Masked 2-D tile ``base[rows, cols]`` (addressed as :func:`tile_ptrs`), zeros outside ``rmask × cmask``."""
    return load_at(tile_ptrs(base, rows, cols, stride_row, stride_col), rmask, cmask)


@triton.jit
def first_column(BN: tl.constexpr):
    """``(BN, 16)`` float32 with ones in column 0: ``xᵀ @ first_column`` sums x over its rows on the
    tensor cores, without the cross-warp reduction (and barrier) of ``tl.sum`` in every tile."""
    return (tl.arange(0, 16)[None, :] == 0).to(tl.float32) + tl.zeros((BN, 16), dtype=tl.float32)


@triton.jit
def column0(x):
    """Column 0 of a ``(M, 16)`` accumulator, as an ``(M,)`` vector."""
    return tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, x, 0.0), axis=1)


@triton.jit
def in_first_row(x):
    """``(16, BN)`` with the ``(BN,)`` vector x in row 0, zeros elsewhere: row 0 of ``in_first_row(γ) @ y`` is
    ``Σ_i γ_i y_i``, the weighted row sum with y as the product's second operand, as computed (no transpose)."""
    return tl.where(tl.arange(0, 16)[:, None] == 0, x[None, :], 0.0)


@triton.jit
def row0(x):
    """Row 0 of a ``(16, M)`` accumulator, as an ``(M,)`` vector."""
    return tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, x, 0.0), axis=0)


@triton.jit
def feature(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        x = tl.maximum(x, 0.0)
    elif FEATURE == 2:
        x = tl.where(x > 0, x + 1.0, _exp(x))
    return x


@triton.jit
def feature_grad(x, FEATURE: tl.constexpr):
    """dφ/dx (relu: 0 at x = 0, as torch's relu backward)."""
    if FEATURE == 0:
        g = tl.full(x.shape, 1.0, tl.float32)
    elif FEATURE == 1:
        g = tl.where(x > 0, 1.0, 0.0)
    else:
        g = tl.where(x > 0, 1.0, _exp(x))
    return g


if INTERPRETING:
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _sin(x):
        return tl.sin(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)
else:
    # exp as one multiply and the SFU's ex2 with denormal results flushed to zero (exp(x) < 1.2e-38, x < -87):
    # ``tl.exp`` lowers to the non-ftz ex2.approx, which ptxas wraps in a range test, two multiplies and a
    # select per element, the largest share of the elementwise instructions of the ELU+1 kernels.
    @triton.jit
    def _exp(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", constraints="=f,f",
                                         args=[x * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1)

    # The SFU's sin/cos (max abs error ~5e-7 on [-π, π]); ``tl.sin`` would lower to libdevice's
    # full-range sinf, several times the instructions. The interpreter cannot run inline PTX.
    @triton.jit
    def _sin(x):
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", constraints="=f,f", args=[x],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _cos(x):
        return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", constraints="=f,f", args=[x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rope(x, rows, angle_ptr, width, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
         INVERSE: tl.constexpr):
    """Rotate adjacent channel pairs of ``x`` (``(BN, BD)`` float32, token indices ``rows``).

    Token ``t = y*width + x``; pair ``(2m, 2m+1)`` turns by ``y*angle[2m]`` when ``2m < D/2`` and by
    ``x*angle[2m - D/2]`` otherwise (linvision.attn.rope). The fp32 product ``pos*angle`` is the
    same as the reference tables'; it is reduced to [-π, π] (Cody-Waite, 2π = C1 + C2 with C1 exact
    in few bits) so that the hardware (SFU) sin/cos stay accurate for large positions.
    """
    m = tl.arange(0, BD // 2)
    c = 2 * m
    is_row = c < D // 2
    idx = tl.where(is_row, c, c - D // 2)
    ang = tl.load(angle_ptr + idx, mask=c < D, other=0.0).to(tl.float32)
    ypos = (rows // width).to(tl.float32)
    xpos = (rows % width).to(tl.float32)
    pos = tl.where(is_row[None, :], ypos[:, None], xpos[:, None])
    theta = pos * ang[None, :]
    turns = tl.floor(theta * 0.15915494309189535 + 0.5)
    r = (theta - turns * 6.28125) - turns * 0.0019353071795864769
    cs = _cos(r)
    sn = _sin(r)
    if INVERSE:
        sn = -sn
    xe, xo = tl.split(tl.reshape(x, (BN, BD // 2, 2)))
    re = xe * cs - xo * sn
    ro = xo * cs + xe * sn
    return tl.reshape(tl.join(re, ro), (BN, BD))
