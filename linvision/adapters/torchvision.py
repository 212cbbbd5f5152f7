"""torchvision detection and segmentation models on linvision (or any timm) backbones.

Detection: :func:`fasterrcnn`, :func:`maskrcnn`, :func:`retinanet` and :func:`fcos` build
torchvision's own detectors around :class:`FPNBackbone` (a :class:`~.dense.DenseBackbone` + FPN).
They take torchvision's keyword arguments (``num_classes``, ``min_size``, ``max_size``, ``rpn_*``,
``box_*`` …) plus the backbone options in :data:`BACKBONE_OPTIONS`::

    import linvision
    from linvision.adapters.torchvision import maskrcnn
    model = maskrcnn("mavit_s", num_classes=81, checkpoint="MAViT_S.pth", frozen_stages=1)

Faster/Mask R-CNN use stages (0, 1, 2, 3) + a max-pooled P6 (torchvision's ``LastLevelMaxPool``);
RetinaNet/FCOS use stages (1, 2, 3) + P6/P7 (``LastLevelP6P7(256, 256)``), as torchvision's ResNet-50
versions do. Anchor sizes and RoI poolers follow the FPN levels actually built (for the default
``out_indices`` they equal torchvision's defaults), so other ``out_indices`` work too.

Segmentation: :func:`semantic_fpn` (Panoptic-FPN's semantic branch) and :func:`upernet` (UPerNet:
pyramid pooling + FPN fusion) return torchvision-style ``OrderedDict(out=logits[, aux=logits])``,
both upsampled bilinearly to the input size; :func:`segmentation_loss` combines them.

Every model accepts any input size (the FPNs resize by target shape, never by a fixed factor).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool,
                                                     LastLevelP6P7)

from .dense import DenseBackbone

__all__ = [
    "BACKBONE_OPTIONS", "FPNBackbone", "fpn_backbone", "fasterrcnn", "maskrcnn", "retinanet", "fcos",
    "SemanticFPNHead", "UPerHead", "SegmentationModel", "semantic_fpn", "upernet", "segmentation_loss",
]

# Keyword arguments the builders route to the backbone; everything else goes to torchvision.
BACKBONE_OPTIONS = ("pretrained", "pretrained_file", "checkpoint", "checkpoint_prefix", "out_indices", "out_norms",
                    "frozen_stages", "norm_eval", "fpn_channels", "model_kwargs")


class FPNBackbone(nn.Module):
    """``DenseBackbone`` + torchvision ``FeaturePyramidNetwork``: what torchvision detectors expect.

    ``forward(x)`` returns ``OrderedDict`` ``'0'…'n-1'`` (one per ``out_indices`` entry, strides
    ``strides``) plus the extra block's keys (``'pool'`` or ``'p6', 'p7'``), each with
    ``out_channels`` channels. Attributes ``body`` (the DenseBackbone) and ``fpn`` as in
    torchvision's ``BackboneWithFPN``, whose ``IntermediateLayerGetter`` cannot reach timm stages.
    """

    def __init__(self, model_name: str, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, **backbone_kwargs):
        super().__init__()
        self.body = DenseBackbone(model_name, **backbone_kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels
        self.level_names: List[str] = [str(i) for i in range(len(self.body.channels))]
        strides = list(self.body.strides)
        if isinstance(extra_blocks, LastLevelMaxPool):
            strides.append(strides[-1] * 2)
        elif isinstance(extra_blocks, LastLevelP6P7):
            strides += [strides[-1] * 2, strides[-1] * 4]
        self.strides: List[int] = strides  # of every returned level, extra levels included

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict(zip(self.level_names, feats)))


def fpn_backbone(model_name: str, *, out_indices: Sequence[int] = (0, 1, 2, 3), fpn_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None, model_kwargs: Optional[Dict] = None,
                 **backbone_kwargs) -> FPNBackbone:
    """An :class:`FPNBackbone`; ``model_kwargs`` go to ``timm.create_model``, the rest to DenseBackbone."""
    return FPNBackbone(model_name, out_channels=fpn_channels, extra_blocks=extra_blocks, out_indices=out_indices,
                       **backbone_kwargs, **(model_kwargs or {}))


def _split(kwargs: Dict, out_indices: Sequence[int]) -> Tuple[Dict, Dict]:
    backbone = {k: kwargs.pop(k) for k in BACKBONE_OPTIONS if k in kwargs}
    backbone.setdefault("out_indices", tuple(out_indices))
    return backbone, kwargs


def _normalisation(backbone: FPNBackbone, kwargs: Dict) -> None:
    # GeneralizedRCNNTransform normalises; use the backbone's pretraining statistics by default.
    cfg = backbone.body.pretrained_cfg
    if "mean" in cfg and "std" in cfg:
        kwargs.setdefault("image_mean", list(cfg["mean"]))
        kwargs.setdefault("image_std", list(cfg["std"]))


def fasterrcnn(model_name: str, num_classes: Optional[int] = 91, **kwargs) -> FasterRCNN:
    """torchvision ``FasterRCNN`` on ``model_name``: stages (0,1,2,3) → FPN + P6 max-pool (5 levels).

    Backbone options (:data:`BACKBONE_OPTIONS`) are those of :class:`~.dense.DenseBackbone` plus
    ``fpn_channels`` (256) and ``model_kwargs`` (for ``timm.create_model``); all other keyword
    arguments are torchvision's (``min_size``, ``max_size``, ``rpn_*``, ``box_*``, …).
    Anchors: one size ``8 × stride`` per level × ratios (0.5, 1, 2) (= torchvision's 32…512).
    """
    bb_kwargs, kwargs = _split(kwargs, (0, 1, 2, 3))
    backbone = fpn_backbone(model_name, extra_blocks=LastLevelMaxPool(), **bb_kwargs)
    _rcnn_defaults(backbone, kwargs)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def _rcnn_defaults(backbone: FPNBackbone, kwargs: Dict, mask: bool = False) -> None:
    _normalisation(backbone, kwargs)
    strides = backbone.strides
    kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(
        tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides)))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(backbone.level_names, output_size=7, sampling_ratio=2))
    if mask:
        kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(backbone.level_names, output_size=14, sampling_ratio=2))


def maskrcnn(model_name: str, num_classes: Optional[int] = 91, **kwargs) -> MaskRCNN:
    """torchvision ``MaskRCNN`` on ``model_name``; options as :func:`fasterrcnn`."""
    bb_kwargs, kwargs = _split(kwargs, (0, 1, 2, 3))
    backbone = fpn_backbone(model_name, extra_blocks=LastLevelMaxPool(), **bb_kwargs)
    _rcnn_defaults(backbone, kwargs, mask=True)
    return MaskRCNN(backbone, num_classes=num_classes, **kwargs)


def retinanet(model_name: str, num_classes: Optional[int] = 91, **kwargs) -> RetinaNet:
    """torchvision ``RetinaNet`` on ``model_name``: stages (1,2,3) → FPN + P6/P7 (from P5).

    Anchors: ``4 × stride × 2^{0, 1/3, 2/3}`` × ratios (0.5, 1, 2) per level (= torchvision's).
    Options as :func:`fasterrcnn`.
    """
    bb_kwargs, kwargs = _split(kwargs, (1, 2, 3))
    ch = bb_kwargs.get("fpn_channels", 256)
    backbone = fpn_backbone(model_name, extra_blocks=LastLevelP6P7(ch, ch), **bb_kwargs)
    _normalisation(backbone, kwargs)
    strides = backbone.strides
    kwargs.setdefault("anchor_generator", AnchorGenerator(
        tuple(tuple(int(4 * s * 2 ** (i / 3)) for i in range(3)) for s in strides), ((0.5, 1.0, 2.0),) * len(strides)))
    return RetinaNet(backbone, num_classes=num_classes, **kwargs)


def fcos(model_name: str, num_classes: Optional[int] = 91, **kwargs) -> FCOS:
    """torchvision ``FCOS`` on ``model_name``: stages (1,2,3) → FPN + P6/P7; one point per location
    (anchor size = stride, as torchvision). Options as :func:`fasterrcnn`."""
    bb_kwargs, kwargs = _split(kwargs, (1, 2, 3))
    ch = bb_kwargs.get("fpn_channels", 256)
    backbone = fpn_backbone(model_name, extra_blocks=LastLevelP6P7(ch, ch), **bb_kwargs)
    _normalisation(backbone, kwargs)
    strides = backbone.strides
    kwargs.setdefault("anchor_generator", AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides)))
    return FCOS(backbone, num_classes=num_classes, **kwargs)


# ---------------------------------------------------------------------------------- segmentation
def _conv_norm_act(cin: int, cout: int, k: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), norm_layer(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., Panoptic FPN; mmseg ``FPN`` neck + ``FPNHead``).

    An FPN (``fpn_channels``) over the backbone maps; each level goes through
    ``max(1, log2(s_i / s_0))`` × (3×3 conv-norm-ReLU, 2× bilinear upsampling) to the finest level,
    the levels are summed, then dropout + 1×1 classifier. Output ``(B, num_classes, H/s_0, W/s_0)``.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 fpn_channels: int = 256, channels: int = 128, dropout: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList()
        for s in strides:
            n = max(1, int(round(math.log2(s / strides[0]))))
            self.scale_heads.append(nn.ModuleList(
                [_conv_norm_act(fpn_channels if j == 0 else channels, channels, 3, norm_layer) for j in range(n)]))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        out = None
        for level, (x, convs) in enumerate(zip(pyramid, self.scale_heads)):
            for j, conv in enumerate(convs):
                x = conv(x)
                if level > 0:
                    # 2x per step, the last step lands exactly on the finest grid (odd sizes included).
                    last = j == len(convs) - 1
                    size = pyramid[0].shape[-2:] if last else pyramid[level - j - 1].shape[-2:]
                    x = _resize(x, size, self.align_corners)
            out = x if out is None else out + x
        return self.classifier(self.dropout(out))


class UPerHead(nn.Module):
    """UPerNet head (Xiao et al. 2018; mmseg ``UPerHead``): PPM on the coarsest map, FPN top-down
    fusion, all levels resized to the finest and fused by a 3×3 conv, dropout + 1×1 classifier.
    Output ``(B, num_classes, H/s_0, W/s_0)``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.ppm = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_norm_act(in_channels[-1], channels, 1, norm_layer))
            for s in pool_scales])
        self.bottleneck = _conv_norm_act(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList([_conv_norm_act(c, channels, 1, norm_layer) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([_conv_norm_act(channels, channels, 3, norm_layer) for _ in in_channels[:-1]])
        self.fpn_bottleneck = _conv_norm_act(len(in_channels) * channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        psp = [top] + [_resize(pool(top), top.shape[-2:], self.align_corners) for pool in self.ppm]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size, self.align_corners) for o in outs], 1))
        return self.classifier(self.dropout(fused))


