"""What every model family in :mod:`linvision.backbones` builds with.

:func:`build_model_with_cfg` is timm's builder of the same name and signature; families import it
from here, not from timm, so that every ``pretrained=True`` load goes through one place.
:func:`unwrap_checkpoint` picks the weights out of a training-checkpoint container.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from timm.models import build_model_with_cfg as _timm_build_model_with_cfg

__all__ = ["build_model_with_cfg", "unwrap_checkpoint"]

# Container keys of the training scripts the official releases come from, weights first, EMA last.
RAW_KEYS = ("model", "state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")


def unwrap_checkpoint(checkpoint: Mapping[str, Any], prefer_ema: bool = False,
                      keys: Sequence[str] = ()) -> Dict[str, Any]:
    """The state dict inside a checkpoint container, or the checkpoint itself when it is one.

    Args:
        checkpoint: a plain state dict or a container such as ``{'model': sd, 'optimizer': ...,
            'state_dict_ema': sd_ema}``.
        prefer_ema: look at the EMA entries (``state_dict_ema``, ``model_ema``, ``ema``) before the
            raw ones (``model``, ``state_dict``); either way the other kind is the fallback.
        keys: extra container keys to try first (a family's own layout).
    """
    order = tuple(keys) + (EMA_KEYS + RAW_KEYS if prefer_ema else RAW_KEYS + EMA_KEYS)
    for key in order:
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and value:
            return dict(value)
    return dict(checkpoint)


def build_model_with_cfg(model_cls, variant: str, pretrained: bool, **kwargs):
    """timm's ``build_model_with_cfg`` (same arguments)."""
    return _timm_build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
