"""An independent functional forward pass of the official MAViT / RAVLT classifiers.

Written from the official MALA/RALA code's operations with plain torch functional ops over an
*official-format* state dict (keys ``patch_embed.proj.*``, ``layers.{i}.blocks.{j}.*``, ...), in
the operation order of the official modules. It shares no code with ``linvision`` so that it
can catch mistakes in the model, the core and the checkpoint filter alike.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _bn(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def _ln2d(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    x = x.permute(0, 2, 3, 1).contiguous()
    x = F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=1e-6)
    return x.permute(0, 3, 1, 2).contiguous()


def _conv(x: Tensor, sd: Dict[str, Tensor], p: str, stride: int = 1, groups: int = 1) -> Tensor:
    w = sd[p + "weight"]
    return F.conv2d(x, w, sd[p + "bias"], stride=stride, padding=w.shape[-1] // 2, groups=groups)


def _rope_tables(angle: Tensor, h: int, w: int):
    ih = torch.arange(h).to(angle)
    iw = torch.arange(w).to(angle)
    out = []
    for fn in (torch.sin, torch.cos):
        th = fn(ih[:, None] * angle[None, :]).unsqueeze(1).repeat(1, w, 1)
        tw = fn(iw[:, None] * angle[None, :]).unsqueeze(0).repeat(h, 1, 1)
        out.append(torch.cat([th, tw], -1).flatten(0, 1))
    return out  # sin, cos: (h*w, d)


def _theta_shift(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rot * sin


def _split_heads(t: Tensor, heads: int) -> Tensor:
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h * w).transpose(-1, -2)


def _attention(x: Tensor, sd: Dict[str, Tensor], p: str, heads: int, kind: str, sin: Tensor, cos: Tensor) -> Tensor:
    b, c, h, w = x.shape
    n = h * w
    d = c // heads
    scale = d ** -0.5
    qkvo = _conv(x, sd, p + "qkvo.")
    q, k, v, o = qkvo[:, :c], qkvo[:, c:2 * c], qkvo[:, 2 * c:3 * c], qkvo[:, 3 * c:]
    lepe = _conv(v, sd, p + "lepe.", groups=c)
    q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    if kind == "softmax":
        q, k = _theta_shift(q, sin, cos), _theta_shift(k, sin, cos)
        res = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v
    elif kind == "mala":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) * scale
        q, k = _theta_shift(q, sin, cos), _theta_shift(k, sin, cos)
        kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
        res = q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=2, keepdim=True)
    elif kind == "rala":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        q_mean = q.mean(dim=2, keepdim=True)
        alpha = torch.softmax((q_mean * scale) @ k.transpose(-1, -2), dim=-1).transpose(-1, -2)  # (b, h, n, 1)
        k = k * alpha * n
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        q, k = _theta_shift(q, sin, cos), _theta_shift(k, sin, cos)
        kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
        res = q @ kv * z
    else:
        raise ValueError(kind)
    res = res.transpose(-1, -2).reshape(b, c, h, w)
    return _conv((res + lepe) * o, sd, p + "proj.")


def official_forward(sd: Dict[str, Tensor], x: Tensor, depths: Sequence[int], heads: Sequence[int],
                     linear: str) -> Tensor:
    """Logits of the official classifier described by ``sd`` (official key layout).

    ``linear``: ``"mala"`` (MAViT) or ``"rala"`` (RAVLT); stages 0–1 use it, stages 2–3 softmax.
    """
    for i in (0, 3, 6, 9):
        x = _conv(x, sd, f"patch_embed.proj.{i}.", stride=2 if i in (0, 9) else 1)
        x = _bn(x, sd, f"patch_embed.proj.{i + 1}.")
        if i != 9:
            x = F.gelu(x)
    for s, (depth, nh) in enumerate(zip(depths, heads)):
        h, w = x.shape[-2:]
        sin, cos = _rope_tables(sd[f"layers.{s}.RoPE.angle"], h, w)
        kind = linear if s < 2 else "softmax"
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            x = x + _conv(x, sd, p + "pos.", groups=x.shape[1])
            x = x + sd[p + "gamma_1"] * _attention(_ln2d(x, sd, p + "norm1.norm."), sd, p + "attn.", nh, kind, sin, cos)
            y = F.gelu(_conv(_ln2d(x, sd, p + "norm2.norm."), sd, p + "ffn.fc1."))
            y = y + _conv(y, sd, p + "ffn.dwconv.", groups=y.shape[1])
            x = x + sd[p + "gamma_2"] * _conv(y, sd, p + "ffn.fc2.")
        if s < len(depths) - 1:
            x = _bn(_conv(x, sd, f"layers.{s}.downsample.reduction.", stride=2), sd, f"layers.{s}.downsample.norm.")
    x = _bn(_conv(x, sd, "proj."), sd, "norm.")
    x = x * torch.sigmoid(x)
    x = x.mean(dim=(2, 3), keepdim=True)
    return F.conv2d(x, sd["head.weight"], sd["head.bias"]).flatten(1)
