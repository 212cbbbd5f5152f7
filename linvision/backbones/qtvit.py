"""QT-ViT: EfficientViT with quadratic-Taylor linear attention (Xu et al., NeurIPS 2024).

``qtvit_1`` … ``qtvit_6`` are EfficientViT B1, B2, B3, L1, L2 and L3 (timm's own
:class:`~timm.models.efficientvit_mit.EfficientVit` / ``EfficientVitLarge`` hosts, MIT
EfficientViT) in which every ``LiteMLA`` is replaced by :class:`QuadraticTaylorLiteMLA`: the same
projections and multi-scale aggregation, with the ReLU kernel swapped for QT-ViT's quadratic
Taylor feature map (:mod:`linvision.attn.qt_taylor`), a learnable positional encoding added to the
keys and a value residual ``GELU(BN(V))``. Everything else (stem, MBConv stages, head) is
EfficientViT's, unchanged, so the official checkpoints load strictly and an EfficientViT
checkpoint initialises a QT-ViT with only the new attention parameters left at their init.

What the released code does that a reader might not expect:

- The 1×1 and the DW5×5-aggregated scales act as ``2h`` independent heads of width ``d``; each
  (scale, head) channel block is laid out ``[q | k | v]``.
- The kernel is the diagonal of the second-order Taylor expansion, cosine-normalised, plus a
  learnable constant: ``κ(q, k) = Σ_i q_i² k_i² / (‖q²‖ ‖k²‖) + s²`` (no first-order term).
- The positional encoding ``P`` (zero-init, ``(1, 2hd, 224/s, 224/s)`` at stride ``s``) is added to
  K only and resized bicubically when the token grid differs from ``224/s``.
- The value residual ``GELU(BN_d(V))`` is a BatchNorm over the ``d`` channels shared by all
  ``2h`` heads; despite a code comment there is no convolution.
- The official code reshapes V to a square grid for that BatchNorm, so it only runs on square
  token grids. BN and GELU act on each token separately, so the result does not depend on the
  grid's shape: here the residual is applied per token, which is the official result on square
  grids and its natural generalisation to any ``H × W`` (non-square inputs work).
- The attention core runs in fp32 whatever the autocast state (the official code disables
  autocast and up-casts fp16; bf16 inputs are up-cast here too).
- The L-series models set the ε of every norm layer to 1e-7, including the value-residual BN
  and the head's LayerNorm.

Official checkpoints (``{'state_dict': sd, 'ema': {decay: sd_ema}, ...}``, keys
``backbone.input_stem.op_list.*``, ``backbone.stages.*.op_list.*``, ``head.op_list.*``) load with::

    timm.create_model('qtvit_1', pretrained=True, pretrained_cfg_overlay=dict(file='qtvit_1.pth'))

and the EMA weights with ``checkpoint_filter_fn(unwrap_checkpoint(ckpt, prefer_ema=True), model)``.
An EfficientViT checkpoint (timm's ``efficientvit_*`` layout or the official one) loads the same
way; :func:`checkpoint_filter_fn` then logs one warning naming the QT-ViT keys it initialised
(:func:`efficientvit_to_qtvit` returns them as a list).
"""
from __future__ import annotations

import logging
import re
from functools import partial
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_module
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitLarge, LiteMLA

from ..attn.qt_taylor import QuadraticTaylorAttention
from ._builder import build_model_with_cfg, rename_key, unwrap_checkpoint

__all__ = ["QtVit", "QtVitLarge", "QuadraticTaylorLiteMLA", "checkpoint_filter_fn", "convert_official_keys",
           "efficientvit_to_qtvit"]

_logger = logging.getLogger(__name__)

# The positional encodings are sized for this input resolution (the official training resolution).
POSITIONAL_ENCODING_RESOLUTION = 224
_CLASSIFIER = "head.classifier.4"
# Keys a QT-ViT has and an EfficientViT does not (suffixes of ...context_module.main.).
_QT_KEY = re.compile(r"\.context_module\.main\.attn\.(positional_encoding|constant|bn\.\w+)$")


