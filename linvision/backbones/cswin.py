"""CSWin Transformer host with FLatten (focused) and InLine (injective) linear attention.

Official models:

* ``flatten_cswin_{t,s,b,b_384}`` — LeapLabTHU/FLatten-Transformer ``FLatten_CSWin_*`` (``LLSS``).
* ``inline_cswin_{t,s,b,b_384}`` — LeapLabTHU/InLine ``inline_cswin_*`` (``IISS``).

timm has no CSWin, so the host lives here. Skeleton (microsoft/CSWin-Transformer): stem conv 7×7/4
(padding 2) + LayerNorm → 4 stages (stage ``i > 0`` starts with a Merge_Block: conv 3×3/2 + LN) of
pre-norm blocks ``x += proj(attn(qkv(LN(x)))); x += MLP(LN(x))`` → LN → token mean → linear head.
The qkv and proj Linears belong to the block; its attention has one or two *branches*, each a
window attention plus LePE (``lepe``, 3×3 depthwise conv on the window's V image, added to the
branch output):

* ``split_size=None``: one branch over all C channels and heads, one window = the whole stage map.
  Stages 1–2 of the official models (the "linear" stages, whose official split equals the stage
  resolution) run FLatten or InLine attention here, globally; the last stage runs
  softmax attention here.
* ``split_size=s``: two branches of C/2 channels and heads/2 heads, cross-shaped stripes: branch 0
  attends within vertical stripes (full height, width ``s``), branch 1 within horizontal ones
  (height ``s``, full width). Stage 3 of the official models, softmax, s = 7 (12 at 384).

Linear branches use :class:`linvision.attn.FocusedLinearAttention` (K positional encoding, shared
5×5 DWC) and :class:`linvision.attn.InjectiveLinearAttention` (local kernels predicted from the
token mean of the **pre-norm** block input, as the official InLine-CSWin does); softmax branches
use SDPA with scale d^-½.

Any input size works, square or not, as long as the stem accepts it (H, W ≥ 3):

* The official model fixes its resolution at construction (stem Rearrange, positional-encoding
  tables, window sizes). Here ``img_size`` only sets the stored size of FLatten's
  positional-encoding tables; at another input size they are resized bicubically to the actual
  stage grid (as the official 224→384 fine-tune loader does), and the whole-map windows
  (linear stages, last stage) are the actual stage grid. At the construction size this is the
  official model exactly; at another size it is the official model built for that size (with
  resized tables), wherever that model exists.
* Stripes need the striped side divisible by ``s``: the q, k, v maps are zero-padded at the bottom
  (horizontal stripes) or right (vertical stripes) to a multiple of ``s``, the padded keys are masked
  out of the softmax and the output is cropped back. LePE's zero padding at the real map border is
  unchanged by this, so every real token sees exactly its (possibly narrower) last stripe.
* Merge_Blocks are stride-2 convs with padding 1 (⌈H/2⌉ × ⌈W/2⌉); the stem gives ⌊(H − 3)/4⌋ + 1.

Layout (timm style, NHWC tokens): ``stem.{conv,norm}``, ``stages.{i}.downsample.{conv,norm}``
(i ≥ 1), ``stages.{i}.blocks.{j}.{norm1,qkv,attns.{k}.lepe,attns.{k}.mixer.*,proj,norm2,mlp.fc1,
mlp.fc2}``, ``norm``, ``head``. Official checkpoints load through :func:`checkpoint_filter_fn`, which
takes a whole training container (``{'model': sd, 'state_dict_ema': sd_ema, 'optimizer': ...}``; the
``'model'`` weights by default, those the official evaluation reports first), a plain state dict
(``module.`` prefixes allowed) or a native one::

    timm.create_model('flatten_cswin_t', pretrained=True, pretrained_cfg_overlay=dict(file='ckpt.pth'))
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..attn import FocusedLinearAttention, InjectiveLinearAttention
from ..attn.grid import GridSize, as_grid, resize_token_table
from ._builder import build_model_with_cfg, rename_key, unwrap_checkpoint

__all__ = ["CSWinTransformer", "checkpoint_filter_fn"]

ATTN_TYPES = ("softmax", "focused", "inline")
LINEAR_ATTN_TYPES = ("focused", "inline")


def stem_size(hw: Tuple[int, int]) -> Tuple[int, int]:
    """Output grid of the 7×7/4, padding-2 stem for an ``(H, W)`` input."""
    return (hw[0] - 3) // 4 + 1, (hw[1] - 3) // 4 + 1


def merge_size(hw: Tuple[int, int]) -> Tuple[int, int]:
    """Output grid of a 3×3/2, padding-1 Merge_Block."""
    return (hw[0] + 1) // 2, (hw[1] + 1) // 2


class Stem(nn.Module):
    """Conv 7×7/4 (padding 2) + LayerNorm: ``(B, C_in, H, W)`` → ``(B, H', W', C)`` (official
    ``stage1_conv_embed.{0,2}``)."""

    def __init__(self, in_chans: int, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, 4, 2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MergeBlock(nn.Module):
    """Conv 3×3/2 (padding 1) + LayerNorm on NHWC tokens (official ``Merge_Block``, ``merge{i}``)."""

    def __init__(self, dim: int, dim_out: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nH·nW, wh·ww, C)``, windows row-major, tokens row-major in a window."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _unwindows(x: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: ``(B·nH·nW, wh·ww, C)`` → ``(B, H, W, C)``."""
    c = x.shape[-1]
    x = x.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class CrossShapedBranch(nn.Module):
    """One attention branch of a CSWin block: window attention + LePE (official ``attns.{k}``).

    Args:
        dim, num_heads: channels C′ and heads of the branch.
        attn_type: ``'softmax'`` (official ``LePEAttention``), ``'focused'`` (FLatten) or
            ``'inline'`` (InLine).
        stripe: ``None`` (one window = the whole map), ``'vertical'`` (H × s) or ``'horizontal'`` (s × W).
        split_size: stripe width ``s`` (needed with a ``stripe``).
        grid: the stage grid at ``img_size`` — the stored size of FLatten's positional encoding.

    Parameters: ``lepe`` = Conv2d(C′, C′, 3, groups=C′) (official ``get_v``) and, for linear types,
    ``mixer`` (official ``scale``, ``positional_encoding``, ``dwc`` / ``residual`` of the branch).
    """

    def __init__(self, dim: int, num_heads: int, attn_type: str = "softmax", stripe: Optional[str] = None,
                 split_size: Optional[int] = None, grid: GridSize = 56, focusing_power: float = 3.0,
                 dwc_kernel_size: int = 5):
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if stripe not in (None, "vertical", "horizontal"):
            raise ValueError(f"stripe must be None, 'vertical' or 'horizontal', got {stripe!r}")
        if stripe is not None and not (isinstance(split_size, int) and split_size >= 1):
            raise ValueError(f"{stripe} stripes need an int split_size >= 1, got {split_size!r}")
        if attn_type in LINEAR_ATTN_TYPES and stripe is not None:
            # The official linear stages have one window per image; windowed
            # linear attention would need padded keys masked out of its sums.
            raise ValueError(f"{attn_type!r} attention needs one window over the whole map (split_size=None)")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_type = attn_type
        self.stripe = stripe
        self.split_size = split_size
        self.lepe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        if attn_type == "focused":
            self.mixer = FocusedLinearAttention(dim, num_heads, focusing_power=focusing_power,
                                                kernel_size=dwc_kernel_size, positional_encoding_size=as_grid(grid))
        elif attn_type == "inline":
            self.mixer = InjectiveLinearAttention(dim, num_heads)
        else:
            self.mixer = None

    def window_shape(self, h: int, w: int) -> Tuple[int, int]:
        if self.stripe == "vertical":
            return h, self.split_size
        if self.stripe == "horizontal":
            return self.split_size, w
        return h, w

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B', N, C′)`` → ``(B', heads, N, d)`` (channel = head·d + i)."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                token_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q, k, v``: ``(B, H, W, C′)``; ``token_mean``: ``(B, C′)`` (InLine) → ``(B, H, W, C′)``."""
        b, h, w, c = q.shape
        wh, ww = self.window_shape(h, w)
        pad_h, pad_w = -h % wh, -w % ww
        if pad_h or pad_w:
            q, k, v = (F.pad(t, (0, 0, 0, pad_w, 0, pad_h)) for t in (q, k, v))
        hp, wp = h + pad_h, w + pad_w
        q, k, v = (_windows(t, wh, ww) for t in (q, k, v))              # (B', N, C′)
        n = wh * ww
        lepe = self.lepe(v.transpose(1, 2).reshape(-1, c, wh, ww)).reshape(-1, c, n).transpose(1, 2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.attn_type == "softmax":
            mask = None
            if pad_h or pad_w:
                mask = self._key_mask(h, w, hp, wp, wh, ww, q.device).repeat(b, 1)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        elif self.attn_type == "focused":
            out = self.mixer(q, k, v, hw=(wh, ww))
        else:
            out = self.mixer(q, k, v, hw=(wh, ww), token_mean=token_mean)
        out = out.transpose(1, 2).reshape(-1, n, c) + lepe
        out = _unwindows(out, wh, ww, hp, wp)
        return out[:, :h, :w] if (pad_h or pad_w) else out

    @staticmethod
    def _key_mask(h: int, w: int, hp: int, wp: int, wh: int, ww: int, device) -> torch.Tensor:
        """``(nWindows, N)`` bool, True where the key is a real (unpadded) token."""
        real = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=device)
        real[:, :h, :w] = True
        return _windows(real, wh, ww)[..., 0]


