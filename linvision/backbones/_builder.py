"""What every model family in :mod:`linvision.backbones` builds with.

:func:`build_model_with_cfg` is timm's builder of the same name and signature; families import it
from here, not from timm, so that every ``pretrained=True`` load goes through one place.
:func:`unwrap_checkpoint` (from :mod:`linvision.serialization`) picks the weights out of a
training-checkpoint container; :func:`rename_key` applies a filter's regex key map.
"""
from __future__ import annotations

import re
from typing import Sequence, Tuple

from timm.models import build_model_with_cfg as _timm_build_model_with_cfg

from ..serialization import unwrap_checkpoint   # the families' checkpoint filters take it from here

__all__ = ["build_model_with_cfg", "unwrap_checkpoint", "rename_key"]


def rename_key(key: str, renames: Sequence[Tuple[str, str]]) -> str:
    """``key`` after each ``(pattern, replacement)`` regex substitution in turn (a checkpoint
    filter's official → linvision key map)."""
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def build_model_with_cfg(model_cls, variant: str, pretrained: bool, **kwargs):
    """timm's ``build_model_with_cfg`` (same arguments), with every pretrained load made safe.

    With ``pretrained=True`` the weights are read by :func:`linvision.pretrained.resolve_pretrained`
    (safetensors or an allow-listed ``weights_only`` unpickling, checked against any known sha256;
    the cache or a verified download when no file is given) and handed to timm as the
    ``state_dict`` entry of the pretrained cfg, so timm's own file/URL readers never run. The family's
    ``pretrained_filter_fn`` receives the whole checkpoint (containers included).
    """
    if not pretrained:
        return _timm_build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    from ..pretrained import resolve_pretrained

    overlay = resolve_pretrained(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if overlay is not None:
        kwargs["pretrained_cfg_overlay"] = overlay
    model = _timm_build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    if overlay is not None:
        # timm keeps the cfg on the model: drop the checkpoint from it so that it can be freed.
        for module in model.modules():
            cfg = getattr(module, "pretrained_cfg", None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)
    return model
