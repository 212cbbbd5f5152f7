"""Names and ids of the linear-attention op's options, and the environment read when the op is imported.

One table per option: :func:`linvision.attn.linear_attention` validates the names against it, and the
Triton kernels receive the id (their ``NORM``/``FEATURE``/``DOT_MODE`` constexprs branch on these
numbers). Triton-free: importing this module imports neither Triton nor the kernels.
"""
from __future__ import annotations

import os

__all__ = ["NORMALIZATION_IDS", "FEATURE_IDS", "DOT_MODES", "NORMALIZATIONS", "FEATURE_MAPS", "BACKENDS",
           "MAX_HEAD_DIM", "INTERPRETING"]

# name -> the kernels' id; the tuples of names below keep this order.
NORMALIZATION_IDS = {"division": 0, "magnitude_aware": 1, "injective": 2, "none": 3}
FEATURE_IDS = {"identity": 0, "relu": 1, "elu1": 2}
# How the kernels multiply (``policy.dot_mode``): 3×tf32 (≈ fp32), tf32 or bf16 operands.
DOT_MODES = {"tf32x3": 0, "tf32": 1, "bf16": 2}

NORMALIZATIONS = tuple(NORMALIZATION_IDS)
FEATURE_MAPS = tuple(FEATURE_IDS)
BACKENDS = ("torch", "triton")

# Widest head dim (d and dv) the kernels take; wider heads use the reference.
MAX_HEAD_DIM = 128

# Whether the kernels run under Triton's interpreter (CPU tensors). Read once, at import, as Triton
# itself reads it when the kernels are decorated: set it before importing the kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
