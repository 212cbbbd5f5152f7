"""InfViT: a plain ViT whose attention is Infinite Self-Attention (InfSA), pure or linear.

The InfSA paper (Roffo & Palmer, arXiv:2603.00175) reports InfViT models but releases only the
attention module: no model code, no training script, no weights. Everything here except the
attention math is therefore a **reconstruction**, chosen as follows.

Host: timm's own ``VisionTransformer`` — patch 16 (the paper's 9216² inference at 331,776 tokens
is (9216/16)²), cls token, absolute ``pos_embed`` (resampled to any input size), pre-norm blocks
with LayerNorm eps 1e-6, exact-GELU MLP, final norm, cls token → pre-logits → head.

Attention (:class:`InfSAAttention`), per head with ``d = E/heads`` and ``ρ = sigmoid(rho_logit)``:

* pure (``form='pure'``, O(N²) time and memory — short sequences only)::

      Â = ρ · ReLU(q kᵀ/d) / (‖ReLU(q kᵀ/d)‖_F + 1e-6),   out = Â v

  (logits q·k/d, not /√d; Frobenius normalisation of each N×N slice, no row normalisation).
* linear (``form='linear'``, O(N·d))::

      α_i = ‖q_i/√d‖ / (Σ_t ‖q_t/√d‖ + 1e-6),   q̄ = Σ_i α_i q_i/√d
      a_j = ReLU(q̄ · k_j/√d),   g = ρ · Σ_j a_j v_j / (Σ_j a_j + 1e-6),   out_i = g for every token i

  so every token of a (sample, head) receives the same pooled vector; token-specific information
  flows through the residual and the MLP. Nothing in this form, nor in the host (the ``pos_embed``
  resampling is O(N·E)), allocates anything N×N, so it runs at 9216² inputs.

ρ is a trained tensor here (gradients reach ``rho_logit``); the released module reads it out with
``.item()``, so it never trains there. The cls token is an ordinary token for InfSA.

Reconstructed sizes (paper params: Pure InfViT-4L 57.7M, Linear InfViT-4L 53.5M, Pure InfViT-24L
330.6M; a softmax ViT-4L of the same recipe, 57.7M). None of width, heads or MLP ratio is
published; the arithmetic pins them down as far as it can:

* E = 1024: the pure − linear gap, 4.2M over 4 blocks, is one E×E + E linear per block
  (4 × 1,049,600 = 4.198M), so the linear model has one projection fewer. We drop the **query**
  projection: Linear-InfSA uses queries only through the pooled q̄ and the norm weights α, so its
  query is the (post-norm) token itself, split into heads; the pure form keeps q, k, v and output
  projections, exactly the parameters of softmax attention (pure = softmax ViT-4L, as reported).
* MLP ratio 4.5: the 24L − 4L difference (272.9M over 20 blocks) fixes a block at ≈13.645M,
  i.e. 4E² attention + 2·4.5·E² MLP.
* A pre-logits layer (Linear(E, E) + tanh on the cls token, the original ViT's "representation"
  layer): the remainder after the blocks is ≈3.1M while patch embedding, tokens, norms and a
  1000-class head make 2.02M; the missing ≈1.05M is one more E×E + E linear outside the blocks.
* 16 heads (head_dim 64, as ViT-L at this width): heads do not change the count.

Resulting counts: 57,648,108 (pure 4L), 53,449,708 (linear 4L), 330,554,368 (pure 24L): each
≈0.05M under the paper's rounded figure, which no further standard component closes (an MLP
hidden width of 4609 instead of 4608 would round to all three; we keep the plain ratio).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..attn import InfiniteSelfAttention
from ..attn.infsa import INFSA_FORMS
from ._builder import build_model_with_cfg
from ._vit import TokenGridVisionTransformer, filter_vit_checkpoint

__all__ = ["InfSAAttention", "InfViT", "checkpoint_filter_fn"]


class InfSAAttention(nn.Module):
    """InfSA in timm's ViT attention slot: ``(B, prefix + H·W, C)`` → same shape.

    Parameters: ``qkv`` Linear(C, 3C) for the pure form, ``kv`` Linear(C, 2C) for the linear form
    (whose query is the input token itself), ``proj`` Linear(C, C), and ``mixer.rho_logit``.
    """

    def __init__(self, dim: int, num_heads: int = 16, *, form: str = "linear", num_prefix_tokens: int = 1,
                 rho_init: float = 0.95, qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_kwargs: Optional[Dict[str, Any]] = None, device=None, dtype=None):
        super().__init__()
        if form not in INFSA_FORMS:
            raise ValueError(f"form must be one of {INFSA_FORMS}, got {form!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop and form == "linear":
            raise ValueError(f"attn_drop must be 0 for the linear form (it has no attention matrix), got {attn_drop}")
        dd = dict(device=device, dtype=dtype)
        self.form = form
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if form == "pure":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        else:
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.mixer = InfiniteSelfAttention(dim, num_heads, form=form, rho_init=rho_init,
                                           num_prefix_tokens=num_prefix_tokens, **(attn_kwargs or {})).to(**dd)
        # Dropout on Â (pure form only; the linear form has no attention matrix to drop).
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        if self.form == "pure":
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if self.attn_drop and self.training:
                y = self._pure_with_dropout(q, k, v)
            else:
                y = self.mixer(q, k, v, hw=hw)
        else:
            k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # the token is its own query
            y = self.mixer(q, k, v, hw=hw)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))

    def _pure_with_dropout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The pure form with dropout on Â (as the released module applies it), in float32."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            attn = nn.functional.dropout(self.mixer.pure_operator(q, k), p=self.attn_drop, training=True)
            return (attn @ v.to(attn.dtype)).to(v.dtype)


class InfViT(TokenGridVisionTransformer):
    """timm ``VisionTransformer`` with InfSA attention and an optional pre-logits layer.

    Args:
        attn_form: ``'linear'`` (Linear-InfSA) or ``'pure'`` (quadratic InfSA).
        rho_init: initial ρ of every block (released default 0.95).
        pre_logits: add the Linear(E, E) + tanh layer between the pooled cls token and the head.
        attn_kwargs: further options of every block's :class:`~linvision.attn.InfiniteSelfAttention` (e.g.
            ``rho_trainable``, ``backend``); its form and ρ are ``attn_form`` and ``rho_init``.
        **kwargs: :class:`TokenGridVisionTransformer` / ``VisionTransformer`` arguments.
    """

    def __init__(self, attn_form: str = "linear", rho_init: float = 0.95, pre_logits: bool = True,
                 attn_drop_rate: float = 0.0, attn_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any):
        if attn_form not in INFSA_FORMS:
            raise ValueError(f"attn_form must be one of {INFSA_FORMS}, got {attn_form!r}")
        if attn_drop_rate and attn_form == "linear":
            raise ValueError("attn_drop_rate must be 0 for the linear form (it has no attention matrix)")
        attn_kwargs = dict(attn_kwargs or {})
        InfiniteSelfAttention.check_options(attn_kwargs, "infsa")
        attn_layer = partial(InfSAAttention, form=attn_form, rho_init=rho_init, attn_kwargs=attn_kwargs)
        super().__init__(attn_layer=attn_layer, attn_drop_rate=attn_drop_rate, **kwargs)
        self.attn_form = attn_form
        dd = dict(device=self.patch_embed.proj.weight.device, dtype=self.patch_embed.proj.weight.dtype)
        if pre_logits:
            self.pre_logits = nn.Sequential(OrderedDict(
                fc=nn.Linear(self.embed_dim, self.embed_dim, **dd), act=nn.Tanh()))
            nn.init.trunc_normal_(self.pre_logits.fc.weight, std=0.02)
            nn.init.zeros_(self.pre_logits.fc.bias)
        else:
            self.pre_logits = nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^pre_logits", (99999,))],
        )

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.pre_logits = nn.Identity()
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, N, E)`` → logits, or the pre-logits features ``(B, E)`` if ``pre_logits``."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


# ------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: InfViT, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for InfViT checkpoints (no official ones exist): unwraps a
    training container (``'model'`` unless ``prefer_ema``), strips ``module.`` and resamples
    ``pos_embed`` trained for another size."""
    return filter_vit_checkpoint(state_dict, model, prefer_ema=prefer_ema)


