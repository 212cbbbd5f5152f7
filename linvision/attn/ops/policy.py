"""Launch policy of the linear-attention kernels: how a call is cut into programs, and with what.

* token splits: how many programs share a head's token axis (``reduce_splits`` for the reductions, whose
  partial states are added with fp32 atomics into a :class:`ReduceBuffer`; ``token_grid`` for the
  token-parallel passes), and the token-count class ``size_class`` that the autotune keys hold;
* layouts: outputs and gradients take their input's (``layout_like``);
* ``dot_mode``: which operands the tensor-core products take for the input dtypes; ``block``: the register
  block of a head dim;
* ``autotune_configs``: the config list each kernel's ``triton.autotune`` is built with (:mod:`.autotune`).

The module-level settings below are read at each new launch signature (tests and sweeps change them;
``runtime.policy_key`` puts them in the plan keys).
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional

import torch
import triton

from . import autotune
from .flags import DOT_MODES, INTERPRETING

__all__ = ["autotune_configs", "device_properties", "cuda_properties", "num_sms", "cdiv", "reduce_splits",
           "ReduceBuffer", "layout_like", "token_grid", "size_class", "split_grid", "dot_mode", "block"]

# Set by tests to force a number of token splits (exercises the fp32-atomic reduction on tiny inputs).
FORCE_SPLITS: Optional[int] = None
# Reduction (state) kernels: programs per SM aimed at, and fewest tokens per program (keeps the
# fp32 partial-state atomics small relative to the token traffic). 192, not 512: at (8,4,3136,64)
# the state pass takes 14.1 µs with 17 splits against 16.5 µs with 7 (H100, docs/kernels.md).
REDUCE_PROGRAMS_PER_SM = 4
REDUCE_MIN_TOKENS = 192
# Programs adding into one copy of a head's state: more splits than this add into several fp32
# copies (summed afterwards), since atomics on one address serialise.
REDUCE_SPLITS_PER_COPY = 32
# Token-parallel kernels: up to this many programs per SM, each looping over a run of tiles
# (with the next tile's loads issued before the current tile is computed).
TOKEN_PROGRAMS_PER_SM = 4

# Read at import, for experiments: one dot-operand mode for every call (see dot_mode).
_DOT_OVERRIDE = os.environ.get("LINVISION_TRITON_DOT")


def autotune_configs(kind: str) -> List[triton.Config]:
    """Autotune configs for a kernel kind (``"reduce"`` or ``"token"``): the ones ``tune`` mode may benchmark.

    One config (``autotune.fixed_config``) under the interpreter (its autotuner needs a GPU driver to bench)
    or when the kernels are imported with ``LINVISION_TRITON_AUTOTUNE=0`` (fast compiles for tests; its tile
    order from ``LINVISION_TRITON_TILE_ORDER``); otherwise ``autotune.sweep_configs(kind)``, a small sweep
    over the token-tile size ``BN``, warps, pipeline depth and tile order (``STRIDED``, see :func:`tile_range`).
    Which of them runs is chosen per key by :func:`launch` (see :mod:`.autotune`).
    """
    if autotune.IMPORT_MODE == "fixed":
        return [autotune.fixed_config()]
    return autotune.sweep_configs(kind)



@functools.lru_cache(maxsize=None)
def device_properties(device_index: int):
    """``torch.cuda.get_device_properties`` of CUDA device ``device_index``, cached."""
    return torch.cuda.get_device_properties(device_index)


def cuda_properties(device: torch.device):
    """:func:`device_properties` of a CUDA ``device`` (the current one if it has no index)."""
    return device_properties(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1            # interpreter: fewest programs is fastest
    return cuda_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function whose wrapper costs µs per call)."""
    return -(-a // b)


def reduce_splits(bh: int, n: int, device: torch.device) -> int:
    """Programs per head for kernels that reduce over tokens (partial states summed by fp32 atomics)."""
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, n))
    want = cdiv(REDUCE_PROGRAMS_PER_SM * num_sms(device), bh)
    return max(1, min(want, cdiv(n, REDUCE_MIN_TOKENS)))


