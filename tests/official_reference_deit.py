"""An independent functional forward pass of the official InLine-DeiT classifier.

Written from the description of the official model (LeapLabTHU/InLine, ``models/inline_deit.py``)
with plain torch functional ops over an *official-format* state dict (timm 0.4.12 ViT keys plus
``blocks.{i}.attn.residual.*``). It shares no code with ``linvision``, and it evaluates InLine in its defining quadratic form (the
explicit N×N weight matrix ``w_ij = (s_ij − mean_t s_it)/N + 1/N``) rather than the linear
factorisation the model uses, so it checks the model, the core and the checkpoint filter alike.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _linear(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.linear(x, sd[p + "weight"], sd[p + "bias"])


def _layer_norm(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=1e-6)


def _inline_attention(x: Tensor, sd: Dict[str, Tensor], p: str, heads: int, grid: Tuple[int, int]) -> Tensor:
    """``x``: post-norm1 tokens ``(B, 1 + H·W, C)`` with the cls token first."""
    b, n, c = x.shape
    d = c // heads
    qkv = _linear(x, sd, p + "qkv.")
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]                  # [Q | K | V], each (B, N, C)
    qh, kh, vh = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    s = (qh @ kh.transpose(-1, -2)) * d ** -0.5                                 # s_ij = α q_i·k_j
    w = (s - s.mean(dim=-1, keepdim=True)) / n + 1.0 / n                        # injective weights, rows sum to 1
    y = (w @ vh).transpose(1, 2).reshape(b, n, c)                               # channel = head·d + i
    # Local term: per-sample, per-channel 3x3 kernels predicted from the token mean (cls included).
    mean = x.mean(dim=1, keepdim=True).transpose(1, 2)                          # (B, C, 1)
    hidden = F.gelu(F.conv1d(mean, sd[p + "residual.0.weight"], sd[p + "residual.0.bias"], groups=heads))
    kernels = F.conv1d(hidden, sd[p + "residual.2.weight"], sd[p + "residual.2.bias"], groups=heads)
    kernels = kernels.reshape(b * c, 1, 3, 3)                                   # channel c: outputs [9c, 9c+9)
    v_img = v[:, 1:].transpose(1, 2).reshape(1, b * c, grid[0], grid[1])        # patch tokens only
    local = F.conv2d(v_img, kernels, None, padding=1, groups=b * c).reshape(b, c, -1).transpose(1, 2)
    y = torch.cat([y[:, :1], y[:, 1:] + local], dim=1)                          # the cls token gets no local term
    return _linear(y, sd, p + "proj.")


def official_deit_forward(sd: Dict[str, Tensor], x: Tensor, heads: int, pos_embed: Optional[Tensor] = None) -> Tensor:
    """Logits of an official InLine-DeiT for images ``x`` of shape ``(B, 3, 16·H, 16·W)``.

    ``pos_embed`` overrides ``sd['pos_embed']`` (e.g. a table resized to another grid).
    The official code assumes a square grid; the same math is applied to any ``H×W`` here.
    """
    pos = sd["pos_embed"] if pos_embed is None else pos_embed
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    b, c, gh, gw = patches.shape
    assert pos.shape[1] == 1 + gh * gw, "pos_embed does not match the grid"
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1) + pos
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        t = t + _inline_attention(_layer_norm(t, sd, p + "norm1."), sd, p + "attn.", heads, (gh, gw))
        hidden = F.gelu(_linear(_layer_norm(t, sd, p + "norm2."), sd, p + "mlp.fc1."))
        t = t + _linear(hidden, sd, p + "mlp.fc2.")
    t = _layer_norm(t, sd, "norm.")
    return _linear(t[:, 0], sd, "head.")


def official_state_dict(embed_dim: int, depth: int, heads: int, grid: int, num_classes: int = 1000,
                        seed: int = 0) -> Dict[str, Tensor]:
    """Random weights in the official InLine-DeiT layout (values scaled to keep activations O(1))."""
    g = torch.Generator().manual_seed(seed)
    c, d = embed_dim, embed_dim // heads

    def rnd(*shape: int, fan_in: Optional[int] = None, scale: float = 1.0) -> Tensor:
        t = torch.randn(*shape, generator=g)
        return t * (scale / math.sqrt(fan_in) if fan_in else scale)

    sd = {
        "cls_token": rnd(1, 1, c, scale=0.5),
        "pos_embed": rnd(1, 1 + grid * grid, c, scale=0.5),
        "patch_embed.proj.weight": rnd(c, 3, 16, 16, fan_in=3 * 256),
        "patch_embed.proj.bias": rnd(c, scale=0.1),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for norm in ("norm1.", "norm2."):
            sd[p + norm + "weight"] = 1 + rnd(c, scale=0.1)
            sd[p + norm + "bias"] = rnd(c, scale=0.1)
        sd[p + "attn.qkv.weight"] = rnd(3 * c, c, fan_in=c, scale=2.0)
        sd[p + "attn.qkv.bias"] = rnd(3 * c, scale=0.1)
        sd[p + "attn.residual.0.weight"] = rnd(c, d, 1, fan_in=d)
        sd[p + "attn.residual.0.bias"] = rnd(c, scale=0.1)
        sd[p + "attn.residual.2.weight"] = rnd(9 * c, d, 1, fan_in=d)
        sd[p + "attn.residual.2.bias"] = rnd(9 * c, scale=0.1)
        sd[p + "attn.proj.weight"] = rnd(c, c, fan_in=c)
        sd[p + "attn.proj.bias"] = rnd(c, scale=0.1)
        sd[p + "mlp.fc1.weight"] = rnd(4 * c, c, fan_in=c)
        sd[p + "mlp.fc1.bias"] = rnd(4 * c, scale=0.1)
        sd[p + "mlp.fc2.weight"] = rnd(c, 4 * c, fan_in=4 * c)
        sd[p + "mlp.fc2.bias"] = rnd(c, scale=0.1)
    sd["norm.weight"] = 1 + rnd(c, scale=0.1)
    sd["norm.bias"] = rnd(c, scale=0.1)
    sd["head.weight"] = rnd(num_classes, c, fan_in=c)
    sd["head.bias"] = rnd(num_classes, scale=0.1)
    return sd
