"""The linear-attention op (fla-style: kernels beside their PyTorch reference), one module per job.

* ``flags`` — option names ↔ the kernels' ids, and the environment read at import (Triton-free);
* ``naive`` — the PyTorch reference: the ``torch`` backend and the kernels' twins (Triton-free);
* ``policy`` — launch policy: token splits, grids, buffer layouts, dot-operand mode, autotune config lists;
* ``runtime`` — launching: config choice per key (``autotune``), kept compiled kernels launched directly,
  programmatic dependent launches, tuning of second passes;
* ``autotune`` — the configs' modes, defaults and on-disk cache;
* ``jit`` — the ``@triton.jit`` helpers the kernels share (feature maps, in-kernel RoPE, tiles, products);
* ``linear_attn_fwd`` / ``linear_attn_bwd`` — the forward and backward kernels and their host functions;
* ``linear_attn`` — autograd and ``torch.library`` custom ops: :func:`linear_attention_triton`, the
  ``backend="triton"`` path of :func:`linvision.attn.linear_attention`.

The names below are loaded on first use: importing this package, ``flags`` or ``naive`` does not import
Triton; the kernel modules do. Set ``TRITON_INTERPRET=1`` before they are imported to run the kernels on
CPU tensors.
"""
from __future__ import annotations

__all__ = ["linear_attention_triton", "linear_attention_fwd", "linear_attention_bwd", "supports"]


def __getattr__(name: str):
    # Module-level __getattr__ (PEP 562): the kernel modules are imported when one of their names is asked for.
    if name in ("linear_attention_triton", "supports"):
        from . import linear_attn as home
    elif name == "linear_attention_fwd":
        from . import linear_attn_fwd as home
    elif name == "linear_attention_bwd":
        from . import linear_attn_bwd as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(home, name)   # later look-ups are plain attribute reads
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
