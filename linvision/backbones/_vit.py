"""timm's ``VisionTransformer`` for attentions that need the patch grid.

timm's ViT blocks call ``attn(x)`` on ``(B, N, C)`` tokens. The linear attentions hosted here need
the token grid as well: InLine's local term is a 3×3 conv over the ``H×W`` patch tokens, which
a token count alone cannot recover for non-square inputs, and every mixer checks
``N = prefix + H·W``. :class:`TokenGridVisionTransformer` is timm's class unchanged (patch
embedding, cls/register tokens, absolute ``pos_embed`` resampled for any input size, pooling,
head, every API method) except that its blocks are :class:`TokenGridBlock` and the forward
passes hand them the grid explicitly, so gradient checkpointing and mixed input sizes stay exact.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer

from ._builder import rename_key, unwrap_checkpoint

__all__ = ["TokenGridBlock", "TokenGridVisionTransformer", "filter_vit_checkpoint"]


class TokenGridBlock(nn.Module):
    """timm's pre-norm ViT block (same submodule names) whose attention also receives ``hw``.

    ``x + drop_path(ls1(attn(norm1(x), hw)))`` then ``x + drop_path(ls2(mlp(norm2(x))))``. The
    attention is ``attn_layer(dim, num_heads, num_prefix_tokens=..., qkv_bias=..., proj_bias=...,
    attn_drop=..., proj_drop=..., device=..., dtype=...)`` and is called as ``attn(x, hw=(H, W))``.
    Keyword arguments are the ones timm's ``VisionTransformer`` passes to its ``block_fn``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            attn_layer: Optional[Callable[..., nn.Module]] = None,
            depth: int = 0,
            num_prefix_tokens: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if attn_layer is None:
            raise ValueError("TokenGridBlock needs an attn_layer (a grid-aware attention class)")
        if qk_norm or scale_attn_norm:
            raise ValueError("qk_norm and scale_attn_norm are not supported by the linear attentions")
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias,
                               proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """``x``: ``(B, prefix + H·W, C)`` → same shape."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), hw=hw)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _no_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("these linear attentions mix all tokens bidirectionally: attn_mask and is_causal "
                         "are not supported")


class TokenGridVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks receive the patch grid ``(H, W)``.

    Args:
        attn_layer: the grid-aware attention (see :class:`TokenGridBlock`); a class or a
            ``functools.partial`` of one.
        dynamic_img_size, dynamic_img_pad: default ``True`` here: any input size works, the
            absolute ``pos_embed`` is resampled (bicubic) to the runtime grid and inputs that are
            not a multiple of the patch size are zero-padded on the bottom/right.
        **kwargs: every other ``VisionTransformer`` argument (``embed_dim``, ``depth``,
            ``num_heads``, ``mlp_ratio``, ``img_size``, ``class_token``, ``global_pool``,
            ``drop_path_rate``, ``norm_layer``, ...). ``patch_drop_rate`` must stay 0: dropping
            tokens would break the grid.
    """

    def __init__(self, *, attn_layer: Callable[..., nn.Module], class_token: bool = True, reg_tokens: int = 0,
                 dynamic_img_size: bool = True, dynamic_img_pad: bool = True, patch_drop_rate: float = 0.0,
                 **kwargs: Any):
        if patch_drop_rate:
            raise ValueError(f"patch_drop_rate must be 0 (the attention needs the full token grid), "
                             f"got {patch_drop_rate}")
        if "block_fn" in kwargs:
            raise ValueError("block_fn is fixed to TokenGridBlock")
        num_prefix_tokens = int(class_token) + reg_tokens
        super().__init__(
            class_token=class_token, reg_tokens=reg_tokens, dynamic_img_size=dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad, attn_layer=attn_layer,
            block_fn=partial(TokenGridBlock, num_prefix_tokens=num_prefix_tokens), **kwargs,
        )

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Image ``(B, in_chans, H_img, W_img)`` → tokens ``(B, prefix + H·W, C)`` and the grid ``(H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        hw = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        return x, (int(hw[0]), int(hw[1]))

    def _block(self, blk: nn.Module, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, hw)
        return blk(x, hw)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``(B, in_chans, H_img, W_img)`` → normalised tokens ``(B, prefix + H·W, embed_dim)``."""
        _no_masks(attn_mask, is_causal)
        x, hw = self._embed(x)
        for blk in self.blocks:
            x = self._block(blk, x, hw)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Block outputs as timm's ViT returns them: ``(B, C, H, W)`` maps (``'NCHW'``) or
        ``(B, H·W, C)`` tokens (``'NLC'``), prefix tokens split off (``return_prefix_tokens``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        _no_masks(attn_mask, is_causal)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, (h, w) = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, (h, w))
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def filter_vit_checkpoint(state_dict: Mapping[str, Any], model: VisionTransformer, prefer_ema: bool = False,
                          renames: Sequence[Tuple[str, str]] = ()) -> Dict[str, torch.Tensor]:
    """A ViT checkpoint made loadable into ``model``.

    Takes a training container (``{'model': sd, 'optimizer': ..., 'state_dict_ema': ...}``; the
    raw ``'model'`` weights unless ``prefer_ema``) or a plain state dict, drops non-tensor entries,
    strips ``module.``, applies the ``(pattern, replacement)`` key ``renames`` and resamples
    ``pos_embed`` (timm's bicubic resampling, prefix entries kept) when it was trained for another
    grid than the model's ``img_size``. Native state dicts pass through unchanged.
    """
    state_dict = unwrap_checkpoint(state_dict, prefer_ema=prefer_ema)
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = re.sub(r"^module\.", "", k)
        k = rename_key(k, renames)
        if k == "pos_embed" and model.pos_embed is not None and v.shape != model.pos_embed.shape:
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
        out[k] = v
    return out