class ReduceBuffer:
    """Layout of a reduction pass's fp32 buffer for ``splits`` programs per head: ``(copies, B·H, size)``.

    Programs add their partial states into it with fp32 atomics, so it is zeroed when ``splits > 1``;
    more than ``REDUCE_SPLITS_PER_COPY`` programs per head add into several copies (atomics on one address
    serialise), which :meth:`total` sums afterwards."""

    __slots__ = ("copies", "shape", "zeroed")

    def __init__(self, bh: int, size: int, splits: int):
        self.copies = 1 if splits == 1 else cdiv(splits, REDUCE_SPLITS_PER_COPY)
        self.shape = (self.copies, bh, size)
        self.zeroed = splits > 1

    def allocate(self, device: torch.device) -> torch.Tensor:
        return (torch.zeros if self.zeroed else torch.empty)(self.shape, device=device, dtype=torch.float32)

    def total(self, buf: torch.Tensor) -> torch.Tensor:
        """The reduced ``(B·H, size)`` state: copy 0, or the sum of the copies."""
        return buf[0] if self.copies == 1 else buf.sum(0)


def layout_like(t: torch.Tensor) -> tuple:
    """Strides of ``torch.empty_like(t)`` (PyTorch's ``preserve_format`` rule): t's own when t is dense, else dense
    strides in t's dimension order. The kernels write outputs and gradients in this layout: for a ``(B, H, N, d)``
    view of a projection's output (``(B, N, H, d)`` or ``(B, H, d, N)`` in memory), the way back to tokens
    (``transpose(1, 2).reshape(B, N, C)``, ``transpose(-1, -2).reshape(B, C, H, W)``) is then a view, not a copy."""
    return torch.empty_like(t, device="meta").stride()


def token_grid(bh: int, n: int, device: torch.device):
    """Grid of a token-parallel kernel: ``(B·H, splits)``, at most one program per ``BN`` tokens."""
    if FORCE_SPLITS is not None:
        want = FORCE_SPLITS
    else:
        want = cdiv(TOKEN_PROGRAMS_PER_SM * num_sms(device), bh)
    return split_grid(bh, n, want)


def size_class(n: int) -> int:
    """Token-count class that the autotune keys include (``SIZE_CLASS``): 0 for N ≤ 1024, 1 to 8192, 2 to
    65536, 3 above. Configs are tuned per class, not per N (one sweep per class, not per resolution): the
    best tile order and size differ between N = 3136 and N = 50176 (docs/kernels.md)."""
    return 0 if n <= 1024 else 1 if n <= 8192 else 2 if n <= 65536 else 3


def split_grid(bh: int, n: int, splits: int):
    """Grid ``(B·H, programs per head)``: ``splits`` programs per head, but no more than one per ``BN`` tokens."""
    return lambda meta: (bh, max(1, min(splits, cdiv(n, meta["BN"]))))


def dot_mode(*tensors: torch.Tensor) -> int:
    """How the kernels multiply: bf16 operands for bf16 inputs (what the inputs carry anyway); tf32
    operands for fp16 inputs (fp16's range cannot hold every w·φ(k) product); 3×tf32 (≈ fp32) for
    fp32 inputs and under the interpreter (whose bf16 ``tl.dot`` is wrong). fp32 accumulation always.
    ``LINVISION_TRITON_DOT`` (tf32x3 | tf32 | bf16, read at import) overrides, for experiments."""
    if INTERPRETING:
        return DOT_MODES["tf32x3"]
    if _DOT_OVERRIDE:
        return DOT_MODES[_DOT_OVERRIDE]
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.bfloat16}:
        return DOT_MODES["bf16"]
    if torch.float32 in dtypes:
        return DOT_MODES["tf32x3"]
    return DOT_MODES["tf32"]


def block(dim: int) -> int:
    """Register block for a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (dim - 1).bit_length())
