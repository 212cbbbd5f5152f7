"""The shared linear-attention core and one token-mixer module per mechanism.

``linear_attention`` is the single functional entry point (see :mod:`linvision.attn.core`);
``tune(model, x)`` benchmarks the Triton kernels' configs for a model and caches them on disk
(:mod:`linvision.attn.tuning`);
``MIXERS`` maps a mechanism name to its token-mixer class, a :class:`TokenMixer` (the interface, in
:mod:`linvision.attn.mixer`): built as ``cls(dim, num_heads, **options)`` (``create_mixer`` checks the option
names), called as ``mixer(q, k, v, hw=(H, W), rope=RopeGrid|None, token_mean=None)`` on
``(B, heads, N, head_dim)`` tensors, returning ``(B, heads, N, head_dim)``; ``mixer.uses_rope`` says whether it
uses ``rope``, ``mixer.backend`` which backend its core calls take.
"""
from typing import Dict, Type

from .core import BACKENDS, FEATURE_MAPS, NORMALIZATIONS, linear_attention
from .focused import FocusedLinearAttention
from .infsa import InfiniteSelfAttention
from .inline import InjectiveLinearAttention
from .mala import MagnitudeAwareLinearAttention
from .mirror import MirrorLinearAttention
from .mixer import TokenMixer
from .qt_taylor import QuadraticTaylorAttention
from .rala import RankAugmentedLinearAttention, global_query_key_weights
from .rope import Rope2d, RopeGrid, apply_rope, rope_angle, rope_tables
from .softmax import SoftmaxAttention
from .tuning import tune

MIXERS: Dict[str, Type[TokenMixer]] = {
    "mala": MagnitudeAwareLinearAttention,
    "rala": RankAugmentedLinearAttention,
    "softmax": SoftmaxAttention,
    "focused": FocusedLinearAttention,
    "inline": InjectiveLinearAttention,
    "qt": QuadraticTaylorAttention,
    "mirror": MirrorLinearAttention,
    "infsa": InfiniteSelfAttention,
}


def create_mixer(name: str, dim: int, num_heads: int, **options) -> TokenMixer:
    """Build the token mixer registered under ``name`` (one of ``MIXERS``) with ``options`` (its keyword-only
    constructor arguments, ``MIXERS[name].options()``); an unknown option is a one-line ``TypeError`` naming
    the mechanism and the options it takes."""
    if name not in MIXERS:
        raise ValueError(f"unknown attention {name!r}; expected one of {sorted(MIXERS)}")
    MIXERS[name].check_options(options, name)
    return MIXERS[name](dim, num_heads, **options)


__all__ = [
    "linear_attention", "tune", "NORMALIZATIONS", "FEATURE_MAPS", "BACKENDS", "MIXERS", "create_mixer", "TokenMixer",
    "MagnitudeAwareLinearAttention", "RankAugmentedLinearAttention", "SoftmaxAttention",
    "FocusedLinearAttention", "InjectiveLinearAttention", "QuadraticTaylorAttention", "MirrorLinearAttention",
    "InfiniteSelfAttention",
    "global_query_key_weights", "Rope2d", "RopeGrid", "apply_rope", "rope_angle", "rope_tables",
]
