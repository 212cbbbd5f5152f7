"""An independent functional description of the official QT-ViT classifiers (AMD_QTViT).

Two things, both over the *official* state-dict layout (``backbone.input_stem.op_list.*`` or
``backbone.stages.0.op_list.*`` for the stem, ``backbone.stages.{i}.op_list.{j}.*``,
``head.op_list.{0,2,3}.*``):

- :func:`official_layout` — every key and shape of the official model for a configuration;
- :func:`official_forward` — the official forward pass with plain torch functional ops, in the
  official operation order (EfficientViT backbone and head, LiteMLA with the quadratic Taylor
  kernel, positional encoding on K, value residual GELU(BN(V)) on a square token grid).

It shares no code with ``linvision`` so that it can catch mistakes in the model, the attention
module, the shared core and the checkpoint filter alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

EPS_ATTN = 1e-15


@dataclass(frozen=True)
class Config:
    """``series`` "b" (EfficientViTBackbone) or "l" (EfficientViTLargeBackbone); five widths and
    depths (stem first); ``dim`` the per-head width; ``head_widths`` the two hidden head widths."""
    series: str
    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    dim: int
    head_widths: Tuple[int, int]
    num_classes: int = 1000

    @property
    def norm_eps(self) -> float:
        return 1e-7 if self.series == "l" else 1e-5  # the L models set every norm's eps to 1e-7


CONFIGS = {
    "qtvit_1": Config("b", (16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "qtvit_2": Config("b", (24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "qtvit_3": Config("b", (32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
    "qtvit_4": Config("l", (32, 64, 128, 256, 512), (1, 1, 1, 6, 6), 32, (3072, 3200)),
    "qtvit_5": Config("l", (32, 64, 128, 256, 512), (1, 2, 2, 8, 8), 32, (3072, 3200)),
    "qtvit_6": Config("l", (64, 128, 256, 512, 1024), (1, 2, 2, 8, 8), 32, (6144, 6400)),
}


# ------------------------------------------------------------------------------ the layout
def _conv_layer(out: Dict, p: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool = False,
                norm: bool = True) -> None:
    out[p + "conv.weight"] = (cout, cin // groups, k, k)
    if bias:
        out[p + "conv.bias"] = (cout,)
    if norm:
        for n in ("weight", "bias", "running_mean", "running_var"):
            out[p + "norm." + n] = (cout,)
        out[p + "norm.num_batches_tracked"] = ()


def _mbconv(out: Dict, p: str, cin: int, cout: int, expand: float, fewer_norm: bool) -> None:
    mid = round(cin * expand)
    _conv_layer(out, p + "inverted_conv.", cin, mid, 1, bias=fewer_norm, norm=not fewer_norm)
    _conv_layer(out, p + "depth_conv.", mid, mid, 3, groups=mid, bias=fewer_norm, norm=not fewer_norm)
    _conv_layer(out, p + "point_conv.", mid, cout, 1)


def _lite_mla(out: Dict, p: str, c: int, dim: int, grid: int) -> None:
    total = c  # heads = c // dim, heads · dim = c
    out[p + "qkv.conv.weight"] = (3 * total, c, 1, 1)
    out[p + "aggreg.0.0.weight"] = (3 * total, 1, 5, 5)
    out[p + "aggreg.0.1.weight"] = (3 * total, dim, 1, 1)  # groups = 3·heads
    _conv_layer(out, p + "proj.", 2 * total, c, 1)
    out[p + "positional_encoding"] = (1, 2 * total, grid, grid)
    out[p + "ones_scale1"] = ()
    for n in ("weight", "bias", "running_mean", "running_var"):
        out[p + "bn." + n] = (dim,)
    out[p + "bn.num_batches_tracked"] = ()


def official_layout(cfg: Config) -> Dict[str, Tuple[int, ...]]:
    """Every state-dict key of the official model and its shape."""
    out: Dict[str, Tuple[int, ...]] = {}
    w, d = cfg.widths, cfg.depths
    if cfg.series == "b":
        stem = "backbone.input_stem.op_list."
        _conv_layer(out, stem + "0.", 3, w[0], 3)
        for j in range(1, d[0] + 1):
            _conv_layer(out, f"{stem}{j}.main.depth_conv.", w[0], w[0], 3, groups=w[0])
            _conv_layer(out, f"{stem}{j}.main.point_conv.", w[0], w[0], 1)
        for i in (0, 1):
            for j in range(d[i + 1]):
                _mbconv(out, f"backbone.stages.{i}.op_list.{j}.main.", w[i] if j == 0 else w[i + 1], w[i + 1], 4, False)
        attention_stages = ((2, 3, 16), (3, 4, 32))  # (official stage, width index, stride)
        first_expand, local_expand = 4, 4
    else:
        stem = "backbone.stages.0.op_list."
        _conv_layer(out, stem + "0.", 3, w[0], 3)
        for j in range(1, d[0] + 1):
            _conv_layer(out, f"{stem}{j}.main.conv1.", w[0], w[0], 3)
            _conv_layer(out, f"{stem}{j}.main.conv2.", w[0], w[0], 3)
        for s in (1, 2, 3):
            for j in range(d[s] + 1):
                cin, expand = (w[s - 1], 16) if j == 0 else (w[s], 4)
                p = f"backbone.stages.{s}.op_list.{j}.main."
                if s <= 2:  # FusedMBConv
                    _conv_layer(out, p + "spatial_conv.", cin, round(cin * expand), 3)
                    _conv_layer(out, p + "point_conv.", round(cin * expand), w[s], 1)
                else:
                    _mbconv(out, p, cin, w[s], expand, True)
        attention_stages = ((4, 4, 32),)
        first_expand, local_expand = 24, 6
    for stage, idx, stride in attention_stages:
        _mbconv(out, f"backbone.stages.{stage}.op_list.0.main.", w[idx - 1], w[idx], first_expand, True)
        for j in range(1, d[idx] + 1):
            p = f"backbone.stages.{stage}.op_list.{j}."
            _lite_mla(out, p + "context_module.main.", w[idx], cfg.dim, 224 // stride)
            _mbconv(out, p + "local_module.main.", w[idx], w[idx], local_expand, True)
    _conv_layer(out, "head.op_list.0.", w[-1], cfg.head_widths[0], 1)
    out["head.op_list.2.linear.weight"] = (cfg.head_widths[1], cfg.head_widths[0])
    out["head.op_list.2.norm.weight"] = (cfg.head_widths[1],)
    out["head.op_list.2.norm.bias"] = (cfg.head_widths[1],)
    out["head.op_list.3.linear.weight"] = (cfg.num_classes, cfg.head_widths[1])
    out["head.op_list.3.linear.bias"] = (cfg.num_classes,)
    return out


# ------------------------------------------------------------------------------ the forward pass
class _Net:
    def __init__(self, sd: Dict[str, Tensor], cfg: Config, square_only: bool):
        self.sd, self.cfg, self.square_only = sd, cfg, square_only
        self.act = (lambda x: F.hardswish(x)) if cfg.series == "b" else (lambda x: F.gelu(x, approximate="tanh"))

    def conv_layer(self, x: Tensor, p: str, stride: int = 1, act: bool = True) -> Tensor:
        w = self.sd[p + "conv.weight"]
        groups = x.shape[1] // w.shape[1]
        x = F.conv2d(x, w, self.sd.get(p + "conv.bias"), stride=stride, padding=w.shape[-1] // 2, groups=groups)
        if p + "norm.weight" in self.sd:
            x = F.batch_norm(x, self.sd[p + "norm.running_mean"], self.sd[p + "norm.running_var"],
                             self.sd[p + "norm.weight"], self.sd[p + "norm.bias"], False, 0.0, self.cfg.norm_eps)
        return self.act(x) if act else x

    def mbconv(self, x: Tensor, p: str, stride: int) -> Tensor:
        x = self.conv_layer(x, p + "inverted_conv.")
        x = self.conv_layer(x, p + "depth_conv.", stride)
        return self.conv_layer(x, p + "point_conv.", act=False)

    def lite_mla(self, x: Tensor, p: str) -> Tensor:
        sd, dim = self.sd, self.cfg.dim
        b, c, h, w = x.shape
        n = h * w
        qkv = F.conv2d(x, sd[p + "qkv.conv.weight"])
        agg = F.conv2d(qkv, sd[p + "aggreg.0.0.weight"], padding=2, groups=qkv.shape[1])
        agg = F.conv2d(agg, sd[p + "aggreg.0.1.weight"], groups=qkv.shape[1] // dim)
        t = torch.cat([qkv, agg], 1).reshape(b, -1, 3 * dim, n).transpose(-1, -2)  # (B, 2h, N, 3d)
        q, k, v = t[..., :dim], t[..., dim:2 * dim], t[..., 2 * dim:]
        heads = t.shape[1]
        pe = sd[p + "positional_encoding"]
        if pe.shape[-2:] != (h, w):
            pe = F.interpolate(pe, size=(h, w), mode="bicubic")
        k = k + pe.reshape(1, heads, dim, n).transpose(-1, -2)

        def feature(z: Tensor) -> Tensor:
            z = z / (z.norm(dim=-1, keepdim=True) + EPS_ATTN)
            z = z ** 2
            z = z / (z.norm(dim=-1, keepdim=True) + EPS_ATTN)
            return torch.cat([z, sd[p + "ones_scale1"] * torch.ones(b, heads, n, 1)], -1)

        v1 = F.pad(v, (0, 1), value=1.0)
        u = feature(q) @ (feature(k).transpose(-1, -2) @ v1)
        out = u[..., :-1] / (u[..., -1:] + EPS_ATTN)
        # Value residual: BN over the d channels of (B·2h) images, then GELU (exact).
        side = int(n ** 0.5)
        if side * side == n:
            img = v.reshape(b * heads, side, side, dim).permute(0, 3, 1, 2)
        elif self.square_only:
            raise ValueError(f"the official value residual needs a square token grid, got {h}x{w}")
        else:  # the per-token generalisation: same BN/GELU, the grid's shape does not matter
            img = v.reshape(b * heads, n, 1, dim).permute(0, 3, 1, 2)
        img = F.gelu(F.batch_norm(img, sd[p + "bn.running_mean"], sd[p + "bn.running_var"], sd[p + "bn.weight"],
                                  sd[p + "bn.bias"], False, 0.0, self.cfg.norm_eps))
        out = out + img.permute(0, 2, 3, 1).reshape(b, heads, n, dim)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.conv_layer(out, p + "proj.", act=False)

    def forward(self, x: Tensor) -> Tensor:
        cfg, sd = self.cfg, self.sd
        d = cfg.depths
        if cfg.series == "b":
            stem = "backbone.input_stem.op_list."
            x = self.conv_layer(x, stem + "0.", 2)
            for j in range(1, d[0] + 1):
                y = self.conv_layer(x, f"{stem}{j}.main.depth_conv.")
                x = x + self.conv_layer(y, f"{stem}{j}.main.point_conv.", act=False)
            for i in (0, 1):
                for j in range(d[i + 1]):
                    y = self.mbconv(x, f"backbone.stages.{i}.op_list.{j}.main.", 2 if j == 0 else 1)
                    x = y if j == 0 else x + y
            attention = ((2, d[3]), (3, d[4]))
        else:
            stem = "backbone.stages.0.op_list."
            x = self.conv_layer(x, stem + "0.", 2)
            for j in range(1, d[0] + 1):
                y = self.conv_layer(x, f"{stem}{j}.main.conv1.")
                x = x + self.conv_layer(y, f"{stem}{j}.main.conv2.", act=False)
            for s in (1, 2, 3):
                for j in range(d[s] + 1):
                    p = f"backbone.stages.{s}.op_list.{j}.main."
                    stride = 2 if j == 0 else 1
                    if s <= 2:
                        y = self.conv_layer(self.conv_layer(x, p + "spatial_conv.", stride), p + "point_conv.",
                                            act=False)
                    else:
                        y = self.mbconv(x, p, stride)
                    x = y if j == 0 else x + y
            attention = ((4, d[4]),)
        for s, depth in attention:
            x = self.mbconv(x, f"backbone.stages.{s}.op_list.0.main.", 2)
            for j in range(1, depth + 1):
                p = f"backbone.stages.{s}.op_list.{j}."
                x = x + self.lite_mla(x, p + "context_module.main.")
                x = x + self.mbconv(x, p + "local_module.main.", 1)
        x = self.conv_layer(x, "head.op_list.0.")
        x = x.mean((2, 3))
        x = F.linear(x, sd["head.op_list.2.linear.weight"])
        x = F.layer_norm(x, (x.shape[-1],), sd["head.op_list.2.norm.weight"], sd["head.op_list.2.norm.bias"],
                         cfg.norm_eps)
        x = self.act(x)
        return F.linear(x, sd["head.op_list.3.linear.weight"], sd["head.op_list.3.linear.bias"])


def official_forward(x: Tensor, sd: Dict[str, Tensor], cfg: Config, square_only: bool = True) -> Tensor:
    """Logits ``(B, num_classes)`` of the official model (eval mode) for ``x`` ``(B, 3, H, W)`` fp32.

    ``square_only=True`` raises where the official code fails (a non-square token grid at an
    attention stage); ``False`` applies the value residual per token instead.
    """
    with torch.no_grad():
        return _Net(sd, cfg, square_only).forward(x)
