"""Names and ids of the linear-attention op's options, the environment read when the op is imported, and
when a kernel may run.

One table per option: :func:`linvision.attn.linear_attention` validates the names against it, and the
Triton kernels receive the id (their ``NORM``/``FEATURE``/``DOT_MODE`` constexprs branch on these
numbers). :func:`under_dispatch_mode` says when no kernel may run, :func:`records_grad` when a call needs
its backward (the Triton kernels of ``linvision.ops`` ask both too). Triton-free: importing this module
imports neither Triton nor the kernels.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["NORMALIZATION_IDS", "FEATURE_IDS", "DOT_MODES", "NORMALIZATIONS", "FEATURE_MAPS", "BACKENDS",
           "MAX_HEAD_DIM", "INTERPRETING", "records_grad", "under_dispatch_mode"]

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


def under_dispatch_mode() -> bool:
    """Whether a Python dispatch mode runs the ops now (fake tensors, the FLOP counter, ...), outside
    ``torch.compile`` (which takes the kernels through their custom ops). The Triton kernels need real
    memory there, and the counter sees PyTorch's ops but not a Triton kernel, so code that chooses a
    backend takes the PyTorch one, and nothing derived from parameters is kept."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is not None


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an op on these tensors (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
