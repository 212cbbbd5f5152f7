"""FLatten-Swin and InLine-Swin: timm's Swin Transformer with linear attention in the early stages.

The official architectures, built on timm's own
:class:`~timm.models.swin_transformer.SwinTransformer` with the blocks of the linear stages swapped:

* ``flatten_swin_{t,s,b,b_384}`` — FLatten (LeapLabTHU/FLatten-Transformer): stage pattern ``LLSS``,
  :class:`linvision.attn.FocusedLinearAttention` ("L": focused kernel, learnable K positional
  encoding, one 5×5 DWC on V shared by all heads).
* ``inline_swin_{t,s,b,b_384}`` — InLine (LeapLabTHU/InLine): ``IIIS`` (T), ``IISS`` (S), ``IIMS2``
  (B: stage 3 starts with 2 InLine blocks, the other 16 are window attention),
  :class:`linvision.attn.InjectiveLinearAttention` ("I": injective normalisation plus the 3×3 local
  conv whose kernels are predicted from the token mean of the post-norm1 block input).

Linear blocks attend **globally** over the whole stage map (the official window equals the stage
resolution: no partition, no shift, no mask). "S" blocks are timm's unchanged Swin blocks: window 7
(12 for the 384 models), shift ``window // 2`` on odd block indices within the stage, the window
clamped to the map (shift 0) where the map is no larger, as in the official code.

Any input size works (``strict_img_size=False`` is the default here): the patch embedding pads to a
multiple of 4, patch merging pads odd maps, the linear blocks read the runtime grid (FLatten
resizes its positional table bicubically to it) and the S blocks pad to whole windows and build
their shifted-window masks per forward (timm's dynamic masks). Window sizes and clamping are fixed
when the model is built; ``set_input_size(img_size=...)`` (or ``img_size=`` at creation) re-derives
them for a new resolution the way timm does for Swin.

Official checkpoints (``{'model': ...}`` as the official ``main.py --eval`` reads it,
``{'state_dict_ema': ...}``, ``module.`` prefixes, plain) load through ``checkpoint_filter_fn``::

    timm.create_model('flatten_swin_t', pretrained=True, pretrained_cfg_overlay=dict(file='flatten_swin_t.pth'))
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, resize_rel_pos_bias_table, to_ntuple,
                         trunc_normal_)
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer

from ..attn import FocusedLinearAttention, InjectiveLinearAttention
from ..attn.grid import resize_token_table
from ._builder import build_model_with_cfg, unwrap_checkpoint

__all__ = ["LinearSwinTransformer", "GlobalLinearAttention", "LinearSwinBlock", "parse_attn_types",
           "checkpoint_filter_fn"]

LINEAR_ATTN_TYPES = ("L", "I")


def parse_attn_types(attn_types: str, depths: Sequence[int]) -> Tuple[Tuple[str, ...], ...]:
    """Per-block attention kinds from an official ``ATTN_TYPE`` string.

    One letter per stage — ``L`` (FLatten), ``I`` (InLine), ``S`` (Swin window attention) or ``M``
    (mixed) — and, when an ``M`` is present, a trailing count ``k``: an ``M`` stage starts with ``k``
    linear blocks of the pattern's linear kind (``I`` if the pattern has one, else ``L``) and
    continues with ``S`` blocks. E.g. ``'IIMS2'`` over depths (2, 2, 18, 2) gives stage 3 = 2×I + 16×S.

    Returns:
        One tuple of ``'L'``/``'I'``/``'S'`` per stage, one entry per block.
    """
    m = re.fullmatch(r"([LISM]+)(\d*)", attn_types)
    if m is None or len(m.group(1)) != len(depths):
        raise ValueError(f"attn_types must be one of L/I/S/M per stage ({len(depths)} stages) plus an optional "
                         f"count for M stages, e.g. 'LLSS' or 'IIMS2'; got {attn_types!r}")
    letters, count = m.group(1), m.group(2)
    if ("M" in letters) != bool(count):
        raise ValueError(f"attn_types {attn_types!r}: an M stage needs a trailing block count and only M uses one")
    if "M" in letters and "L" in letters and "I" in letters:
        raise ValueError(f"attn_types {attn_types!r}: an M stage is ambiguous when both L and I stages are present")
    linear = "I" if "I" in letters else "L"
    kinds = []
    for letter, depth in zip(letters, depths):
        if letter == "M":
            k = int(count)
            if k > depth:
                raise ValueError(f"attn_types {attn_types!r}: M stage of depth {depth} cannot start with "
                                 f"{k} linear blocks")
            kinds.append((linear,) * k + ("S",) * (depth - k))
        else:
            kinds.append((letter,) * depth)
    return tuple(kinds)


class GlobalLinearAttention(nn.Module):
    """Fused qkv → linear-attention mixer over the whole map → output projection.

    Input and output ``(B, H, W, C)``. The parameters of the official attention module sit on the
    ``qkv``/``proj`` Linears here and on the mixer (``mixer.scale``, ``mixer.positional_encoding``,
    ``mixer.dwc`` for FLatten; ``mixer.residual`` for InLine).

    Args:
        dim, num_heads: channels and heads.
        attn_type: ``'L'`` (:class:`FocusedLinearAttention`) or ``'I'`` (:class:`InjectiveLinearAttention`).
        positional_encoding_size: FLatten's K positional table grid (the stage grid at the size the
            model is built for); resized bicubically to the runtime grid.
    """

    def __init__(self, dim: int, num_heads: int, attn_type: str,
                 positional_encoding_size: Optional[Tuple[int, int]] = None, qkv_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__()
        if attn_type not in LINEAR_ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {LINEAR_ATTN_TYPES}, got {attn_type!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_type = attn_type
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if attn_type == "L":
            self.mixer = FocusedLinearAttention(dim, num_heads, positional_encoding_size=positional_encoding_size)
        else:
            self.mixer = InjectiveLinearAttention(dim, num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        # [Q | K | V], each C wide with channel = head·d + i, as in the official code.
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_type == "I":
            # InLine predicts its local kernels from the token mean of the attention input, i.e.
            # the post-norm1 map of the (single, global) window.
            out = self.mixer(q, k, v, hw=(h, w), token_mean=x.mean(dim=1))
        else:
            out = self.mixer(q, k, v, hw=(h, w))
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj_drop(self.proj(out))


class LinearSwinBlock(nn.Module):
    """Swin block whose attention is one global linear-attention window: ``(B, H, W, C)`` in and out.

    ``x + DropPath(attn(norm1(x)))`` then ``x + DropPath(mlp(norm2(x)))``, the official block with
    window = stage map, shift 0 and no mask. Any ``H×W`` works.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, attn_type: str,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.attn_type = attn_type
        self.norm1 = norm_layer(dim)
        self.attn = GlobalLinearAttention(
            dim, num_heads, attn_type,
            positional_encoding_size=self.input_resolution if attn_type == "L" else None,
            qkv_bias=qkv_bias, proj_drop=proj_drop,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def window_size(self) -> Tuple[int, int]:
        """One window covering the map (the size the block was built or last resized for)."""
        return self.input_resolution

    @property
    def shift_size(self) -> Tuple[int, int]:
        return (0, 0)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Any = None,
                       always_partition: Optional[bool] = None) -> None:
        """timm's per-block resize hook. The window is the runtime map whatever ``window_size`` says,
        and the positional table keeps its trained grid (it is resized on the fly), so only the
        recorded resolution changes."""
        self.input_resolution = tuple(feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x.reshape(b, h * w, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class LinearSwinTransformer(SwinTransformer):
    """timm ``SwinTransformer`` whose linear-stage blocks are :class:`LinearSwinBlock`.

    Args:
        attn_types: official stage pattern (see :func:`parse_attn_types`): ``'LLSS'`` (FLatten),
            ``'IIIS'``, ``'IISS'``, ``'IIMS2'`` (InLine).
        window_size: window of the ``S`` blocks (official: 7, or 12 for the 384 models); linear
            blocks are global whatever it is.
        strict_img_size: ``False`` (default) accepts any input size, with timm's dynamic masks for
            the ``S`` blocks; ``True`` requires ``img_size`` exactly (static masks).
        dynamic_img_pad: pad the input to a multiple of the patch size (default ``True``).
        Other arguments are :class:`~timm.models.swin_transformer.SwinTransformer`'s.

    The model keeps the timm Swin layout: NHWC inside, downsample at the *start* of stages 1–3,
    classifier ``head.fc``; ``forward_features`` returns ``(B, H/32, W/32, C)`` (NHWC) and
    ``forward_intermediates``/``features_only`` give NCHW maps with strides 4/8/16/32.
    """

    def __init__(
            self,
            attn_types: str = "LLSS",
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: Union[int, Tuple[int, int], Sequence] = 7,
            strict_img_size: bool = False,
            dynamic_img_pad: bool = True,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            weight_init: str = "",
            device=None,
            dtype=None,
            **kwargs,
    ):
        block_types = parse_attn_types(attn_types, depths)
        if kwargs.get("head_dim") is not None and any(t in LINEAR_ATTN_TYPES for s in block_types for t in s):
            raise ValueError("head_dim is not supported: linear blocks use dim // num_heads as the official models do")
        embed_layer = kwargs.pop("embed_layer", partial(PatchEmbed, dynamic_img_pad=dynamic_img_pad))
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
            window_size=window_size, strict_img_size=strict_img_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate, embed_layer=embed_layer,
            norm_layer=norm_layer, weight_init=weight_init, device=device, dtype=dtype, **kwargs,
        )
        self.attn_types = attn_types
        self.block_attn_types = block_types
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        mlp_ratios = to_ntuple(len(depths))(mlp_ratio)
        for i, stage in enumerate(self.layers):
            for j, kind in enumerate(block_types[i]):
                if kind == "S":
                    continue
                old = stage.blocks[j]
                block = LinearSwinBlock(
                    old.dim, stage.output_resolution, num_heads[i], kind, mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias, proj_drop=proj_drop_rate, drop_path=dpr[i][j], norm_layer=norm_layer,
                )
                if device is not None or dtype is not None:
                    block = block.to(device=device, dtype=dtype)
                if weight_init != "skip":
                    self._init_linear_block(block)
                stage.blocks[j] = block

    @staticmethod
    @torch.no_grad()
    def _init_linear_block(block: nn.Module) -> None:
        # Official Swin init: Linear trunc_normal(0.02) with zero bias, LayerNorm (1, 0); the convs of
        # the mixers keep PyTorch's default init and FLatten's scale/positional table start at 0.
        for m in block.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's Swin ``forward_intermediates`` (NCHW intermediates, NHWC final features)."""
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → ``(B, ⌈H/32⌉, ⌈W/32⌉, C)`` (NHWC, after the final norm)."""
        self._check_input(x)
        return super().forward_features(x)


# ------------------------------------------------------------------- official checkpoints
_BUFFERS = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")
_OFFICIAL_MIXER = re.compile(r"^(layers\.\d+\.blocks\.\d+\.attn\.)(scale$|positional_encoding$|dwc\.|residual\.)")
_OFFICIAL_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def _is_official(state_dict: Dict[str, Any]) -> bool:
    """Official layout: downsample at the end of stage 0, classifier ``head.*``, mixer params on ``attn``."""
    return any(k.startswith("layers.0.downsample.") or k in ("head.weight", "head.bias") or _OFFICIAL_MIXER.match(k)
               for k in state_dict)


def _official_to_timm_key(k: str) -> str:
    k = _OFFICIAL_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
    k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
    return _OFFICIAL_MIXER.sub(r"\1mixer.\2", k)


def _adapt_table(k: str, v: torch.Tensor, model: nn.Module, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Resize resolution-dependent tables to the model (no-op when shapes already match)."""
    target = params.get(k)
    if target is None or target.shape == v.shape:
        return v
    if k.endswith("mixer.positional_encoding") and v.dim() == 3 and v.shape[2] == target.shape[2]:
        # A (1, s², C) table trained on an s×s map, resized bicubically to the model's grid as the
        # official 384 fine-tune loader does.
        side = math.isqrt(v.shape[1])
        if side * side == v.shape[1]:
            grid = model.get_submodule(k[: -len(".positional_encoding")]).positional_encoding_grid
            table = v.transpose(1, 2).reshape(1, v.shape[2], side, side).float()
            table = resize_token_table(table, grid).reshape(1, v.shape[2], -1).transpose(1, 2)
            return table.to(v.dtype)
    if k.endswith("relative_position_bias_table") and v.dim() == 2 and v.shape[1] == target.shape[1]:
        window = model.get_submodule(k[: -len(".relative_position_bias_table")]).window_size
        return resize_rel_pos_bias_table(v, new_window_size=window, new_bias_shape=tuple(target.shape))
    return v


def _describe(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module,
                         prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: an official FLatten-/InLine-Swin checkpoint → this model's layout.

    * Unwraps training containers: ``'model'`` by default (what the official ``main.py --eval``
      loads), the ``'state_dict_ema'`` entry with ``prefer_ema=True`` (either falls back to the
      other); strips ``module.``. (timm's *file* loader unwraps before this filter runs and takes
      ``state_dict_ema`` first; a container passed as ``pretrained_cfg_overlay=dict(state_dict=...)``
      reaches the filter whole.)
    * Official keys are renamed: ``layers.{i}.downsample`` (end of stage i) →
      ``layers.{i+1}.downsample``, ``head.*`` → ``head.fc.*``, ``attn.{scale, positional_encoding,
      dwc, residual}`` → ``attn.mixer.*``. The stored buffers ``relative_position_index`` and
      ``attn_mask`` are dropped: the model recomputes them. Native state dicts keep
      their keys.
    * FLatten positional tables and relative-position tables of another resolution are resized
      bicubically to the model (e.g. 224 weights into a model built at 384).

    Raises:
        ValueError: naming the missing and unexpected keys (after conversion) and the shape
            mismatches, when the checkpoint does not fit the model. Classifier keys are left to
            timm, which drops them when ``num_classes`` differs.
    """
    state_dict = unwrap_checkpoint(state_dict, prefer_ema=prefer_ema)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    official = _is_official(state_dict)
    params = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if _BUFFERS.search(k):
            continue
        if official:
            k = _official_to_timm_key(k)
        out[k] = _adapt_table(k, v, model, params) if isinstance(v, torch.Tensor) else v

    def body(keys):
        return [k for k in keys if not k.startswith("head.")]

    missing = body(k for k in params if k not in out)
    unexpected = body(k for k in out if k not in params)
    mismatched = body(f"{k} {tuple(getattr(out[k], 'shape', ()))} vs {tuple(params[k].shape)}" for k in out
                      if k in params and getattr(out[k], "shape", None) != params[k].shape)
    if missing or unexpected or mismatched:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        problems = [f"{label} {_describe(keys)}" for label, keys in found if keys]
        layout = "official" if official else "native"
        raise ValueError(f"checkpoint ({layout} layout) does not match {type(model).__name__} "
                         f"({getattr(model, 'attn_types', '?')}): " + "; ".join(problems))
    return out


# ------------------------------------------------------------------- builders and cfgs
def _create_linear_swin(variant: str, pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 1, 1))))))
    return build_model_with_cfg(
        LinearSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # Official eval: PIL bicubic resize to a *square* ⌊S/crop_pct⌋ ignoring the aspect
    # ratio (timm's 'squash'), center crop S, ImageNet mean/std.
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 224 / 256, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "unknown", **kwargs,
    }


# The repositories ship no license file.
_FLATTEN = dict(paper_name="FLatten Transformer: Vision Transformer using Focused Linear Attention",
                paper_ids="arXiv:2308.00442", origin_url="https://github.com/LeapLabTHU/FLatten-Transformer")
_INLINE = dict(paper_name="Bridging the Divide: Reconsidering Softmax and Linear Attention",
               paper_ids="arXiv:2412.06590", origin_url="https://github.com/LeapLabTHU/InLine")
# The share links name no file (the weight registry gives each download its name), and the training
# script saves {'model': ..., 'config': <yacs CfgNode>, ...} (whether the released files were
# stripped is unverified).
_RELEASE_NOTES = ("Tsinghua Cloud share link of the official release; tools/download.py fetches, verifies and "
                  "converts it (or pass the file with pretrained_cfg_overlay=dict(file=...))",
                  "saved by the official training script as {'model': ..., 'config': yacs CfgNode, ...}; linvision "
                  "reads the pickled config as plain data, without running code from the file",)


def _release(file_id: str, **kwargs) -> Dict[str, Any]:
    return _cfg(f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1", notes=_RELEASE_NOTES, **kwargs)

# Swin-B-384 is evaluated with TEST.CROP False: a straight resize to 384×384.
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    "flatten_swin_t.in1k": _release("e1518e76703e4e57a7f2", **_FLATTEN),
    "flatten_swin_s.in1k": _release("94188e52af354bf4a88b", **_FLATTEN),
    "flatten_swin_b.in1k": _release("7a9e5186bad04e7fb3a9", **_FLATTEN),
    "flatten_swin_b_384.in1k": _release("0d0330cf2e5249f1abb6", **_384, **_FLATTEN),
    "inline_swin_t.in1k": _release("32810869fcc34410966b", **_INLINE),
    "inline_swin_s.in1k": _release("e9657fd247c04c7cb1a1", **_INLINE),
    "inline_swin_b.in1k": _release("bf23564bb64c420aafe1", **_INLINE),
    # The InLine repo has a cfg for Swin-B-384 but no released weights.
    "inline_swin_b_384.untrained": _cfg(**_384, **_INLINE),
})

# Official sizes; drop-path rates are the official training ones.
_SIZES = {
    "t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "b_384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5,
                  img_size=384, window_size=12),
}
_FLATTEN_ATTN = {"t": "LLSS", "s": "LLSS", "b": "LLSS", "b_384": "LLSS"}
_INLINE_ATTN = {"t": "IIIS", "s": "IISS", "b": "IIMS2", "b_384": "IIMS2"}


def _flatten_swin(size: str, pretrained: bool, **kwargs) -> LinearSwinTransformer:
    args = dict(_SIZES[size], attn_types=_FLATTEN_ATTN[size])
    return _create_linear_swin(f"flatten_swin_{size}", pretrained=pretrained, **dict(args, **kwargs))


def _inline_swin(size: str, pretrained: bool, **kwargs) -> LinearSwinTransformer:
    args = dict(_SIZES[size], attn_types=_INLINE_ATTN[size])
    return _create_linear_swin(f"inline_swin_{size}", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def flatten_swin_t(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _flatten_swin("t", pretrained, **kwargs)


@register_model
def flatten_swin_s(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _flatten_swin("s", pretrained, **kwargs)


@register_model
def flatten_swin_b(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _flatten_swin("b", pretrained, **kwargs)


@register_model
def flatten_swin_b_384(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _flatten_swin("b_384", pretrained, **kwargs)


@register_model
def inline_swin_t(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _inline_swin("t", pretrained, **kwargs)


@register_model
def inline_swin_s(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _inline_swin("s", pretrained, **kwargs)


@register_model
def inline_swin_b(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _inline_swin("b", pretrained, **kwargs)


@register_model
def inline_swin_b_384(pretrained: bool = False, **kwargs) -> LinearSwinTransformer:
    return _inline_swin("b_384", pretrained, **kwargs)