class QuadraticTaylorLiteMLA(LiteMLA):
    """EfficientViT's ``LiteMLA`` with QT-ViT's quadratic Taylor attention: ``(B, C, H, W)`` → same.

    ``qkv`` (1×1 conv), ``aggreg`` (DW5×5 + grouped 1×1) and ``proj`` (1×1 conv + BN) are the
    host's; the ``2h`` heads of width ``dim`` (h = C/dim heads per scale) go through
    :class:`~linvision.attn.qt_taylor.QuadraticTaylorAttention` (``attn``: the positional
    encoding, the constant ``s`` and the value-residual BN), which calls the shared
    linear-attention core.

    Args:
        in_channels, out_channels: C of the input and of the output.
        dim: per-head width ``d`` (16 in B1, 32 elsewhere).
        norm_layer: ``(qkv norm, proj norm)`` as in ``LiteMLA``; the host passes ``(None, BN)``.
        positional_encoding_size: side of ``P`` (``224 / stride``).
        eps: ε of the feature map and the division (official 1e-15).
        norm_eps: ε of the value-residual BN (1e-5; 1e-7 in L models).
    """

    def __init__(self, in_channels: int, out_channels: int, *, dim: int, positional_encoding_size: int,
                 heads_ratio: float = 1.0, norm_layer=(None, nn.BatchNorm2d), eps: float = 1e-15,
                 norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_channels, out_channels, heads_ratio=heads_ratio, dim=dim, norm_layer=norm_layer,
                         scales=(5,), eps=eps, device=device, dtype=dtype)
        del self.kernel_func  # the quadratic Taylor feature map replaces LiteMLA's ReLU kernel
        heads = self.qkv.conv.out_channels // (3 * dim)
        self.attn = QuadraticTaylorAttention(
            2 * heads * dim, 2 * heads, positional_encoding_size=positional_encoding_size, eps=eps,
            norm_eps=norm_eps).to(device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        multi_scale_qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        # (B, 2h·3d, H, W) → (B, 2h, H·W, 3d): each (scale, head) block is [q | k | v].
        multi_scale_qkv = multi_scale_qkv.reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2)
        q, k, v = multi_scale_qkv.chunk(3, dim=-1)
        out = self.attn(q, k, v, hw=(h, w))
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


register_notrace_module(QuadraticTaylorLiteMLA)


