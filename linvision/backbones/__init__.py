"""timm-registered model families (importing this module registers every model)."""
from . import linear_swin, linvit
from .linear_swin import LinearSwinTransformer
from .linvit import LinViT

__all__ = ["LinViT", "LinearSwinTransformer", "linear_swin", "linvit"]