class CSWinBlock(nn.Module):
    """``x += proj(branches(qkv(norm1(x)))); x += mlp(norm2(x))`` on ``(B, H, W, C)`` tokens.

    ``split_size=None`` gives one branch over all channels (one window = the whole map); an int gives
    two cross-shaped branches of C/2 channels and heads/2 heads (vertical, then horizontal stripes).
    InLine branches get the token mean of the pre-norm block input, sliced to their channels.
    """

    def __init__(self, dim: int, num_heads: int, attn_type: str = "softmax", split_size: Optional[int] = None,
                 grid: GridSize = 56, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, focusing_power: float = 3.0,
                 dwc_kernel_size: int = 5):
        super().__init__()
        self.dim = dim
        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        kw = dict(attn_type=attn_type, split_size=split_size, grid=grid, focusing_power=focusing_power,
                  dwc_kernel_size=dwc_kernel_size)
        if split_size is None:
            self.attns = nn.ModuleList([CrossShapedBranch(dim, num_heads, stripe=None, **kw)])
        else:
            if dim % 2 or num_heads % 2:
                raise ValueError(f"cross-shaped stripes split dim ({dim}) and num_heads ({num_heads}) in two halves")
            self.attns = nn.ModuleList([
                CrossShapedBranch(dim // 2, num_heads // 2, stripe=s, **kw) for s in ("vertical", "horizontal")
            ])
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.dim
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        token_mean = x.mean(dim=(1, 2)) if any(a.attn_type == "inline" for a in self.attns) else None
        outs, start = [], 0
        for branch in self.attns:
            sl = slice(start, start + branch.dim)
            outs.append(branch(q[..., sl], k[..., sl], v[..., sl],
                               None if token_mean is None else token_mean[:, sl]))
            start += branch.dim
        x = x + self.drop_path(self.proj(torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CSWinStage(nn.Module):
    """Optional Merge_Block, then ``depth`` blocks sharing attention type and split size."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, attn_type: str,
                 split_size: Optional[int], grid: Tuple[int, int], downsample: bool, drop_path: Sequence[float],
                 norm_layer=nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = MergeBlock(in_dim, dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            CSWinBlock(dim, num_heads, attn_type, split_size, grid, drop_path=drop_path[j], norm_layer=norm_layer,
                       **block_kwargs)
            for j in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CSWinTransformer(nn.Module):
    """CSWin Transformer with per-stage attention types and timm's model API.

    Args:
        img_size: the size the model is built for; only sets the stored grid of FLatten's positional
            encoding tables (other input sizes resize them, see the module docstring).
        embed_dim: stage-1 width C; stage i has C·2^i channels.
        depths, num_heads: per-stage block and head counts.
        attn_types: per stage, ``'softmax'``, ``'focused'`` (FLatten) or ``'inline'`` (InLine).
        split_sizes: per stage, ``None`` for one window over the whole stage map (single branch) or
            the stripe width of the two cross-shaped branches.
        mlp_ratio, qkv_bias: MLP expansion (4) and qkv bias (True) of the official models.
        focusing_power, dwc_kernel_size: FLatten's p (3) and DWC kernel (5).
        drop_rate: dropout before the head; proj_drop_rate: dropout in the MLPs (official
            ``drop_rate``); drop_path_rate: stochastic depth, linear from 0 over all blocks.

    ``forward_features`` returns the normalised last-stage tokens ``(B, H/32, W/32, C·8)`` (NHWC, as
    timm's Swin); ``forward_intermediates`` returns NCHW stage outputs (strides 4, 8, 16, 32).
    """

    def __init__(
            self,
            img_size: GridSize = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 64,
            depths: Sequence[int] = (2, 4, 18, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            attn_types: Sequence[str] = ("focused", "focused", "softmax", "softmax"),
            split_sizes: Sequence[Optional[int]] = (None, None, 7, None),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            focusing_power: float = 3.0,
            dwc_kernel_size: int = 5,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        num_stages = len(depths)
        if not (len(num_heads) == len(attn_types) == len(split_sizes) == num_stages):
            raise ValueError("depths, num_heads, attn_types and split_sizes must have one entry per stage")
        for t in attn_types:
            if t not in ATTN_TYPES:
                raise ValueError(f"attn_types entries must be one of {ATTN_TYPES}, got {t!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dim, norm_layer)
        grid = stem_size(as_grid(img_size))
        total = sum(depths)
        # Official rule torch.linspace(0, rate, total), computed in Python (meta-device safe).
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            if i > 0:
                grid = merge_size(grid)
            stages.append(CSWinStage(
                dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], attn_types[i], split_sizes[i], grid,
                downsample=i > 0, drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, focusing_power=focusing_power,
                dwc_kernel_size=dwc_kernel_size,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: Linear trunc_normal(0.02), bias 0; LayerNorm 1/0; convs at PyTorch defaults.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # As the official recipe: only timm's default exclusions (1-D params, biases). FLatten's
        # scale (1, 1, C) and positional_encoding (1, N, C) are 3-D and decayed.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
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
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] < 3 or x.shape[-1] < 3:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W) with H, W >= 3 "
                             f"(7x7/4 stem with padding 2), got {tuple(x.shape)}")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4/8/16/32) and, unless ``intermediates_only``, the final features.

        ``indices``: last n stages if int, all if None, else explicit (negative allowed).
        ``norm``: apply the final LayerNorm to the last stage's output (the only one it is sized for).
        ``output_fmt``: ``'NCHW'`` (default) or ``'NHWC'``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates, i = [], 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one needed (the final norm with them, or when asked) and the head."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → normalised ``(B, H/32, W/32, C_4)`` tokens (NHWC)."""
        self._check_input(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------- official checkpoints
_RENAMES = (
    (r"^stage1_conv_embed\.0\.", "stem.conv."),
    (r"^stage1_conv_embed\.2\.", "stem.norm."),
    (r"^merge(\d)\.", lambda m: f"stages.{m.group(1)}.downsample."),
    (r"^stage(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"\.attns\.(\d)\.get_v\.", r".attns.\1.lepe."),
    (r"\.attns\.(\d)\.(scale|positional_encoding|dwc\.|residual\.)", r".attns.\1.mixer.\2"),
)


def _resize_positional_encoding(table: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square official ``(1, s², C)`` table to the ``(1, h·w, C)`` of ``grid``
    (as the official fine-tune loader does for 224→384)."""
    n, c = table.shape[1], table.shape[2]
    s = int(round(n ** 0.5))
    if s * s != n:
        return table  # not resizable: load_state_dict reports the size mismatch
    img = table.transpose(1, 2).reshape(1, c, s, s)
    out = resize_token_table(img.float(), grid).to(table.dtype)
    return out.reshape(1, c, grid[0] * grid[1]).transpose(1, 2)


def checkpoint_filter_fn(state_dict: Dict, model: CSWinTransformer) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: official FLatten-/InLine-CSWin state dict → this layout.

    Unwraps training containers with :func:`unwrap_checkpoint` (``'model'`` first, as the official
    evaluation; call ``unwrap_checkpoint(ckpt, prefer_ema=True)`` first for the EMA weights), drops
    non-tensor entries, strips ``module.``, renames keys (``stage1_conv_embed.{0,2}`` → ``stem.{conv,norm}``,
    ``merge{i}`` → ``stages.{i}.downsample``, ``stage{s}.{j}`` → ``stages.{s-1}.blocks.{j}``,
    ``attns.{k}.get_v`` → ``attns.{k}.lepe``, ``attns.{k}.{scale,positional_encoding,dwc,residual}`` →
    ``attns.{k}.mixer.*``) and resizes FLatten positional encodings whose grid differs from the
    model's. Native state dicts pass through unchanged.
    """
    state_dict = unwrap_checkpoint(state_dict)
    state_dict = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()
                  if isinstance(v, torch.Tensor)}
    if any(k.startswith(("stem.", "stages.")) for k in state_dict):
        return state_dict
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = rename_key(k, _RENAMES)
        if k.endswith("positional_encoding") and k in target and v.shape[1] != target[k].shape[1]:
            v = _resize_positional_encoding(v, model.get_submodule(k.rsplit(".", 1)[0]).positional_encoding_grid)
        out[k] = v
    return out


# ------------------------------------------------------------------- builders and cfgs
def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        CSWinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _tsinghua(file_id: str) -> str:
    return f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1"


def _cfg(url: str = "", img_size: int = 224, **kwargs) -> Dict:
    # Official evaluation: PIL bicubic resize to a square ⌊256/224·S⌋ (256 at 224, 438 at
    # 384: the CSWin-B-384 cfg keeps the crop), centre crop S, ImageNet mean/std. timm's 'squash'
    # crop mode with crop_pct 0.875 computes exactly these sizes (⌊S/0.875⌋).
    return {
        "url": url, "num_classes": 1000, "input_size": (3, img_size, img_size), "pool_size": None,
        "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "head", **kwargs,
    }


# Neither repository has a LICENSE file; their model files carry CSWin's MIT header (Microsoft).
_LICENSE_NOTE = ("the repository has no LICENSE file; the model code carries the MIT header of "
                 "microsoft/CSWin-Transformer",)
_FLATTEN = dict(paper_name="FLatten Transformer: Vision Transformer with Focused Linear Attention",
                paper_ids="arXiv:2308.00442", origin_url="https://github.com/LeapLabTHU/FLatten-Transformer",
                license="unknown", notes=_LICENSE_NOTE)
_INLINE = dict(paper_name="Bridging the Divide: Reconsidering Softmax and Linear Attention",
               paper_ids="arXiv:2412.06590", origin_url="https://github.com/LeapLabTHU/InLine",
               license="unknown", notes=_LICENSE_NOTE)

default_cfgs = generate_default_cfgs({
    # Released weights (the repositories' READMEs): Tsinghua Cloud share links, file names undocumented.
    "flatten_cswin_t.in1k": _cfg(_tsinghua("48ba765ba8b0451d9d5a"), **_FLATTEN),
    "flatten_cswin_s.untrained": _cfg(**_FLATTEN),
    "flatten_cswin_b.untrained": _cfg(**_FLATTEN),
    "flatten_cswin_b_384.untrained": _cfg(img_size=384, **_FLATTEN),
    "inline_cswin_t.in1k": _cfg(_tsinghua("49fa2ecc543647c4b970"), **_INLINE),
    "inline_cswin_s.in1k": _cfg(_tsinghua("59f4e65f776f4052b93c"), **_INLINE),
    "inline_cswin_b.in1k": _cfg(_tsinghua("91e17121df284ae38521"), **_INLINE),
    "inline_cswin_b_384.untrained": _cfg(img_size=384, **_INLINE),
})

# Official factories and cfgs: widths 64·2^i (T/S) or 96·2^i (B, head_dim 24), MLP ratio 4,
# linear stages 1–2 global, stage 3 stripes of 7 (12 at 384), stage 4 one window; drop-path rates of
# the official cfgs (any drop_path_rate= passed to create_model overrides them).
_SIZES = {
    "t": dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), drop_path_rate=0.2),
    "s_flatten": dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.4),
    "s_inline": dict(embed_dim=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.4),
    "b": dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "b_384": dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.7, img_size=384),
}


def _cswin(variant: str, size: str, linear: str, pretrained: bool, **kwargs) -> CSWinTransformer:
    split = 12 if size == "b_384" else 7
    args = dict(_SIZES[size], attn_types=(linear, linear, "softmax", "softmax"), split_sizes=(None, None, split, None))
    return _create_cswin(variant, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def flatten_cswin_t(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("flatten_cswin_t", "t", "focused", pretrained, **kwargs)


@register_model
def flatten_cswin_s(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("flatten_cswin_s", "s_flatten", "focused", pretrained, **kwargs)


@register_model
def flatten_cswin_b(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("flatten_cswin_b", "b", "focused", pretrained, **kwargs)


@register_model
def flatten_cswin_b_384(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("flatten_cswin_b_384", "b_384", "focused", pretrained, **kwargs)


@register_model
def inline_cswin_t(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("inline_cswin_t", "t", "inline", pretrained, **kwargs)


@register_model
def inline_cswin_s(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("inline_cswin_s", "s_inline", "inline", pretrained, **kwargs)


@register_model
def inline_cswin_b(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("inline_cswin_b", "b", "inline", pretrained, **kwargs)


@register_model
def inline_cswin_b_384(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return _cswin("inline_cswin_b_384", "b_384", "inline", pretrained, **kwargs)
