"""The official FLatten-Swin / InLine-Swin classifiers: state-dict layout and a functional forward.

Written from the official FLatten/InLine code's operations with plain torch functional ops over an
*official-format* state dict (``layers.{i}.blocks.{j}.*``, downsample at the end of stage i,
``attn.scale``/``attn.positional_encoding``/``attn.dwc`` for FLatten, ``attn.residual.*`` for
InLine, the stored ``relative_position_index``/``attn_mask`` buffers of the Swin blocks), in the
operation order of the official modules. It shares no code with ``linvision`` so that it can catch
mistakes in the model, the mechanisms, the core and the checkpoint filter alike.

The attention of the linear blocks is evaluated in its quadratic form (the full N×N weight matrix),
which is mathematically the official linear-order computation.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5  # every Swin LayerNorm


# ------------------------------------------------------------------ configuration and layout
def stage_block_types(attn_types: str, depths: Sequence[int]) -> List[str]:
    """Official ``ATTN_TYPE`` → one string of L/I/S per stage (``M`` stages: first k linear, rest S)."""
    letters = attn_types.rstrip("0123456789")
    k = int(attn_types[len(letters):] or 0)
    linear = "I" if "I" in letters else "L"
    return [linear * k + "S" * (d - k) if c == "M" else c * d for c, d in zip(letters, depths)]


def stage_resolutions(img_size: int, n: int = 4) -> List[int]:
    return [img_size // 4 // 2 ** i for i in range(n)]


def window_and_shift(res: int, window: int, j: int) -> Tuple[int, int]:
    """Official S block: window clamped to the map (then no shift), shift window//2 on odd j."""
    if res <= window:
        return res, 0
    return window, (window // 2 if j % 2 else 0)


def relative_position_index(ws: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(res: int, ws: int, shift: int) -> Tensor:
    """The official (nW, ws², ws²) mask: 0 inside a region, -100 across regions."""
    img = torch.zeros(res, res)
    cnt = 0
    bounds = ((0, res - ws), (res - ws, res - shift), (res - shift, res))
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            img[h0:h1, w0:w1] = cnt
            cnt += 1
    win = img.reshape(res // ws, ws, res // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def official_layout(attn_types: str, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                    img_size: int = 224, window_size: int = 7, num_classes: int = 1000) -> Dict[str, tuple]:
    """``{key: shape}`` of the official state dict, buffers included, in order."""
    types = stage_block_types(attn_types, depths)
    res = stage_resolutions(img_size, len(depths))
    out: Dict[str, tuple] = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4), "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,),
    }
    for i, (depth, h) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2 ** i
        d = c // h
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            kind = types[i][j]
            out[p + "norm1.weight"] = (c,)
            out[p + "norm1.bias"] = (c,)
            if kind == "L":
                out[p + "attn.scale"] = (1, 1, c)
                out[p + "attn.positional_encoding"] = (1, res[i] ** 2, c)
            elif kind == "S":
                ws, shift = window_and_shift(res[i], window_size, j)
                out[p + "attn.relative_position_bias_table"] = ((2 * ws - 1) ** 2, h)
                out[p + "attn.relative_position_index"] = (ws * ws, ws * ws)
            out[p + "attn.qkv.weight"] = (3 * c, c)
            out[p + "attn.qkv.bias"] = (3 * c,)
            out[p + "attn.proj.weight"] = (c, c)
            out[p + "attn.proj.bias"] = (c,)
            if kind == "L":
                out[p + "attn.dwc.weight"] = (d, 1, 5, 5)
                out[p + "attn.dwc.bias"] = (d,)
            elif kind == "I":
                out[p + "attn.residual.0.weight"] = (c, d, 1)
                out[p + "attn.residual.0.bias"] = (c,)
                out[p + "attn.residual.2.weight"] = (9 * c, d, 1)
                out[p + "attn.residual.2.bias"] = (9 * c,)
            out[p + "norm2.weight"] = (c,)
            out[p + "norm2.bias"] = (c,)
            out[p + "mlp.fc1.weight"] = (4 * c, c)
            out[p + "mlp.fc1.bias"] = (4 * c,)
            out[p + "mlp.fc2.weight"] = (c, 4 * c)
            out[p + "mlp.fc2.bias"] = (c,)
            if kind == "S" and shift:
                out[p + "attn_mask"] = ((res[i] // ws) ** 2, ws * ws, ws * ws)
        if i < len(depths) - 1:
            out[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            out[f"layers.{i}.downsample.norm.weight"] = (4 * c,)
            out[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
    c = embed_dim * 2 ** (len(depths) - 1)
    out["norm.weight"] = (c,)
    out["norm.bias"] = (c,)
    out["head.weight"] = (num_classes, c)
    out["head.bias"] = (num_classes,)
    return out


def is_buffer(key: str) -> bool:
    return key.endswith("relative_position_index") or key.endswith("attn_mask")


def random_official_state_dict(attn_types: str, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                               img_size: int, window_size: int, num_classes: int, seed: int = 0) -> Dict[str, Tensor]:
    """Random weights in the official layout (scaled to keep activations O(1)), official buffers included.

    FLatten's scale and positional table and the relative-position tables get non-trivial values so
    that every parameter matters to the logits.
    """
    g = torch.Generator().manual_seed(seed)
    res = stage_resolutions(img_size, len(depths))
    sd = {}
    for k, shape in official_layout(attn_types, embed_dim, depths, num_heads, img_size, window_size,
                                    num_classes).items():
        if k.endswith("relative_position_index"):
            val = relative_position_index(math.isqrt(shape[0]))
        elif k.endswith("attn_mask"):
            i = int(k.split(".")[1])
            ws = math.isqrt(shape[1])
            val = shifted_window_mask(res[i], ws, ws // 2)
        elif k.endswith("attn.scale"):
            val = 0.5 * torch.randn(shape, generator=g)
        elif k.endswith("positional_encoding") or k.endswith("relative_position_bias_table"):
            val = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            val = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif k.endswith("weight"):
            val = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            val = 0.1 * torch.randn(shape, generator=g)
        assert tuple(val.shape) == tuple(shape), k
        sd[k] = val
    return sd


# ------------------------------------------------------------------ functional forward
def _ln(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps=LN_EPS)


def _linear(x: Tensor, sd: Dict[str, Tensor], p: str) -> Tensor:
    return F.linear(x, sd[p + "weight"], sd.get(p + "bias"))


def _heads(t: Tensor, h: int) -> Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).permute(0, 2, 1, 3)  # (B, h, N, d), channel = head·d + i


def _merge(t: Tensor) -> Tensor:
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def flatten_attention(x: Tensor, sd: Dict[str, Tensor], p: str, h: int, hw: Tuple[int, int]) -> Tensor:
    """FLatten (HEAD form): focused φ over all C channels, PE on K, shared DWC on V."""
    b, n, c = x.shape
    q, k, v = _linear(x, sd, p + "qkv.").split(c, dim=-1)
    k = k + sd[p + "positional_encoding"]
    s = F.softplus(sd[p + "scale"])

    def phi(t):
        u = (F.relu(t) + 1e-6) / s
        u3 = u ** 3
        return u.norm(dim=-1, keepdim=True) * u3 / u3.norm(dim=-1, keepdim=True)

    q, k, vh = _heads(phi(q), h), _heads(phi(k), h), _heads(v, h)
    a = q @ k.transpose(-1, -2) / n                                    # (B, h, N, N)
    y = (a @ vh) / (a.sum(dim=-1, keepdim=True) + 1e-6)
    d = c // h
    dwc = []
    for head in range(h):  # one (d, 1, 5, 5) kernel shared by all heads, on raw V
        img = vh[:, head].transpose(1, 2).reshape(b, d, *hw)
        out = F.conv2d(img, sd[p + "dwc.weight"], sd[p + "dwc.bias"], padding=2, groups=d)
        dwc.append(out.flatten(2).transpose(1, 2))
    y = _merge(y) + torch.cat(dwc, dim=-1)
    return _linear(y, sd, p + "proj.")


def inline_attention(x: Tensor, sd: Dict[str, Tensor], p: str, h: int, hw: Tuple[int, int]) -> Tensor:
    """InLine: w_ij = (s_ij − mean_t s_it)/N + 1/N, plus the token-mean-predicted 3×3 conv."""
    b, n, c = x.shape
    d = c // h
    q, k, v = (_heads(t, h) for t in _linear(x, sd, p + "qkv.").split(c, dim=-1))
    s = d ** -0.5 * q @ k.transpose(-1, -2)
    w = (s - s.mean(dim=-1, keepdim=True)) / n + 1.0 / n
    y = _merge(w @ v)
    hidden = F.gelu(F.conv1d(x.mean(dim=1)[:, :, None], sd[p + "residual.0.weight"], sd[p + "residual.0.bias"],
                             groups=h))
    kernels = F.conv1d(hidden, sd[p + "residual.2.weight"], sd[p + "residual.2.bias"], groups=h).reshape(b, c, 1, 3, 3)
    v_img = _merge(v).transpose(1, 2).reshape(b, c, *hw)
    local = torch.cat([F.conv2d(v_img[i:i + 1], kernels[i], padding=1, groups=c) for i in range(b)])
    y = y + local.flatten(2).transpose(1, 2)
    return _linear(y, sd, p + "proj.")


def window_attention(x: Tensor, sd: Dict[str, Tensor], p: str, h: int, hw: Tuple[int, int], ws: int,
                     shift: int) -> Tensor:
    """Official Swin (S)W-MSA on the post-norm1 tokens, with the stored index and mask buffers."""
    b, n, c = x.shape
    H, W = hw
    x = x.reshape(b, H, W, c)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    win = x.reshape(b, H // ws, ws, W // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    bw, nt, _ = win.shape
    q, k, v = (_heads(t, h) for t in _linear(win, sd, p + "attn.qkv.").split(c, dim=-1))
    attn = (q * (c // h) ** -0.5) @ k.transpose(-1, -2)
    index = sd[p + "attn.relative_position_index"]
    bias = sd[p + "attn.relative_position_bias_table"][index.reshape(-1)].reshape(nt, nt, h).permute(2, 0, 1)
    attn = attn + bias[None]
    if shift:
        mask = sd[p + "attn_mask"]
        nw = mask.shape[0]
        attn = (attn.reshape(bw // nw, nw, h, nt, nt) + mask[None, :, None]).reshape(bw, h, nt, nt)
    y = _linear(_merge(attn.softmax(dim=-1) @ v), sd, p + "attn.proj.")
    y = y.reshape(b, H // ws, W // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, H, W, c)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return y.reshape(b, n, c)


def patch_merging(x: Tensor, sd: Dict[str, Tensor], p: str, hw: Tuple[int, int]) -> Tensor:
    b, n, c = x.shape
    x = x.reshape(b, hw[0], hw[1], c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    x = _ln(x.reshape(b, -1, 4 * c), sd, p + "norm.")
    return _linear(x, sd, p + "reduction.")


def official_forward(sd: Dict[str, Tensor], x: Tensor, attn_types: str, depths: Sequence[int],
                     num_heads: Sequence[int], window_size: int) -> Tensor:
    """Logits of the official FLatten-/InLine-Swin described by ``sd`` for a square image batch ``x``."""
    types = stage_block_types(attn_types, depths)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    H, W = x.shape[-2:]
    x = _ln(x.flatten(2).transpose(1, 2), sd, "patch_embed.norm.")
    for i, (depth, h) in enumerate(zip(depths, num_heads)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            y = _ln(x, sd, p + "norm1.")
            if types[i][j] == "L":
                y = flatten_attention(y, sd, p + "attn.", h, (H, W))
            elif types[i][j] == "I":
                y = inline_attention(y, sd, p + "attn.", h, (H, W))
            else:
                ws, shift = window_and_shift(H, window_size, j)
                y = window_attention(y, sd, p, h, (H, W), ws, shift)
            x = x + y
            x = x + _linear(F.gelu(_linear(_ln(x, sd, p + "norm2."), sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
        if i < len(depths) - 1:
            x = patch_merging(x, sd, f"layers.{i}.downsample.", (H, W))
            H, W = H // 2, W // 2
    x = _ln(x, sd, "norm.").mean(dim=1)
    return _linear(x, sd, "head.")
