"""timm-registered model families (importing this module registers every model)."""
from . import linear_pvt_v2, linvit, pvt
from .linear_pvt_v2 import LinearPyramidVisionTransformerV2
from .linvit import LinViT
from .pvt import PyramidVisionTransformer

__all__ = ["LinViT", "PyramidVisionTransformer", "LinearPyramidVisionTransformerV2", "linvit", "pvt",
           "linear_pvt_v2"]
