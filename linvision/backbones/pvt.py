"""FLatten-PVT and InLine-PVT: Pyramid Vision Transformer (v1) with linear attention in every block.

Official code: LeapLabTHU/FLatten-Transformer ``models/flatten_pvt.py`` (FLatten, ICCV 2023) and
LeapLabTHU/InLine ``models/inline_pvt.py`` (InLine, NeurIPS 2024). timm has no PVT v1, so the host
is written here, laid out like timm's ``pvt_v2`` (``patch_embed``, ``stages.{i}.downsample``,
``stages.{i}.blocks.{j}``).

Skeleton (PVT v1 without its cls token):

* patch embedding per stage: a non-overlapping conv (kernel = stride = 4 in stage 1, 2 later) →
  LayerNorm (eps 1e-5) → ``+ pos_embed`` (one absolute table per stage);
* blocks ``x += Attn(LN(x)); x += MLP(LN(x))`` (LN eps 1e-6; MLP fc1 → GELU → fc2, ratios 8, 8, 4, 4);
* the mean of the last stage's tokens → linear classifier. There is **no final LayerNorm**: the
  FLatten model keeps one in its state dict but never applies it (here ``unused_norm``, frozen, so
  the parameter count and the checkpoint match the official model and DDP needs no
  ``find_unused_parameters``); the InLine model does not have it.

Attention (:class:`PvtLinearAttention`): ``q`` (C→C) and ``kv`` (C→2C, split ``[K | V]``) Linears
with bias, the token mixer — :class:`~linvision.attn.FocusedLinearAttention` (``attn='focused'``,
heads 1, 2, 5, 8) or :class:`~linvision.attn.InjectiveLinearAttention` (``attn='inline'``, heads
2, 4, 10, 16, fed the token mean of its post-``norm1`` input) — and ``proj``. Every block is linear
and global (official ``sr_ratio`` 1: no spatial-reduction modules).

Any input size works. The official model bakes its 224-px grids into ``pos_embed{i}`` and the
FLatten positional-encoding tables; here both are kept at the ``img_size`` grid (56, 28, 14, 7 at
224) and resized at run time to the actual grid (``pos_embed`` bilinearly, as the official
``_get_pos_embed`` does; the attention table bicubically, inside the mechanism), so non-square
inputs work too. An input side that is not a multiple of the patch stride is zero-padded at the
bottom/right before each patch embedding (the official conv would crop it), so a stage grid is
⌈H/4⌉, ⌈H/8⌉, ... and no pixel is lost. At the ``img_size`` grid the forward equals the official one.

Official checkpoints (a ``{'model': ...}`` training checkpoint, EMA entries, ``module.`` prefixes,
or a plain state dict) load through :func:`checkpoint_filter_fn`. The released files also pickle
the training script's yacs config; linvision's checkpoint reader turns it into plain data without
running code from the file, so they load as they are::

    timm.create_model('flatten_pvt_t', pretrained=True, pretrained_cfg_overlay=dict(file='flatten_pvt_t.pth'))

A file holding only tensors (e.g. ``{'model': state_dict}``) also loads with
``pretrained_cfg_overlay=dict(file=PATH)``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ..attn import FocusedLinearAttention, InjectiveLinearAttention
from ._builder import build_model_with_cfg, rename_key, unwrap_checkpoint

__all__ = ["PyramidVisionTransformer", "PvtLinearAttention", "checkpoint_filter_fn", "stage_grids"]

GridSize = Tuple[int, int]
ATTENTIONS = ("focused", "inline")


def stage_grids(img_size: Union[int, Sequence[int]], num_stages: int = 4) -> List[GridSize]:
    """The official per-stage token grids for ``img_size``: ``⌊size / 2^(i+2)⌋`` (56, 28, 14, 7 at 224).

    Both official hosts size ``pos_embed{i}`` and the FLatten ``positional_encoding`` tables this way
    (PVT v1 ``PatchEmbed``: ``img_size // 4``, then ``(img_size // 2^(i+1)) // 2``; PVTv2
    ``OverlapPatchEmbed``: the same divisions).
    """
    h, w = to_2tuple(img_size)
    return [(h // 2 ** (i + 2), w // 2 ** (i + 2)) for i in range(num_stages)]


class PvtLinearAttention(nn.Module):
    """PVT attention with a linear token mixer: ``(B, N, C)`` tokens of an ``H×W`` grid → ``(B, N, C)``.

    Args:
        dim, num_heads: channels C and heads h.
        attn: ``'focused'`` (FLatten: focused kernel, K positional encoding, shared 5×5 DWC on V) or
            ``'inline'`` (InLine: injective normalisation, dynamic 3×3 local conv on V predicted
            from the token mean of the input).
        grid: the ``(h, w)`` grid of the FLatten positional-encoding table (official: the stage grid
            at the training resolution); resized bicubically when the runtime grid differs.
            Unused for ``'inline'``.
        qkv_bias: bias of ``q`` and ``kv`` (True in every official model).
        proj_drop: dropout after ``proj``.
    Parameters: ``q``, ``kv``, ``proj`` (official names), ``mixer.*`` (the official ``attn.scale``,
    ``attn.positional_encoding``, ``attn.dwc`` or ``attn.residual``).
    """

    def __init__(self, dim: int, num_heads: int, attn: str = "focused", grid: Optional[GridSize] = None,
                 qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_type = attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if attn == "focused":
            if grid is None:
                raise ValueError("attn='focused' needs the grid of its positional-encoding table")
            self.mixer = FocusedLinearAttention(dim, num_heads, positional_encoding_size=tuple(grid))
        else:
            self.mixer = InjectiveLinearAttention(dim, num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """``x``: ``(B, H·W, C)`` (row-major tokens), ``feat_size``: ``(H, W)``."""
        b, n, c = x.shape
        hw = (int(feat_size[0]), int(feat_size[1]))
        # (B, N, C) -> (B, heads, N, d) views, channel = head * d + j; kv splits as [K | V].
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_type == "inline":
            # The local kernels are predicted from the mean of the attention input (post-norm1 X).
            out = self.mixer(q, k, v, hw=hw, token_mean=x.mean(dim=1))
        else:
            out = self.mixer(q, k, v, hw=hw)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class PvtBlock(nn.Module):
    """``x += drop_path(Attn(LN(x))); x += drop_path(MLP(LN(x)))`` on ``(B, N, C)`` tokens."""

    def __init__(self, dim: int, num_heads: int, attn: str, grid: GridSize, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = PvtLinearAttention(dim, num_heads, attn, grid, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``(B, C_in, H, W)`` → ``(B, ⌈H/p⌉, ⌈W/p⌉, C)`` (NHWC).

    Conv with kernel = stride = ``p``, then LayerNorm (eps 1e-5, the official ``nn.LayerNorm``).
    Sides that are not multiples of ``p`` are zero-padded at the bottom/right first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PvtStage(nn.Module):
    """Optional patch embedding (stride 2), ``+ pos_embed``, blocks; returns ``(B, C, H, W)``.

    Input: ``(B, C_in, H, W)`` when the stage has a ``downsample``, else the stem's ``(B, H, W, C)``.
    ``pos_embed`` ``(1, h·w, C)`` holds the table of the ``grid`` it was trained at.
    """

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_heads: int, attn: str,
                 grid: GridSize, mlp_ratio: float, qkv_bias: bool = True, pos_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: Sequence[float] = (), norm_layer: Callable = LayerNorm):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchEmbed(2, dim, dim_out) if downsample else None
        self.pos_embed_grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim_out))
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            PvtBlock(dim_out, num_heads, attn, grid, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                     drop_path=drop_path[j], norm_layer=norm_layer)
            for j in range(depth)
        ])

    def resized_pos_embed(self, hw: GridSize) -> torch.Tensor:
        """``pos_embed`` for an ``H×W`` grid, ``(1, H·W, C)``: bilinear resize (official ``_get_pos_embed``)."""
        if tuple(hw) == self.pos_embed_grid:
            return self.pos_embed  # the official same-size bilinear resize is the identity
        gh, gw = self.pos_embed_grid
        table = self.pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(hw), mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        b, h, w, c = x.shape
        x = self.pos_drop(x.reshape(b, h * w, c) + self.resized_pos_embed((h, w)))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (h, w))
            else:
                x = blk(x, (h, w))
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


class PyramidVisionTransformer(nn.Module):
    """PVT v1 with linear attention (FLatten-PVT / InLine-PVT), timm model API.

    Args:
        img_size: training resolution; sets the grids of the ``pos_embed`` and positional-encoding
            tables (any input size runs, see the module docstring).
        embed_dims, depths, num_heads, mlp_ratios: per-stage widths, block counts, heads, MLP ratios.
        attn: ``'focused'`` (FLatten) or ``'inline'`` (InLine).
        unused_final_norm: keep the official FLatten-PVT ``norm`` (a LayerNorm the official forward
            never applies) as the frozen ``unused_norm`` so checkpoints and parameter counts match.
        drop_rate: dropout before the classifier; pos_drop_rate: after ``+ pos_embed``;
        proj_drop_rate: after the attention projection and in the MLP; drop_path_rate: stochastic
            depth, rising linearly over all blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (2, 2, 2, 2),
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8.0, 8.0, 4.0, 4.0),
            attn: str = "focused",
            qkv_bias: bool = True,
            unused_final_norm: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = LayerNorm,
    ):
        super().__init__()
        if attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == num_stages):
            raise ValueError("embed_dims, depths, num_heads and mlp_ratios must have one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.attn = attn
        self.img_size = to_2tuple(img_size)
        grids = stage_grids(self.img_size, num_stages)
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for {num_stages} stages "
                             f"(total stride {4 * 2 ** (num_stages - 1)})")

        self.patch_embed = PatchEmbed(4, in_chans, embed_dims[0])
        # Official rule: linspace(0, rate, all blocks), in Python so that meta-device builds work.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(PvtStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0, num_heads=num_heads[i],
                attn=attn, grid=grids[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, pos_drop=pos_drop_rate,
                proj_drop=proj_drop_rate, drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        # Registered after the stages so that features_only wrappers stop before it.
        if unused_final_norm:
            self.unused_norm = norm_layer(embed_dims[-1])
            self.unused_norm.requires_grad_(False)
        else:
            self.unused_norm = None

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: Linear trunc_normal(0.02) with zero bias; LayerNorm 1/0 (the default);
        # convs keep PyTorch's default; the FLatten scale/positional encoding start at zero.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official recipe decays everything timm's default filter does (pos_embed and the
        # 3-D scale/positional_encoding included): its no_weight_decay names only the absent cls_token.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^unused_norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device, dtype = self.patch_embed.proj.weight.device, self.patch_embed.proj.weight.dtype
        self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4/8/16/32, NCHW) and optionally the final features.

        ``indices``: last n stages if int, all if None, else explicit (negative allowed). ``norm`` is
        accepted for API compatibility: PVT v1 has no per-stage or final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.patch_embed(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one needed (and the head when asked); return the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end or prune_norm:
            self.unused_norm = None
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → ``(B, C_4, ⌈H/32⌉, ⌈W/32⌉)`` (no final norm, as the official model)."""
        self._check_input(x)
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(-1, -2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------- official checkpoints
# Official attention parameters → the mixer inside PvtLinearAttention (shared with linear_pvt_v2).
ATTN_RENAMES = ((r"\.attn\.(scale|positional_encoding|dwc|residual)(?=\.|$)", r".attn.mixer.\1"),)
_RENAMES = (
    (r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed"),
    (r"^patch_embed1\.", lambda m: "patch_embed."),
    (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm\.", lambda m: "unused_norm."),
) + ATTN_RENAMES


def strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def resize_tables(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize square ``pos_embed`` (bilinear) and ``positional_encoding`` (bicubic) tables of another
    resolution to the model's grids, as the official 384 fine-tune loader does."""
    target = model.state_dict()
    for k, v in state_dict.items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf not in ("pos_embed", "positional_encoding") or k not in target or v.shape == target[k].shape:
            continue
        side = round(v.shape[1] ** 0.5)
        if v.dim() != 3 or side * side != v.shape[1] or v.shape[2] != target[k].shape[2]:
            continue  # not a square table of the same width: let the strict load report it
        owner = model.get_submodule(k.rsplit(".", 1)[0])
        grid = owner.pos_embed_grid if leaf == "pos_embed" else owner.positional_encoding_grid
        mode = "bilinear" if leaf == "pos_embed" else "bicubic"
        img = v.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        img = F.interpolate(img, size=tuple(grid), mode=mode, align_corners=False)
        state_dict[k] = img.flatten(2).transpose(1, 2).to(v.dtype)
    return state_dict


def check_coverage(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ``ValueError`` naming the model keys the checkpoint lacks (classifier keys excepted:
    timm drops them itself when ``num_classes`` differs)."""
    missing = [k for k in model.state_dict() if k not in state_dict and not k.startswith("head.")]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys {shown}")


def checkpoint_filter_fn(state_dict: Dict, model: PyramidVisionTransformer) -> Dict[str, torch.Tensor]:
    """Official FLatten-PVT / InLine-PVT checkpoint → this layout (timm's ``pretrained_filter_fn``).

    Unwraps a training checkpoint (``'model'``; ``unwrap_checkpoint(ckpt, prefer_ema=True)`` first
    to pick ``'state_dict_ema'``), strips ``module.``, renames ``pos_embed{i}``, ``patch_embed{i}``,
    ``block{i}.{j}``, ``attn.{scale, positional_encoding, dwc, residual}`` (→ ``attn.mixer.*``) and
    FLatten's unused ``norm`` (→ ``unused_norm``), resizes tables of another resolution to the model's
    grids, and checks that every model key is covered. Native state dicts pass unchanged.
    """
    state_dict = strip_prefixes(unwrap_checkpoint(state_dict))
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = {rename_key(k, _RENAMES): v for k, v in state_dict.items()}
    state_dict = resize_tables(state_dict, model)
    check_coverage(state_dict, model)
    return state_dict


# ------------------------------------------------------------------- builders and cfgs
def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        PyramidVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def tsinghua_url(share_id: str) -> str:
    """Direct download link of a Tsinghua Cloud share (where both repos host their weights)."""
    return f"https://cloud.tsinghua.edu.cn/f/{share_id}/?dl=1"


_WEIGHTS_NOTE = ("Tsinghua Cloud share of a training checkpoint {'model': state_dict, 'config': yacs CfgNode, ...}; "
                 "tools/download.py fetches and converts it; linvision reads the pickled config as plain data")
FLATTEN = dict(paper_name="FLatten Transformer: Vision Transformer using Focused Linear Attention",
               paper_ids="arXiv:2308.00442", origin_url="https://github.com/LeapLabTHU/FLatten-Transformer",
               license="unknown")
INLINE = dict(paper_name="Bridging the Divide: Reconsidering Softmax and Linear Attention",
              paper_ids="arXiv:2412.06590", origin_url="https://github.com/LeapLabTHU/InLine", license="unknown")


def cfg(url: str = "", **kwargs) -> Dict:
    """Official evaluation preprocessing: bicubic resize of the whole image to a square
    ``⌊S/0.875⌋`` (256 at 224, aspect ratio not kept: timm's ``crop_mode='squash'``), center crop S,
    ImageNet mean/std."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        **({"notes": (_WEIGHTS_NOTE,)} if url else {}), **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # FLatten README: only PVT-T is released (Acc@1 77.758). S/M/B have cfgs but no weights.
    "flatten_pvt_t.in1k": cfg(tsinghua_url("3ab1d773f19d45648690"), **FLATTEN),
    "flatten_pvt_s.untrained": cfg(**FLATTEN),
    "flatten_pvt_m.untrained": cfg(**FLATTEN),
    "flatten_pvt_b.untrained": cfg(**FLATTEN),
    # InLine README: all four sizes (78.2 / 82.0 / 83.2 / 83.6).
    "inline_pvt_t.in1k": cfg(tsinghua_url("90ac52b1555b401eb5e6"), **INLINE),
    "inline_pvt_s.in1k": cfg(tsinghua_url("1ab953b2479d433080a3"), **INLINE),
    "inline_pvt_m.in1k": cfg(tsinghua_url("a72aec31e6084bc0a280"), **INLINE),
    "inline_pvt_l.in1k": cfg(tsinghua_url("efd91318ba964f01b288"), **INLINE),
})

# Official sizes (PVT-T/S/M/L depths) with the official cfg drop-path rates; any
# drop_path_rate= passed to create_model overrides them.
_SIZES = {
    "t": dict(depths=(2, 2, 2, 2), drop_path_rate=0.1),
    "s": dict(depths=(3, 4, 6, 3), drop_path_rate=0.1),
    "m": dict(depths=(3, 4, 18, 3), drop_path_rate=0.3),
    "l": dict(depths=(3, 8, 27, 3), drop_path_rate=0.3),
}
_FLATTEN_ARGS = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                     attn="focused", unused_final_norm=True)
_INLINE_ARGS = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), mlp_ratios=(8, 8, 4, 4),
                    attn="inline", unused_final_norm=False)


