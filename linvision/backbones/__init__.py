"""timm-registered model families (importing this module registers every model)."""
from . import linvit
from . import cswin  # noqa: F401  (registers flatten_cswin_* and inline_cswin_*)
from .linvit import LinViT

__all__ = ["LinViT", "linvit"]
