"""Independent functional forward passes of the official FLatten-PVT, FLatten-PVTv2 and InLine-PVT.

Written from the official FLatten/InLine code's operations with plain torch functional ops over
*official-format* state dicts (``pos_embed{i}``, ``patch_embed{i}.*``, ``block{i}.{j}.*``,
``norm{i}`` / ``norm``, ``head.*``). It shares no code with ``linvision``, and it evaluates both
attentions in their *quadratic* form (the N×N weight matrix), so it also checks the linear-time
rewriting the library uses.

:func:`official_state_dict` writes random weights in the official key layout for a given
configuration, straight from the official models' key lists (not from a linvision model).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("flatten_pvt", "flatten_pvt_v2", "inline_pvt")


def official_state_dict(family: str, *, img_size: int, embed_dims: Sequence[int], depths: Sequence[int],
                        num_heads: Sequence[int], mlp_ratios: Sequence[float], num_classes: int = 1000,
                        in_chans: int = 3, seed: int = 0) -> Dict[str, Tensor]:
    """Random weights with the official keys and shapes of ``family``.

    Scales keep activations O(1); the FLatten ``scale`` and ``positional_encoding`` are non-zero so
    that they matter.
    """
    assert family in FAMILIES
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, Tensor] = {}

    def rand(*shape, std=None):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (std if std is not None else fan_in ** -0.5)

    def linear(key, out_f, in_f):
        sd[key + ".weight"] = rand(out_f, in_f)
        sd[key + ".bias"] = rand(out_f, std=0.1)

    def norm(key, c):
        sd[key + ".weight"] = 1 + rand(c, std=0.1)
        sd[key + ".bias"] = rand(c, std=0.1)

    v2 = family == "flatten_pvt_v2"
    prev = in_chans
    for i, (c, depth, h, r) in enumerate(zip(embed_dims, depths, num_heads, mlp_ratios), start=1):
        side = img_size // 2 ** (i + 1)        # official stage grid: img // 4, then halved per stage
        n, d, hidden = side * side, c // h, int(c * r)
        k = (7 if i == 1 else 3) if v2 else (4 if i == 1 else 2)
        sd[f"patch_embed{i}.proj.weight"] = rand(c, prev, k, k)
        sd[f"patch_embed{i}.proj.bias"] = rand(c, std=0.1)
        norm(f"patch_embed{i}.norm", c)
        if not v2:
            sd[f"pos_embed{i}"] = rand(1, n, c, std=0.5)
        for j in range(depth):
            p = f"block{i}.{j}."
            norm(p + "norm1", c)
            linear(p + "attn.q", c, c)
            linear(p + "attn.kv", 2 * c, c)
            linear(p + "attn.proj", c, c)
            if family == "inline_pvt":
                sd[p + "attn.residual.0.weight"] = rand(c, d, 1)
                sd[p + "attn.residual.0.bias"] = rand(c, std=0.1)
                sd[p + "attn.residual.2.weight"] = rand(9 * c, d, 1, std=0.3 * d ** -0.5)
                sd[p + "attn.residual.2.bias"] = rand(9 * c, std=0.05)
            else:
                sd[p + "attn.scale"] = rand(1, 1, c, std=0.5)
                sd[p + "attn.positional_encoding"] = rand(1, n, c, std=0.5)
                sd[p + "attn.dwc.weight"] = rand(d, 1, 5, 5)
                sd[p + "attn.dwc.bias"] = rand(d, std=0.1)
            norm(p + "norm2", c)
            linear(p + "mlp.fc1", hidden, c)
            if v2:
                sd[p + "mlp.dwconv.dwconv.weight"] = rand(hidden, 1, 3, 3)
                sd[p + "mlp.dwconv.dwconv.bias"] = rand(hidden, std=0.1)
            linear(p + "mlp.fc2", c, hidden)
        if v2:
            norm(f"norm{i}", c)
        prev = c
    if family == "flatten_pvt":
        norm("norm", embed_dims[-1])  # present in the official state dict, never applied
    linear("head", num_classes, embed_dims[-1])
    return sd


def _ln(x: Tensor, sd: Dict[str, Tensor], key: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps=eps)


def _fc(x: Tensor, sd: Dict[str, Tensor], key: str) -> Tensor:
    return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])


def _table(t: Tensor, hw: Tuple[int, int], mode: str) -> Tensor:
    """A square ``(1, n, C)`` table at the grid ``hw`` (linvision's extension beyond the official
    model, which only runs at its training grid: bilinear for ``pos_embed``, bicubic for the
    attention table)."""
    side = math.isqrt(t.shape[1])
    if (side, side) == tuple(hw):
        return t
    img = t.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(img, size=hw, mode=mode, align_corners=False).flatten(2).transpose(1, 2)


def _focused(t: Tensor, scale: Tensor) -> Tensor:
    """FLatten's φ with p = 3, norms over all C channels."""
    u = (F.relu(t) + 1e-6) / F.softplus(scale)
    u3 = u ** 3
    return u.norm(dim=-1, keepdim=True) * u3 / u3.norm(dim=-1, keepdim=True)


