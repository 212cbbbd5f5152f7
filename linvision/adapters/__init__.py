"""Dense-prediction adapters: linvision backbones in torchvision and mmdet/mmseg models.

* :mod:`linvision.adapters.dense` — :class:`DenseBackbone`, the shared trunk (timm
  ``features_only`` + official per-stage output norms, ``frozen_stages``, ``norm_eval``, official
  dense/classification checkpoint loading with a key report).
* :mod:`linvision.adapters.torchvision` — Faster/Mask R-CNN, RetinaNet, FCOS builders and Semantic
  FPN / UPerNet segmentation models (pure PyTorch + torchvision).
* :mod:`linvision.adapters.mm` — ``LinVisionBackbone`` in mmengine's root ``MODELS`` registry for
  mmdet 3.x / mmseg 1.x configs (needs only mmengine to import; not imported here).

See docs/dense.md.
"""
from .dense import DenseBackbone, LoadReport, read_checkpoint
from .torchvision import (FPNBackbone, SegmentationModel, fasterrcnn, fcos, maskrcnn, retinanet, segmentation_loss,
                          semantic_fpn, upernet)

__all__ = [
    "DenseBackbone", "LoadReport", "read_checkpoint", "FPNBackbone", "SegmentationModel", "fasterrcnn", "fcos",
    "maskrcnn", "retinanet", "segmentation_loss", "semantic_fpn", "upernet",
]
