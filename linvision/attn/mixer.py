"""The token-mixer interface that every mechanism module implements (the entries of ``linvision.attn.MIXERS``).

A token mixer maps per-head projections to per-head outputs; the host model owns the projections, the
layouts and any positional encoding it builds (the RoPE grid). The contract:

* construction: ``cls(dim, num_heads, **options)``. ``dim`` channels split over ``num_heads`` heads; the
  options are the constructor's keyword-only arguments (:meth:`TokenMixer.options`), the same names a model
  takes in its ``attn_kwargs`` (``timm.create_model("linvit_b_focused", attn_kwargs=dict(focusing_power=4))``).
  Linear mixers take ``backend`` among them;
* ``uses_rope`` (class attribute): whether ``forward`` uses the ``rope`` grid; hosts pass it only then;
* ``backend``: the :func:`linvision.attn.linear_attention` backend of its core calls (``"auto"``, ``"torch"``
  or ``"triton"``); ``"sdpa"`` for :class:`~linvision.attn.SoftmaxAttention`, which has no linear core;
* ``forward(q, k, v, *, hw, rope=None, token_mean=None)``: ``q, k, v`` ``(B, heads, N, head_dim)`` with
  ``N = prefix tokens + H·W`` for the token grid ``hw = (H, W)``; ``rope`` a :class:`~linvision.attn.RopeGrid`
  or None; ``token_mean`` ``(B, dim)``, the mean over tokens of the attention input, for the mixers that
  predict something from it (InLine's local kernels; the others ignore it). Returns ``(B, heads, N, head_dim)``.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Tuple

from torch import nn

__all__ = ["TokenMixer"]


class TokenMixer(nn.Module):
    """Base class of the mechanism modules: declares the interface above and checks option names."""

    uses_rope: bool = False
    backend: str = "auto"

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        """The option names the constructor takes (its keyword-only arguments), in signature order."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], name: Optional[str] = None) -> None:
        """Raise ``TypeError`` (one line, naming the mechanism and its options) unless every key of ``options``
        is one of :meth:`options`. ``name``: the mechanism's key in ``MIXERS``, for the message."""
        unknown = [k for k in options if k not in cls.options()]
        if unknown:
            label = f"{name!r} attention ({cls.__name__})" if name else cls.__name__
            accepted = ", ".join(cls.options()) or "none"
            raise TypeError(f"{label} has no option {', '.join(map(repr, unknown))}; its options are: {accepted}")