class SegmentationModel(nn.Module):
    """A :class:`~.dense.DenseBackbone` + a decode head (+ an optional auxiliary FCN head).

    ``forward(x)`` returns ``OrderedDict(out=(B, num_classes, H, W)[, aux=(B, num_classes, H, W)])``
    like torchvision's segmentation models (``aux`` whenever the aux head exists), logits resized
    bilinearly to the input size. ``x`` is a normalised image batch of any size.
    """

    def __init__(self, backbone: DenseBackbone, decode_head: nn.Module, aux_head: Optional[nn.Module] = None,
                 aux_index: int = 2, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_index = aux_index
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = OrderedDict(out=_resize(self.decode_head(feats), size, self.align_corners))
        if self.aux_head is not None:
            out["aux"] = _resize(self.aux_head(feats[self.aux_index]), size, self.align_corners)
        return out


def _segmentation(model_name: str, head: str, num_classes: int, aux: bool, aux_index: int,
                  norm_layer: Callable[[int], nn.Module], align_corners: bool, head_kwargs: Dict,
                  kwargs: Dict) -> SegmentationModel:
    bb_kwargs, rest = _split(dict(kwargs), (0, 1, 2, 3))
    bb_kwargs.pop("fpn_channels", None)
    if rest:
        raise TypeError(f"unexpected keyword arguments: {sorted(rest)}")
    model_kwargs = bb_kwargs.pop("model_kwargs", None) or {}
    backbone = DenseBackbone(model_name, **bb_kwargs, **model_kwargs)
    if head == "fpn":
        decode = SemanticFPNHead(backbone.channels, backbone.strides, num_classes, norm_layer=norm_layer,
                                 align_corners=align_corners, **head_kwargs)
    else:
        decode = UPerHead(backbone.channels, num_classes, norm_layer=norm_layer, align_corners=align_corners,
                          **head_kwargs)
    aux_head = None
    if aux:
        if not 0 <= aux_index < len(backbone.channels):
            raise ValueError(f"aux_index {aux_index} is not an output of out_indices {backbone.out_indices}")
        aux_head = FCNHead(backbone.channels[aux_index], num_classes)
    return SegmentationModel(backbone, decode, aux_head, aux_index, align_corners)


def semantic_fpn(model_name: str, num_classes: int, *, aux: bool = False, aux_index: int = 2,
                 fpn_channels: int = 256, channels: int = 128, dropout: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False,
                 **kwargs) -> SegmentationModel:
    """Semantic FPN on ``model_name`` (mmseg's ``fpn`` config: FPN 256, head 128 channels).

    ``kwargs``: the backbone options of :class:`~.dense.DenseBackbone` and ``model_kwargs``.
    ``aux=True`` adds torchvision's ``FCNHead`` on output ``aux_index``.
    """
    return _segmentation(model_name, "fpn", num_classes, aux, aux_index, norm_layer, align_corners,
                         dict(fpn_channels=fpn_channels, channels=channels, dropout=dropout), kwargs)


def upernet(model_name: str, num_classes: int, *, aux: bool = True, aux_index: int = 2, channels: int = 512,
            pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
            norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False,
            **kwargs) -> SegmentationModel:
    """UPerNet on ``model_name`` (mmseg's ``upernet`` config: 512 channels, PPM (1, 2, 3, 6), aux FCN
    on stage 2). With BatchNorm, training needs batch ≥ 2 (the 1×1 pooled branch). Other ``kwargs``
    as :func:`semantic_fpn`."""
    return _segmentation(model_name, "upernet", num_classes, aux, aux_index, norm_layer, align_corners,
                         dict(channels=channels, pool_scales=pool_scales, dropout=dropout), kwargs)


def segmentation_loss(outputs: Dict[str, torch.Tensor], target: torch.Tensor, ignore_index: int = 255,
                      aux_weight: float = 0.4) -> torch.Tensor:
    """Cross-entropy of ``outputs['out']`` + ``aux_weight`` × that of ``outputs['aux']`` (if present);
    ``target`` is ``(B, H, W)`` int64 class indices, ``ignore_index`` skipped. Computed in fp32."""
    loss = F.cross_entropy(outputs["out"].float(), target, ignore_index=ignore_index)
    if "aux" in outputs:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), target, ignore_index=ignore_index)
    return loss