def _flatten_pvt(variant: str, size: str, pretrained: bool, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt(variant, pretrained, **{**_FLATTEN_ARGS, **_SIZES[size], **kwargs})


def _inline_pvt(variant: str, size: str, pretrained: bool, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt(variant, pretrained, **{**_INLINE_ARGS, **_SIZES[size], **kwargs})


@register_model
def flatten_pvt_t(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """FLatten-PVT-T (official ``flatten_pvt_tiny``): 12,150,504 parameters."""
    return _flatten_pvt("flatten_pvt_t", "t", pretrained, **kwargs)


@register_model
def flatten_pvt_s(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """FLatten-PVT-S (official ``flatten_pvt_small``): 21,670,248 parameters."""
    return _flatten_pvt("flatten_pvt_s", "s", pretrained, **kwargs)


@register_model
def flatten_pvt_m(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """FLatten-PVT-M (official ``flatten_pvt_medium``): 37,242,216 parameters."""
    return _flatten_pvt("flatten_pvt_m", "m", pretrained, **kwargs)


@register_model
def flatten_pvt_b(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """FLatten-PVT-B (official cfg ``flatten_pvt_b.yaml`` → ``flatten_pvt_large``): 50,649,192 parameters."""
    return _flatten_pvt("flatten_pvt_b", "l", pretrained, **kwargs)


@register_model
def inline_pvt_t(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """InLine-PVT-T (official ``inline_pvt_tiny``): 12,032,232 parameters."""
    return _inline_pvt("inline_pvt_t", "t", pretrained, **kwargs)


@register_model
def inline_pvt_s(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """InLine-PVT-S (official ``inline_pvt_small``): 21,556,136 parameters."""
    return _inline_pvt("inline_pvt_s", "s", pretrained, **kwargs)


@register_model
def inline_pvt_m(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """InLine-PVT-M (official ``inline_pvt_medium``): 37,618,856 parameters."""
    return _inline_pvt("inline_pvt_m", "m", pretrained, **kwargs)


@register_model
def inline_pvt_l(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """InLine-PVT-L (official cfg ``inline_pvt_b.yaml`` → ``inline_pvt_large``): 51,154,280 parameters
    (the InLine README's 50.2M is off)."""
    return _inline_pvt("inline_pvt_l", "l", pretrained, **kwargs)
