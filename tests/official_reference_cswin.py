"""An independent functional forward of the official FLatten-CSWin / InLine-CSWin classifiers.

Written from a description of the official code (LeapLabTHU/FLatten-Transformer
``models/flatten_cswin.py``, LeapLabTHU/InLine ``models/inline_cswin.py``) with plain torch ops
over an *official-format* state dict (``stage1_conv_embed.*``, ``stage{s}.{j}.*``, ``merge{i}.*``,
``norm.*``, ``head.*``). It shares no code with ``linvision`` and deliberately
computes differently: attention weights are formed explicitly (N×N) instead of through linear
running sums, and the cross-shaped stripes are cut out of the map one by one by slicing.

Slicing also defines the reference's answer where the official code has none: on a map whose side
is not a multiple of the split, the last stripe is simply narrower (its LePE zero-pads at its real
border), and the K positional encoding of a FLatten block is bicubically resized to the stage grid
when the input is not the size the table was trained for. At the official sizes both are exactly
the official model.

:func:`official_state_dict` builds the official key layout and shapes (random values,
or meta tensors for counting).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5  # every CSWin LayerNorm (nn.LayerNorm's default)


# ------------------------------------------------------------------ the official state dict
def official_shapes(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], img_size: int,
                    linear: str, num_classes: int = 1000) -> Dict[str, tuple]:
    """Official keys → shapes of FLatten-CSWin / InLine-CSWin.

    ``linear``: ``'L'`` (FLatten: ``scale``, ``positional_encoding``, ``get_v``, ``dwc`` in stages
    1–2) or ``'I'`` (InLine: ``get_v``, ``residual.{0,2}``). Stage 3 holds two LePE branches of C/2
    channels, stage 4 one of C.
    """
    if linear not in ("L", "I"):
        raise ValueError(linear)
    shapes: Dict[str, tuple] = {}
    c0 = embed_dim
    shapes["stage1_conv_embed.0.weight"] = (c0, 3, 7, 7)
    shapes["stage1_conv_embed.0.bias"] = (c0,)
    shapes["stage1_conv_embed.2.weight"] = (c0,)
    shapes["stage1_conv_embed.2.bias"] = (c0,)
    res = img_size // 4
    for s in range(1, 5):
        c = c0 * 2 ** (s - 1)
        d = c // num_heads[s - 1]
        for j in range(depths[s - 1]):
            p = f"stage{s}.{j}."
            shapes[p + "qkv.weight"] = (3 * c, c)
            shapes[p + "qkv.bias"] = (3 * c,)
            shapes[p + "norm1.weight"] = (c,)
            shapes[p + "norm1.bias"] = (c,)
            if s <= 2:
                a = p + "attns.0."
                shapes[a + "get_v.weight"] = (c, 1, 3, 3)
                shapes[a + "get_v.bias"] = (c,)
                if linear == "L":
                    shapes[a + "scale"] = (1, 1, c)
                    shapes[a + "positional_encoding"] = (1, res * res, c)
                    shapes[a + "dwc.weight"] = (d, 1, 5, 5)
                    shapes[a + "dwc.bias"] = (d,)
                else:
                    shapes[a + "residual.0.weight"] = (c, d, 1)
                    shapes[a + "residual.0.bias"] = (c,)
                    shapes[a + "residual.2.weight"] = (9 * c, d, 1)
                    shapes[a + "residual.2.bias"] = (9 * c,)
            elif s == 3:
                for b in (0, 1):
                    shapes[p + f"attns.{b}.get_v.weight"] = (c // 2, 1, 3, 3)
                    shapes[p + f"attns.{b}.get_v.bias"] = (c // 2,)
            else:
                shapes[p + "attns.0.get_v.weight"] = (c, 1, 3, 3)
                shapes[p + "attns.0.get_v.bias"] = (c,)
            shapes[p + "proj.weight"] = (c, c)
            shapes[p + "proj.bias"] = (c,)
            shapes[p + "mlp.fc1.weight"] = (4 * c, c)
            shapes[p + "mlp.fc1.bias"] = (4 * c,)
            shapes[p + "mlp.fc2.weight"] = (c, 4 * c)
            shapes[p + "mlp.fc2.bias"] = (c,)
            shapes[p + "norm2.weight"] = (c,)
            shapes[p + "norm2.bias"] = (c,)
        if s < 4:
            shapes[f"merge{s}.conv.weight"] = (2 * c, c, 3, 3)
            shapes[f"merge{s}.conv.bias"] = (2 * c,)
            shapes[f"merge{s}.norm.weight"] = (2 * c,)
            shapes[f"merge{s}.norm.bias"] = (2 * c,)
            res = (res + 1) // 2
    cl = c0 * 8
    shapes["norm.weight"] = (cl,)
    shapes["norm.bias"] = (cl,)
    shapes["head.weight"] = (num_classes, cl)
    shapes["head.bias"] = (num_classes,)
    return shapes


def official_state_dict(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], img_size: int,
                        linear: str, num_classes: int = 1000, seed: int = 0,
                        device: Optional[str] = None) -> Dict[str, Tensor]:
    """Random official-format weights (fan-in scaled; norms near 1; FLatten scale/PE non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in official_shapes(embed_dim, depths, num_heads, img_size, linear, num_classes).items():
        if device == "meta":
            out[k] = torch.empty(shape, device="meta")
        elif k.endswith((".scale", "positional_encoding")):
            out[k] = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            out[k] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith("weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


# ------------------------------------------------------------------ attention pieces
def _ln(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=LN_EPS)


def _lin(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return x @ sd[p + "weight"].t() + sd[p + "bias"]


def _lepe(v_img: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    """``get_v``: depthwise 3×3 (zero padding, bias) on a ``(B, C, h, w)`` window image."""
    return F.conv2d(v_img, sd[p + "get_v.weight"], sd[p + "get_v.bias"], padding=1, groups=v_img.shape[1])


def _per_head(t: Tensor, heads: int) -> Tensor:
    """``(B, h, w, C)`` → ``(B, heads, h·w, d)``, channel = head·d + i."""
    b, h, w, c = t.shape
    return t.reshape(b, h * w, heads, c // heads).permute(0, 2, 1, 3)


def _from_heads(t: Tensor, h: int, w: int) -> Tensor:
    b, heads, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, h, w, heads * d)


def _softmax_window(q: Tensor, k: Tensor, v: Tensor, sd: Dict[str, Tensor], p: str, heads: int) -> Tensor:
    """LePEAttention on one window ``(B, h, w, C′)``: softmax(d^-½ q kᵀ) v + get_v(v)."""
    b, h, w, c = q.shape
    d = c // heads
    qh, kh, vh = _per_head(q, heads), _per_head(k, heads), _per_head(v, heads)
    attn = torch.softmax((qh * d ** -0.5) @ kh.transpose(-1, -2), dim=-1)
    out = _from_heads(attn @ vh, h, w)
    return out + _lepe(v.permute(0, 3, 1, 2), sd, p).permute(0, 2, 3, 1)


def _resize_table(pe: Tensor, h: int, w: int) -> Tensor:
    n, c = pe.shape[1], pe.shape[2]
    if n == h * w and int(math.isqrt(n)) == h == w:
        return pe
    s = math.isqrt(n)
    img = pe.transpose(1, 2).reshape(1, c, s, s)
    img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
    return img.reshape(1, c, h * w).transpose(1, 2)


def _focused_window(q: Tensor, k: Tensor, v: Tensor, sd: Dict[str, Tensor], p: str, heads: int) -> Tensor:
    """FLatten (the current mean-based form) on the whole map ``(B, H, W, C)`` + DWC + LePE."""
    b, h, w, c = q.shape
    n, d = h * w, c // heads
    qt, kt, vt = q.reshape(b, n, c), k.reshape(b, n, c), v.reshape(b, n, c)
    kt = kt + _resize_table(sd[p + "positional_encoding"], h, w)       # K only, before the ReLU
    s = F.softplus(sd[p + "scale"])

    def focus(t: Tensor) -> Tensor:                                    # norms over all C channels
        u = (F.relu(t) + 1e-6) / s
        return u.norm(dim=-1, keepdim=True) * u ** 3 / (u ** 3).norm(dim=-1, keepdim=True)

    fq = focus(qt).reshape(b, n, heads, d).transpose(1, 2)
    fk = focus(kt).reshape(b, n, heads, d).transpose(1, 2)
    vh = vt.reshape(b, n, heads, d).transpose(1, 2)
    # Y_i = (q_i M) / (q_i k̄ + 1e-6) with M = (1/n) Σ k_jᵀ v_j, k̄ = (1/n) Σ k_j — as explicit weights.
    a = fq @ fk.transpose(-1, -2) / n
    y = (a @ vh) / (a.sum(dim=-1, keepdim=True) + 1e-6)
    y = y.transpose(1, 2).reshape(b, h, w, c)
    # One 5×5 depthwise conv with d channels, shared by all heads, on raw V.
    v_imgs = vh.reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
    dwc = F.conv2d(v_imgs, sd[p + "dwc.weight"], sd[p + "dwc.bias"], padding=2, groups=d)
    y = y + dwc.reshape(b, heads, d, h, w).permute(0, 3, 4, 1, 2).reshape(b, h, w, c)
    return y + _lepe(v.permute(0, 3, 1, 2), sd, p).permute(0, 2, 3, 1)


def _inline_window(q: Tensor, k: Tensor, v: Tensor, x_mean: Tensor, sd: Dict[str, Tensor], p: str,
                   heads: int) -> Tensor:
    """InLine on the whole map ``(B, H, W, C)`` + dynamic local conv + LePE."""
    b, h, w, c = q.shape
    n, d = h * w, c // heads
    qh, kh, vh = _per_head(q, heads), _per_head(k, heads), _per_head(v, heads)
    s = d ** -0.5 * qh @ kh.transpose(-1, -2)
    weights = (s - s.mean(dim=-1, keepdim=True)) / n + 1.0 / n          # rows sum to 1, may be < 0
    y = _from_heads(weights @ vh, h, w)
    # Kernels from the pre-norm token mean: grouped 1×1 Conv1d → GELU → grouped 1×1 Conv1d.
    hid = F.conv1d(x_mean[:, :, None], sd[p + "residual.0.weight"], sd[p + "residual.0.bias"], groups=heads)
    ker = F.conv1d(F.gelu(hid), sd[p + "residual.2.weight"], sd[p + "residual.2.bias"], groups=heads)
    ker = ker.reshape(b * c, 1, 3, 3)
    v_img = v.permute(0, 3, 1, 2).reshape(1, b * c, h, w)
    local = F.conv2d(v_img, ker, None, padding=1, groups=b * c).reshape(b, c, h, w).permute(0, 2, 3, 1)
    return y + local + _lepe(v.permute(0, 3, 1, 2), sd, p).permute(0, 2, 3, 1)


def _stripes(q: Tensor, k: Tensor, v: Tensor, sd: Dict[str, Tensor], p: str, heads: int, split: int,
             axis: int) -> Tensor:
    """Softmax + LePE within stripes cut along ``axis`` (2: vertical stripes of ``split`` columns;
    1: horizontal stripes of ``split`` rows); the last stripe may be narrower."""
    out = torch.empty_like(q)
    size = q.shape[axis]
    for start in range(0, size, split):
        idx = [slice(None)] * 4
        idx[axis] = slice(start, min(start + split, size))
        idx = tuple(idx)
        out[idx] = _softmax_window(q[idx], k[idx], v[idx], sd, p, heads)
    return out


# ------------------------------------------------------------------ the network
def official_forward(sd: Dict[str, Tensor], x: Tensor, *, depths: Sequence[int], num_heads: Sequence[int],
                     linear: str, split: int) -> Tensor:
    """Logits of the official FLatten-CSWin (``linear='L'``) / InLine-CSWin (``'I'``) for ``x``.

    ``split``: the stage-3 stripe width (7 at 224, 12 at 384). Stages 1–2 are global linear
    attention, stage 3 two stripe branches (first C/2 channels vertical, last C/2 horizontal) with
    heads/2 heads each, stage 4 one softmax window over the whole map.
    """
    x = F.conv2d(x, sd["stage1_conv_embed.0.weight"], sd["stage1_conv_embed.0.bias"], stride=4, padding=2)
    x = _ln(x.permute(0, 2, 3, 1), sd, "stage1_conv_embed.2.")                 # (B, H, W, C)
    for s in range(1, 5):
        if s > 1:
            p = f"merge{s - 1}."
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "conv.weight"], sd[p + "conv.bias"], stride=2, padding=1)
            x = _ln(x.permute(0, 2, 3, 1), sd, p + "norm.")
        heads = num_heads[s - 1]
        for j in range(depths[s - 1]):
            p = f"stage{s}.{j}."
            c = x.shape[-1]
            q, k, v = _lin(_ln(x, sd, p + "norm1."), sd, p + "qkv.").split(c, dim=-1)
            a = p + "attns."
            if s <= 2 and linear == "L":
                y = _focused_window(q, k, v, sd, a + "0.", heads)
            elif s <= 2:
                y = _inline_window(q, k, v, x.mean(dim=(1, 2)), sd, a + "0.", heads)   # pre-norm mean
            elif s == 3:
                h2 = c // 2
                y = torch.cat([
                    _stripes(q[..., :h2], k[..., :h2], v[..., :h2], sd, a + "0.", heads // 2, split, axis=2),
                    _stripes(q[..., h2:], k[..., h2:], v[..., h2:], sd, a + "1.", heads // 2, split, axis=1),
                ], dim=-1)
            else:
                y = _softmax_window(q, k, v, sd, a + "0.", heads)
            x = x + _lin(y, sd, p + "proj.")
            hid = F.gelu(_lin(_ln(x, sd, p + "norm2."), sd, p + "mlp.fc1."))
            x = x + _lin(hid, sd, p + "mlp.fc2.")
    x = _ln(x, sd, "norm.").mean(dim=(1, 2))
    return _lin(x, sd, "head.")
