"""timm-registered model families (importing this module registers every model)."""
from . import cswin, infvit, inline_deit, linvit, qtvit
from .linvit import LinViT

__all__ = ["LinViT", "cswin", "infvit", "inline_deit", "linvit", "qtvit"]
