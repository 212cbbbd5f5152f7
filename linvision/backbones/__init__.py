"""timm-registered model families (importing this module registers every model)."""
from . import cswin, infvit, inline_deit, linear_swin, linvit, qtvit
from .linear_swin import LinearSwinTransformer
from .linvit import LinViT

__all__ = ["LinViT", "LinearSwinTransformer", "cswin", "infvit", "inline_deit", "linear_swin", "linvit", "qtvit"]
