"""timm-registered model families (importing this module registers every model)."""
from . import infvit, inline_deit, linvit
from .linvit import LinViT

__all__ = ["LinViT", "infvit", "inline_deit", "linvit"]