class _QuadraticTaylorHost:
    """What QtVit and QtVitLarge add to their EfficientViT host: the attention swap, input checks
    and ``no_weight_decay``."""

    def _use_quadratic_taylor_attention(self, device=None, dtype=None) -> None:
        for i, stage in enumerate(self.stages):
            stride = self.feature_info[i]["reduction"]
            for block in stage.blocks:
                if not isinstance(block, EfficientVitBlock):
                    continue
                old = block.context_module.main
                norm = old.proj.norm
                block.context_module.main = QuadraticTaylorLiteMLA(
                    old.qkv.conv.in_channels, old.proj.conv.out_channels, dim=old.dim,
                    positional_encoding_size=POSITIONAL_ENCODING_RESOLUTION // stride,
                    norm_layer=(None, partial(type(norm), eps=norm.eps)), norm_eps=norm.eps,
                    device=device, dtype=dtype)

    def _check_image(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official recipe decays everything whose name lacks "norm"/"bias", the positional
        # encodings included; timm's optimiser factory already skips 1-D/0-D tensors.
        return set()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` → final feature map ``(B, num_features, ⌈H/32⌉, ⌈W/32⌉)``."""
        self._check_image(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` (NCHW maps at strides 4, 8, 16, 32)."""
        self._check_image(x)
        return super().forward_intermediates(x, *args, **kwargs)


class QtVit(_QuadraticTaylorHost, EfficientVit):
    """QT-ViT on EfficientViT's B-series host (``qtvit_1..3``): attention in the last two stages.

    Same arguments as timm's ``EfficientVit``; input ``(B, in_chans, H, W)`` float, any H, W.
    """

    def __init__(self, device=None, dtype=None, **kwargs: Any):
        super().__init__(device=device, dtype=dtype, **kwargs)
        self._use_quadratic_taylor_attention(device=device, dtype=dtype)


class QtVitLarge(_QuadraticTaylorHost, EfficientVitLarge):
    """QT-ViT on EfficientViT's L-series host (``qtvit_4..6``): attention in the last stage only,
    every norm with ε = 1e-7 (timm's ``norm_eps`` default for this host, as in the official code).

    Same arguments as timm's ``EfficientVitLarge``; input ``(B, in_chans, H, W)`` float, any H, W.
    """

    def __init__(self, device=None, dtype=None, **kwargs: Any):
        super().__init__(device=device, dtype=dtype, **kwargs)
        # timm's host leaves the head's BatchNorm at ε = 1e-5; the official model sets every norm to 1e-7.
        self.head.in_conv.norm.eps = self.norm_eps
        self._use_quadratic_taylor_attention(device=device, dtype=dtype)


# ------------------------------------------------------------------- checkpoints
_HEAD_RENAMES = (
    (r"^head\.op_list\.0\.", "head.in_conv."),
    (r"^head\.op_list\.2\.linear\.", "head.classifier.0."),
    (r"^head\.op_list\.2\.norm\.", "head.classifier.1."),
    (r"^head\.op_list\.3\.linear\.", f"{_CLASSIFIER}."),
)
_ATTN_RENAMES = (
    (r"\.context_module\.main\.positional_encoding$", ".context_module.main.attn.positional_encoding"),
    (r"\.context_module\.main\.ones_scale1$", ".context_module.main.attn.constant"),
    (r"\.context_module\.main\.bn\.", ".context_module.main.attn.bn."),
)


def _weights(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict in a checkpoint: unwraps containers, the trainer's ``{decay: sd}`` EMA entry
    and a ``module.`` prefix."""
    state_dict = unwrap_checkpoint(checkpoint)
    if len(state_dict) == 1:
        (key, value), = state_dict.items()
        if not isinstance(key, str) and isinstance(value, Mapping):  # the EMA entry is keyed by its decay
            state_dict = dict(value)
    return {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}


def _stem_key(j: int) -> str:
    return "stem.in_conv." if j == 0 else f"stem.res{j - 1}."


def convert_official_keys(checkpoint: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Rename an official QT-ViT or EfficientViT state dict to this family's (timm's) layout.

    The official B-series keeps its stem in ``backbone.input_stem``; the L-series keeps it in
    ``backbone.stages.0``, so its stage ``i`` is timm's stage ``i - 1``. The head's
    ``op_list.{0,2,3}`` become ``in_conv``, ``classifier.{0,1}`` (linear, LayerNorm) and
    ``classifier.4``; ``positional_encoding``, ``ones_scale1`` and ``bn`` move into the attention
    module (``attn.positional_encoding``, ``attn.constant``, ``attn.bn``). Containers are unwrapped;
    native state dicts come back unchanged. Pure: no check against a model.
    """
    state_dict = _weights(checkpoint)
    if not any(k.startswith("backbone.") or k.startswith("head.op_list.") for k in state_dict):
        return state_dict
    large = not any(k.startswith("backbone.input_stem.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^backbone\.input_stem\.op_list\.(\d+)\.(.+)$", k)
        if m:
            k = _stem_key(int(m.group(1))) + m.group(2)
        m = re.match(r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.(.+)$", k)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if large and i == 0:
                k = _stem_key(j) + rest
            else:
                k = f"stages.{i - 1 if large else i}.blocks.{j}.{rest}"
        k = rename_key(k, _HEAD_RENAMES + _ATTN_RENAMES)
        out[k] = v
    return out


def efficientvit_to_qtvit(checkpoint: Mapping[str, Any], model: nn.Module) -> Tuple[Dict[str, Tensor], List[str]]:
    """Convert a checkpoint for ``model`` and complete it with any QT-ViT parameters it lacks.

    A QT-ViT checkpoint comes back converted with an empty list. An EfficientViT checkpoint (timm's
    ``efficientvit_*`` layout or the official one) has every key but the attention's positional
    encoding, constant ``s`` and value-residual BN: those are taken from ``model`` (at init: P = 0,
    s = 1, BN identity) and returned as the list of new keys — the paper's fine-tuning start.

    Raises ``ValueError`` naming the keys when anything else is missing (the final classifier
    excepted: timm drops it when ``num_classes`` differs).
    """
    state_dict = convert_official_keys(checkpoint)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    new = [k for k in missing if _QT_KEY.search(k)]
    other = [k for k in missing if not _QT_KEY.search(k) and not k.startswith(_CLASSIFIER + ".")]
    if other:
        shown = ", ".join(other[:8]) + (f", ... ({len(other)} in all)" if len(other) > 8 else "")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys {shown}")
    for k in new:
        state_dict[k] = own[k].detach().clone()
    return state_dict, new


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: :func:`efficientvit_to_qtvit`, logging the keys it added.

    Takes a container (raw weights first: pass ``unwrap_checkpoint(ckpt, prefer_ema=True)`` for the
    EMA ones), an official or a native state dict.
    """
    state_dict, new = efficientvit_to_qtvit(state_dict, model)
    if new:
        _logger.warning("initialised %d QT-ViT parameters absent from the checkpoint (an EfficientViT one?): %s",
                        len(new), ", ".join(new))
    return state_dict


# ------------------------------------------------------------------- builders and cfgs
def _create_qtvit(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    cls = QtVitLarge if variant in ("qtvit_4", "qtvit_5", "qtvit_6") else QtVit
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    # The official evaluation: Resize(⌈224 / crop⌉, bicubic) + CenterCrop(224), ImageNet mean/std.
    # timm rounds the resize down (235 instead of 236 at crop 0.95).
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.in_conv.conv", "classifier": _CLASSIFIER,
        "paper_name": "QT-ViT: Improving Linear Attention in ViT with Quadratic Taylor Expansion",
        "paper_ids": "NeurIPS 2024, openreview:V2e0A2XIPF", "origin_url": "https://github.com/AMD-AIG-AIMA/AMD_QTViT",
        "license": "apache-2.0", **kwargs,
    }


def _release(drive_id: str, host: str, top1: float, top5: float, params: str, macs: str, **kwargs) -> Dict:
    # `url` is the Drive page (a browser is needed): pretrained=True says so and names the
    # tools/convert.py line that stores the downloaded file.
    link = f"https://drive.google.com/file/d/{drive_id}/view"
    return _cfg(
        url=link,
        description=f"QT-ViT on EfficientViT-{host}, ImageNet-1k top-1 {top1} / top-5 {top5} at 224 "
                    f"(authors' README), {params} params, {macs} MACs",
        notes=(f"weights: {link} (Google Drive, needs a browser; then tools/convert.py FILE --name TAG, or "
               "pretrained_cfg_overlay=dict(file=...))",
               "official checkpoint: {'state_dict': ...} in the official EfficientViT naming; "
               "checkpoint_filter_fn converts it"),
        **kwargs)


default_cfgs = generate_default_cfgs({
    # The B1 recipe evaluates at crop 0.95, the others at 1.0.
    "qtvit_1.in1k": _release("11TNSXvfNmNYbehHbmJDyxzEz7DNlezNK", "B1", 79.6, 94.7, "9.35M", "0.52G",
                             crop_pct=0.95),
    "qtvit_2.in1k": _release("1DUzJ7-nCWHZrMfSX4MEXbAC4GGabQ5GA", "B2", 82.5, 95.9, "24.86M", "1.60G"),
    "qtvit_3.in1k": _release("1uvQr0tE0Jy7VLCLFYraNKysPshlfw-La", "B3", 83.9, 96.7, "49.70M", "3.97G"),
    "qtvit_4.untrained": _cfg(description="QT-ViT on EfficientViT-L1 (reported ImageNet-1k top-1 84.7 / "
                                          "top-5 96.7 at 224; no weights released), 52.96M params, 5.26G MACs"),
    "qtvit_5.in1k": _release("1YKOFu8PYQvHM89ZKB9P_2blcHInGKS3H", "L2", 85.2, 97.0, "64.11M", "6.96G"),
    "qtvit_6.in1k": _release("1MnAgjk_uOD6wH7QyCkF4z4bxJXQf4PTr", "L3", 86.0, 97.3, "246.84M", "27.60G"),
})


@register_model
def qtvit_1(pretrained: bool = False, **kwargs) -> QtVit:
    """QT-ViT-1: EfficientViT-B1 host."""
    model_args = dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16, head_widths=(1536, 1600))
    return _create_qtvit("qtvit_1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def qtvit_2(pretrained: bool = False, **kwargs) -> QtVit:
    """QT-ViT-2: EfficientViT-B2 host."""
    model_args = dict(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), head_dim=32, head_widths=(2304, 2560))
    return _create_qtvit("qtvit_2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def qtvit_3(pretrained: bool = False, **kwargs) -> QtVit:
    """QT-ViT-3: EfficientViT-B3 host."""
    model_args = dict(widths=(32, 64, 128, 256, 512), depths=(1, 4, 6, 6, 9), head_dim=32, head_widths=(2304, 2560))
    return _create_qtvit("qtvit_3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def qtvit_4(pretrained: bool = False, **kwargs) -> QtVitLarge:
    """QT-ViT-4: EfficientViT-L1 host."""
    model_args = dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 6), head_dim=32, head_widths=(3072, 3200))
    return _create_qtvit("qtvit_4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def qtvit_5(pretrained: bool = False, **kwargs) -> QtVitLarge:
    """QT-ViT-5: EfficientViT-L2 host."""
    model_args = dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 8, 8), head_dim=32, head_widths=(3072, 3200))
    return _create_qtvit("qtvit_5", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def qtvit_6(pretrained: bool = False, **kwargs) -> QtVitLarge:
    """QT-ViT-6: EfficientViT-L3 host."""
    model_args = dict(widths=(64, 128, 256, 512, 1024), depths=(1, 2, 2, 8, 8), head_dim=32, head_widths=(6144, 6400))
    return _create_qtvit("qtvit_6", pretrained=pretrained, **dict(model_args, **kwargs))
