"""timm-registered model families (importing this module registers every model)."""
from . import inline_deit, linvit
from .linvit import LinViT

__all__ = ["LinViT", "inline_deit", "linvit"]