def _attention(x: Tensor, sd: Dict[str, Tensor], p: str, heads: int, hw: Tuple[int, int], family: str) -> Tensor:
    b, n, c = x.shape
    d = c // heads
    q = _fc(x, sd, p + "q")
    kv = _fc(x, sd, p + "kv")
    k, v = kv[..., :c], kv[..., c:]
    split = lambda t: t.reshape(b, n, heads, d).transpose(1, 2)  # noqa: E731  channel = head*d + i
    if family == "inline_pvt":
        # w_ij = (s_ij - mean_t s_it)/N + 1/N, s_ij = d^-1/2 q_i.k_j: the explicit N×N form.
        s = (split(q) @ split(k).transpose(-1, -2)) * d ** -0.5
        w = (s - s.mean(dim=-1, keepdim=True)) / n + 1.0 / n
        y = (w @ split(v)).transpose(1, 2).reshape(b, n, c)
        # Dynamic 3×3 depthwise conv on V, kernels from the mean of x.
        t = F.conv1d(x.mean(dim=1).unsqueeze(-1), sd[p + "residual.0.weight"], sd[p + "residual.0.bias"], groups=heads)
        t = F.conv1d(F.gelu(t), sd[p + "residual.2.weight"], sd[p + "residual.2.bias"], groups=heads)
        kernels = t.reshape(b * c, 1, 3, 3)
        v_img = v.transpose(1, 2).reshape(1, b * c, *hw)
        local = F.conv2d(v_img, kernels, None, padding=1, groups=b * c)
        y = y + local.reshape(b, c, n).transpose(1, 2)
    else:
        k = k + _table(sd[p + "positional_encoding"], hw, "bicubic")
        fq, fk = split(_focused(q, sd[p + "scale"])), split(_focused(k, sd[p + "scale"]))
        a = fq @ fk.transpose(-1, -2)                                   # (B, h, N, N), all >= 0
        # HEAD form: (q·(1/N)Σ kᵀv) / (q·mean k + 1e-6).
        y = ((a @ split(v)) / n) / (a.sum(dim=-1, keepdim=True) / n + 1e-6)
        y = y.transpose(1, 2).reshape(b, n, c)
        # One d-channel 5×5 depthwise conv shared by all heads, on raw V.
        v_img = split(v).reshape(b * heads, *hw, d).permute(0, 3, 1, 2)
        dwc = F.conv2d(v_img, sd[p + "dwc.weight"], sd[p + "dwc.bias"], padding=2, groups=d)
        y = y + dwc.reshape(b, c, n).transpose(1, 2)
    return _fc(y, sd, p + "proj")


def official_forward(family: str, sd: Dict[str, Tensor], x: Tensor, num_heads: Sequence[int],
                     return_stages: bool = False):
    """Logits of the official model described by ``sd`` (and the NCHW stage outputs if asked).

    ``x`` must be a multiple of 32 on each side; at the training resolution this is exactly the
    official forward. At other sizes the tables are resized as linvision documents.
    """
    assert family in FAMILIES
    v2 = family == "flatten_pvt_v2"
    b = x.shape[0]
    stages = []
    i = 1
    while f"patch_embed{i}.proj.weight" in sd:
        w = sd[f"patch_embed{i}.proj.weight"]
        if v2:   # OverlapPatchEmbed: 7×7/4 pad 3, then 3×3/2 pad 1
            x = F.conv2d(x, w, sd[f"patch_embed{i}.proj.bias"], stride=4 if i == 1 else 2, padding=w.shape[-1] // 2)
        else:    # PVT v1 PatchEmbed: kernel = stride = 4, then 2
            x = F.conv2d(x, w, sd[f"patch_embed{i}.proj.bias"], stride=w.shape[-1])
        _, c, h, w_ = x.shape
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{i}.norm", 1e-5)
        if not v2:
            x = x + _table(sd[f"pos_embed{i}"], (h, w_), "bilinear")
        j = 0
        while f"block{i}.{j}.norm1.weight" in sd:
            p = f"block{i}.{j}."
            x = x + _attention(_ln(x, sd, p + "norm1", 1e-6), sd, p + "attn.", num_heads[i - 1], (h, w_), family)
            y = _fc(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")
            if v2:   # fc1 → 3×3 depthwise conv (bias) → GELU → fc2
                img = y.transpose(1, 2).reshape(b, -1, h, w_)
                img = F.conv2d(img, sd[p + "mlp.dwconv.dwconv.weight"], sd[p + "mlp.dwconv.dwconv.bias"],
                               padding=1, groups=img.shape[1])
                y = img.flatten(2).transpose(1, 2)
            x = x + _fc(F.gelu(y), sd, p + "mlp.fc2")
            j += 1
        if v2:
            x = _ln(x, sd, f"norm{i}", 1e-6)
        x = x.transpose(1, 2).reshape(b, c, h, w_)
        stages.append(x)
        i += 1
    # No cls token: mean over the last stage's tokens; PVT v1 applies no final norm.
    logits = _fc(x.mean(dim=(2, 3)), sd, "head")
    return (logits, stages) if return_stages else logits


def official_key_count(family: str, depths: Sequence[int]) -> Optional[int]:
    """State-dict key count of the official model (closed-form count)."""
    per_block = 18 if family != "flatten_pvt_v2" else 20
    if family == "flatten_pvt":
        return 4 + 16 + per_block * sum(depths) + 2 + 2
    if family == "inline_pvt":
        return 4 + 16 + per_block * sum(depths) + 2
    return 16 + per_block * sum(depths) + 8 + 2
