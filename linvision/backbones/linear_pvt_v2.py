"""FLatten-PVTv2: timm's ``PyramidVisionTransformerV2`` with focused linear attention in every block.

Official code: LeapLabTHU/FLatten-Transformer ``models/flatten_pvt_v2.py``. The host is unchanged
PVTv2 — overlapping patch embeddings (7×7/4, then 3×3/2; LayerNorm eps 1e-5), MLP fc1 → 3×3 DWConv →
GELU → fc2 (ratios 8, 8, 4, 4), a LayerNorm (eps 1e-6) closing every stage, mean pool, linear head —
so the model *is* :class:`timm.models.pvt_v2.PyramidVisionTransformerV2` (``sr_ratios=1``,
``linear=False``) whose ``Attention`` modules are swapped for
:class:`~linvision.backbones.pvt.PvtLinearAttention`: the same ``q``/``kv``/``proj`` Linears around
:class:`~linvision.attn.FocusedLinearAttention`. With sr = 1 the original PVTv2 spatial-reduction
conv is gone, which is why FLatten-PVTv2 has fewer parameters than PVTv2. ``attn='inline'`` builds
the InLine counterpart (no official release).

Any input size works: the patch-embedding convs are padded (grids ⌈H/4⌉, ⌈H/8⌉, ...), and the
FLatten positional-encoding tables, fixed at the ``img_size`` grids (56, 28, 14, 7 at 224) as in the
official model, are resized bicubically at run time when the grid differs (non-square included).

Official checkpoints load through :func:`checkpoint_filter_fn` (timm's own PVTv2 renames plus the
attention's ``scale``/``positional_encoding``/``dwc`` → ``attn.mixer.*``); as for
:mod:`linvision.backbones.pvt`, the released training checkpoints (which also pickle a yacs config,
read as plain data by linvision's checkpoint reader) load as they are::

    timm.create_model('flatten_pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(file='flatten_pvt_v2_b0.pth'))
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.pvt_v2 import checkpoint_filter_fn as _timm_pvt_v2_filter

from ._builder import build_model_with_cfg, rename_key, unwrap_checkpoint
from .pvt import (ATTENTIONS, ATTN_RENAMES, FLATTEN, PvtLinearAttention, cfg, check_coverage, resize_tables,
                  stage_grids, strip_prefixes, tsinghua_url)

__all__ = ["LinearPyramidVisionTransformerV2", "checkpoint_filter_fn"]


class LinearPyramidVisionTransformerV2(PyramidVisionTransformerV2):
    """PVTv2 with a linear token mixer in every block (timm's class; only the attention differs).

    Args:
        img_size: training resolution; sets the grids of the FLatten positional-encoding tables.
        attn: ``'focused'`` (FLatten, default) or ``'inline'``.
        **kwargs: :class:`~timm.models.pvt_v2.PyramidVisionTransformerV2` arguments (depths,
            embed_dims, num_heads, mlp_ratios, drop rates, ...); ``sr_ratios`` must stay 1 and
            ``linear`` False, as in every official config.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, attn: str = "focused", **kwargs):
        if attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")
        sr_ratios = kwargs.pop("sr_ratios", 1)
        if any(r != 1 for r in (sr_ratios if isinstance(sr_ratios, (tuple, list)) else (sr_ratios,))):
            raise ValueError(f"linear-attention PVTv2 has no spatial reduction: sr_ratios must be 1, got {sr_ratios}")
        if kwargs.pop("linear", False):
            raise ValueError("linear=True (PVTv2-Li pooling attention) is not supported with a linear token mixer")
        super().__init__(sr_ratios=1, linear=False, **kwargs)
        self.attn = attn
        self.img_size = img_size
        grids = stage_grids(img_size, len(self.stages))
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"img_size {img_size} is too small for {len(self.stages)} stages")
        for stage, grid in zip(self.stages, grids):
            for blk in stage.blocks:
                old = blk.attn
                new = PvtLinearAttention(old.dim, old.num_heads, attn, grid, qkv_bias=old.q.bias is not None,
                                         proj_drop=old.proj_drop.p)
                # PVTv2's init (Linear trunc_normal(0.02), Conv2d normal(0, √(2/fan_out))), as the official model.
                new.apply(self._init_weights)
                blk.attn = new.to(device=old.q.weight.device, dtype=old.q.weight.dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's PVTv2 ``forward_intermediates`` (stage outputs after their norms, NCHW)."""
        self._check_input(x)
        return super().forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                             intermediates_only=intermediates_only)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → ``(B, C_4, ⌈H/32⌉, ⌈W/32⌉)`` after the last stage norm."""
        self._check_input(x)
        return super().forward_features(x)


def checkpoint_filter_fn(state_dict: Dict, model: LinearPyramidVisionTransformerV2) -> Dict[str, torch.Tensor]:
    """Official FLatten-PVTv2 checkpoint → timm's PVTv2 layout (timm's ``pretrained_filter_fn``).

    Unwraps a training checkpoint (``'model'``; ``unwrap_checkpoint(ckpt, prefer_ema=True)`` first
    to pick ``'state_dict_ema'``), strips ``module.``, applies timm's PVTv2 renames
    (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``dwconv.dwconv``) and moves
    ``attn.{scale, positional_encoding, dwc, residual}`` to ``attn.mixer.*``; resizes
    positional-encoding tables of another resolution; checks that every model key is covered.
    Native state dicts pass unchanged.
    """
    state_dict = strip_prefixes(unwrap_checkpoint(state_dict))
    if "patch_embed.proj.weight" not in state_dict:
        state_dict = _timm_pvt_v2_filter(state_dict, model)
        state_dict = {rename_key(k, ATTN_RENAMES): v for k, v in state_dict.items()}
    state_dict = resize_tables(state_dict, model)
    check_coverage(state_dict, model)
    return state_dict


def _create_linear_pvt_v2(variant: str, pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        LinearPyramidVisionTransformerV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    # FLatten README: only PVTv2-B0 is released (Acc@1 71.098). B1–B4 have cfgs but no weights.
    "flatten_pvt_v2_b0.in1k": cfg(tsinghua_url("5d1f01532b104da28e7b"), **FLATTEN),
    **{f"flatten_pvt_v2_b{i}.untrained": cfg(**FLATTEN) for i in range(1, 5)},
})

# Official PVTv2 sizes with the official cfg drop-path rates; drop_path_rate= overrides.
_WIDE = (64, 128, 320, 512)
_SIZES = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), drop_path_rate=0.1),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=_WIDE, drop_path_rate=0.1),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=_WIDE, drop_path_rate=0.1),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=_WIDE, drop_path_rate=0.3),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=_WIDE, drop_path_rate=0.3),
}


def _flatten_pvt_v2(size: str, pretrained: bool, **kwargs) -> LinearPyramidVisionTransformerV2:
    args = dict(_SIZES[size], num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), attn="focused")
    return _create_linear_pvt_v2(f"flatten_pvt_v2_{size}", pretrained, **{**args, **kwargs})


@register_model
def flatten_pvt_v2_b0(pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    """FLatten-PVTv2-B0: 3,594,824 parameters."""
    return _flatten_pvt_v2("b0", pretrained, **kwargs)


@register_model
def flatten_pvt_v2_b1(pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    """FLatten-PVTv2-B1: 12,931,240 parameters."""
    return _flatten_pvt_v2("b1", pretrained, **kwargs)


@register_model
def flatten_pvt_v2_b2(pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    """FLatten-PVTv2-B2: 22,548,264 parameters."""
    return _flatten_pvt_v2("b2", pretrained, **kwargs)


@register_model
def flatten_pvt_v2_b3(pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    """FLatten-PVTv2-B3: 38,273,832 parameters."""
    return _flatten_pvt_v2("b3", pretrained, **kwargs)


@register_model
def flatten_pvt_v2_b4(pretrained: bool = False, **kwargs) -> LinearPyramidVisionTransformerV2:
    """FLatten-PVTv2-B4: 51,836,968 parameters."""
    return _flatten_pvt_v2("b4", pretrained, **kwargs)
