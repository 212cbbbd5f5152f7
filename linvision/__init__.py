"""linvision: linear-attention vision backbones for timm.

``import linvision`` registers every model with timm, e.g. ``timm.create_model("linvit_b")``.
"""
from . import attn, backbones

__version__ = "0.1.0"
__all__ = ["attn", "backbones", "__version__"]