# ------------------------------------------------------------------- builders and cfgs
def _create_infvit(variant: str, pretrained: bool = False, **kwargs) -> InfViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        InfViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    # No weights exist. DeiT evaluation preprocessing (the paper trains with the DeiT recipe).
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "mit", "paper_ids": "arXiv:2603.00175",
        "paper_name": "Infinite Self-Attention",
        "origin_url": "https://github.com/giorgioroffo/infinite-self-attention", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "infvit_linear_4l.untrained": _cfg(notes=("reconstruction; paper: IN-1k top-1 84.7, 53.5M params",)),
    "infvit_pure_4l.untrained": _cfg(notes=("reconstruction; paper: IN-1k top-1 85.1, 57.7M params",)),
    "infvit_pure_24l.untrained": _cfg(notes=("reconstruction; paper: IN-1k top-1 85.4, 330.6M params",)),
})

# Reconstructed InfViT (see the module docstring). Drop path 0.1 follows the DeiT recipe.
_BASE = dict(patch_size=16, embed_dim=1024, num_heads=16, mlp_ratio=4.5, qkv_bias=True, drop_path_rate=0.1)


def _infvit(variant: str, depth: int, form: str, pretrained: bool, **kwargs) -> InfViT:
    args = dict(_BASE, depth=depth, attn_form=form)
    return _create_infvit(variant, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def infvit_linear_4l(pretrained: bool = False, **kwargs) -> InfViT:
    """Linear InfViT-4L (reconstruction): E 1024, 16 heads, 4 blocks, MLP 4.5, no query projection;
    53,449,708 params (paper 53.5M). Linear in the number of tokens."""
    return _infvit("infvit_linear_4l", 4, "linear", pretrained, **kwargs)


@register_model
def infvit_pure_4l(pretrained: bool = False, **kwargs) -> InfViT:
    """Pure InfViT-4L (reconstruction): E 1024, 16 heads, 4 blocks, MLP 4.5; 57,648,108 params
    (paper 57.7M). Quadratic in the number of tokens."""
    return _infvit("infvit_pure_4l", 4, "pure", pretrained, **kwargs)


@register_model
def infvit_pure_24l(pretrained: bool = False, **kwargs) -> InfViT:
    """Pure InfViT-24L (reconstruction): E 1024, 16 heads, 24 blocks, MLP 4.5; 330,554,368 params
    (paper 330.6M). Quadratic in the number of tokens."""
    return _infvit("infvit_pure_24l", 24, "pure", pretrained, **kwargs)
