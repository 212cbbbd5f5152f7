"""timm-registered model families (importing this module registers every model)."""
from . import cswin, linvit, qtvit
from .linvit import LinViT

__all__ = ["LinViT", "linvit"]
