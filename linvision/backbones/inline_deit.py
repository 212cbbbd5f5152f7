"""InLine-DeiT: the official DeiT hosts of InLine (Injective Linear Attention, LeapLabTHU/InLine).

timm's own ``VisionTransformer`` (patch 16, cls token, absolute ``pos_embed``, LayerNorm eps 1e-6,
MLP ratio 4 with exact GELU, final norm, cls token → head) with **every** block's attention
replaced by :class:`InLineAttention`: fused ``qkv`` → :class:`~linvision.attn.InjectiveLinearAttention`
→ ``proj``. Per head, with ``α = d^-½`` and N tokens (the cls token included)::

    Y_i = Σ_j w_ij v_j,   w_ij = (α q_i·k_j − mean_t α q_i·k_t)/N + 1/N      (linear in N, no epsilon)

plus a local term on the patch tokens only: a 3×3 depthwise conv of V whose per-sample,
per-channel kernels are predicted from the token mean of the attention input (the post-``norm1``
tokens, cls included) by ``residual`` = Conv1d(C, C, 1, groups=h) → GELU → Conv1d(C, 9C, 1, groups=h).
The cls token takes part in the attention and the mean but gets no local term.

The official widths are not DeiT's: head_dim is 32, so T is 192 wide with 6 heads, S 320/10 and B
384/12 (B is a DeiT-S-width model), and each is trained from scratch at its own size (224/288/448).

Any input size works: ``pos_embed`` is resampled bicubically to the runtime grid, inputs that are
not a multiple of 16 are zero-padded (the official code needs the build size and a square grid).

Official checkpoints keep timm 0.4.12's ViT keys (``blocks.{i}.attn.qkv``, ``attn.residual.{0,2}``,
...). They load through :func:`checkpoint_filter_fn`, which unwraps the training container
(``'model'`` by default, as the official evaluation does) and resamples ``pos_embed`` to the model::

    timm.create_model('inline_deit_s', pretrained=True, pretrained_cfg_overlay=dict(file='inline_deit_s.pth'))

The official evaluation resizes to a *square* ⌊256/224·S⌋ (bicubic) before a center crop of S and
normalises with the ImageNet mean/std (its timm cfg says Inception mean/std, but the data pipeline
ignores it): the cfgs below say so (``crop_mode='squash'``, ``crop_pct = S/⌊256/224·S⌋``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..attn import InjectiveLinearAttention
from ._builder import build_model_with_cfg
from ._vit import TokenGridVisionTransformer, filter_vit_checkpoint

__all__ = ["InLineAttention", "checkpoint_filter_fn"]


class InLineAttention(nn.Module):
    """InLine attention in timm's ViT attention slot: ``(B, prefix + H·W, C)`` → same shape.

    Parameters (official names): ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C) and the mixer's
    kernel generator, stored as ``mixer.residual`` (the checkpoint filter maps the official
    ``attn.residual`` there). ``attn_kwargs``: further options of the mixer (e.g. ``backend``).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_prefix_tokens: int = 1, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_kwargs: Optional[Dict[str, Any]] = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop:
            raise ValueError(f"attn_drop must be 0: InLine never forms an attention matrix, got {attn_drop}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.mixer = InjectiveLinearAttention(dim, num_heads, num_prefix_tokens=num_prefix_tokens,
                                              **(attn_kwargs or {})).to(**dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # The kernels are predicted from the mean of the attention input itself (post-norm1, cls included).
        y = self.mixer(q, k, v, hw=hw, token_mean=x.mean(dim=1))
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


# ------------------------------------------------------------------- official checkpoints
# The official keys are ours except the kernel generator, which lives in the mixer here.
_OFFICIAL_RENAMES = ((r"^(blocks\.\d+\.attn\.)residual\.", r"\1mixer.residual."),)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: TokenGridVisionTransformer,
                         prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for official InLine-DeiT checkpoints (and native ones).

    Takes a training container (``{'model': sd, 'optimizer': ..., 'state_dict_ema': ...}``; the
    raw ``'model'`` weights, which the official evaluation reads, unless ``prefer_ema``) or a plain
    state dict, strips ``module.``, moves ``attn.residual`` under ``attn.mixer`` and resamples
    ``pos_embed`` (bicubic, cls entry kept) when the checkpoint was trained at another size than
    the model's ``img_size``.
    """
    return filter_vit_checkpoint(state_dict, model, prefer_ema=prefer_ema, renames=_OFFICIAL_RENAMES)


# ------------------------------------------------------------------- builders and cfgs
def _create_inline_deit(variant: str, pretrained: bool = False, **kwargs) -> TokenGridVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    attn_kwargs = dict(kwargs.pop("attn_kwargs", None) or {})
    InjectiveLinearAttention.check_options(attn_kwargs, "inline")
    return build_model_with_cfg(
        TokenGridVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        attn_layer=partial(InLineAttention, attn_kwargs=attn_kwargs),
        **kwargs,
    )


def _cfg(url: str = "", size: int = 224, **kwargs) -> Dict[str, Any]:
    # Official eval: square resize to floor(256/224*S), then a center crop of S, i.e. crop_pct = S / that.
    resize = (256 * size) // 224
    return {
        "url": url, "num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
        "crop_pct": size / resize, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "unknown", "paper_ids": "arXiv:2412.06590",
        "paper_name": "Bridging the Divide: Reconsidering Softmax and Linear Attention",
        "origin_url": "https://github.com/LeapLabTHU/InLine", **kwargs,
    }


def _tsinghua(share_id: str) -> str:
    return f"https://cloud.tsinghua.edu.cn/f/{share_id}/?dl=1"


default_cfgs = generate_default_cfgs({
    "inline_deit_t.in1k": _cfg(_tsinghua("1d6b8191ad6d4114b291"), size=224,
                               notes=("official ImageNet-1k top-1 74.5 at 224",)),
    "inline_deit_s.in1k": _cfg(_tsinghua("2f3898b07e9247f3beb3"), size=288,
                               notes=("official ImageNet-1k top-1 80.2 at 288",)),
    "inline_deit_b.in1k": _cfg(_tsinghua("10bdd726d4b0435eb34e"), size=448,
                               notes=("official ImageNet-1k top-1 82.3 at 448",)),
})

# Official factories: patch 16, depth 12, MLP ratio 4, qkv bias, head_dim 32; drop path 0.1 is the
# official training default (any `drop_path_rate=` passed to create_model overrides it).
_SIZES = {
    "t": dict(img_size=224, embed_dim=192, num_heads=6),
    "s": dict(img_size=288, embed_dim=320, num_heads=10),
    "b": dict(img_size=448, embed_dim=384, num_heads=12),
}


def _inline_deit(size: str, pretrained: bool, **kwargs) -> TokenGridVisionTransformer:
    args = dict(patch_size=16, depth=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1, **_SIZES[size])
    return _create_inline_deit(f"inline_deit_{size}", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def inline_deit_t(pretrained: bool = False, **kwargs) -> TokenGridVisionTransformer:
    """InLine-DeiT-T: 192 wide, 6 heads, 12 blocks, 224 px (6.478M params)."""
    return _inline_deit("t", pretrained, **kwargs)


@register_model
def inline_deit_s(pretrained: bool = False, **kwargs) -> TokenGridVisionTransformer:
    """InLine-DeiT-S: 320 wide, 10 heads, 12 blocks, 288 px (16.735M params)."""
    return _inline_deit("s", pretrained, **kwargs)


@register_model
def inline_deit_b(pretrained: bool = False, **kwargs) -> TokenGridVisionTransformer:
    """InLine-DeiT-B: 384 wide, 12 heads, 12 blocks, 448 px (23.797M params)."""
    return _inline_deit("b", pretrained, **kwargs)
