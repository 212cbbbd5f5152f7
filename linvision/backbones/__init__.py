"""timm-registered model families (importing this module registers every model)."""
from . import cswin, infvit, inline_deit, linear_pvt_v2, linear_swin, linvit, pvt, qtvit
from .linear_pvt_v2 import LinearPyramidVisionTransformerV2
from .linear_swin import LinearSwinTransformer
from .linvit import LinViT
from .pvt import PyramidVisionTransformer

__all__ = ["LinViT", "LinearSwinTransformer", "PyramidVisionTransformer", "LinearPyramidVisionTransformerV2",
           "cswin", "infvit", "inline_deit", "linear_pvt_v2", "linear_swin", "linvit", "pvt", "qtvit"]
