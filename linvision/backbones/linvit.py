"""LinViT: the MAViT / RAVLT hierarchical skeleton with a selectable attention mechanism.

One model class serves three registered families (they share skeleton and state-dict layout):

* ``linvit_{t,s,b,l}[_<mech>]`` — the house family: linear attention in **every** stage
  (``attn='mala'`` by default; ``_<mech>`` ∈ rala, focused, inline, qt, mirror, infsa selects another
  mechanism), so cost is linear in the number of pixels at any resolution. The mechanism's options reach
  every linear mixer through ``attn_kwargs``:
  ``timm.create_model('linvit_b_focused', attn_kwargs=dict(focusing_power=4))``.
* ``mavit_{t,s,b,l}`` — official MAViT (MALA): MALA in stages 1–2, softmax in 3–4, projection 2048/2560.
* ``ravlt_{t,s,b,l}`` — official RAVLT (RALA): RALA in stages 1–2, softmax in 3–4, projection 1024.

Skeleton: conv stem (stride 4) → 4 stages (stage i>0 starts with a 3×3/2 conv + BN downsample)
of blocks ``x += CPE(x); x += γ1·Attn(LN(x)); x += γ2·FFN(LN(x))`` → 1×1 conv projection + BN +
SiLU → global pool → linear classifier. Attention: fused 1×1 ``qkvo`` conv, a token mixer from
:mod:`linvision.attn`, LePE (5×5 depthwise on V), output gate O (no activation), 1×1 projection.

Any input size works: every stride-2 conv has padding 1 (out = ⌈in/2⌉) and RoPE is built per
stage from the runtime grid, so no padding or interpolation is needed.

Official checkpoints (``{'model': ...}``, ``{'model_ema': ...}``, ``{'state_dict_ema': ...}``, plain,
``.pth`` or ``.safetensors``) load through ``checkpoint_filter_fn``::

    timm.create_model('mavit_s', pretrained=True, pretrained_cfg_overlay=dict(file='MAViT_S.pth'))
"""
from __future__ import annotations

import math
import re
from operator import attrgetter
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d
from timm.layers.fast_norm import fast_layer_norm
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._builder import build_model_with_cfg, rename_key, unwrap_checkpoint
from ..attn import MIXERS, Rope2d, RopeGrid, create_mixer
from ..attn.ops.flags import under_dispatch_mode
from ..ops import fused_depthwise_conv, triton_available
from ..ops.depthwise import BACKENDS as FUSED_BACKENDS

__all__ = ["LinViT", "checkpoint_filter_fn", "convert_official_keys"]


class ConvStem(nn.Sequential):
    """Stride-4 stem: 3×3 convs 2/1/1/2 with BN, GELU after all but the last BN.

    Indices match the official ``patch_embed.proj`` Sequential (0, 3, 6, 9 convs; 1, 4, 7, 10 BNs).
    """

    def __init__(self, in_chans: int, dim: int):
        half = dim // 2
        super().__init__(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim),
        )


class Downsample(nn.Module):
    """3×3 stride-2 conv + BN between stages (official ``PatchMerging``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _in_strides(grad: torch.Tensor, stride: Tuple[int, ...]) -> torch.Tensor:
    """``grad`` (dense, row-major over the dims larger than 1) with the parameter's exact strides.

    Conv weights with size-1 dims, ``(C, 1, k, k)`` and ``(O, I, 1, 1)``, have several stride forms
    for one memory order (contiguous and channels_last differ only in the size-1 dims). A gradient
    that reaches the weight through an elementwise op or a reshape takes that op's form, not the
    weight's; autograd accepts it, but DDP warns and copies a gradient whose strides differ from its
    parameter's bucket view. Only the strides of size-1 dims change here, never the memory order.
    """
    if grad.stride() == stride:
        return grad
    return grad.contiguous().as_strided(grad.shape, stride)


class _AddCentreTap(torch.autograd.Function):
    """``weight + centre``, its gradient in the weight's exact strides (:func:`_in_strides`)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        ctx.weight_stride = weight.stride()
        return weight + centre

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _in_strides(grad, ctx.weight_stride), None


class _PointwiseMatrix(torch.autograd.Function):
    """An ``(O, I, 1, 1)`` weight as its ``(O, I)`` matrix, its gradient in the weight's exact strides."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight_shape, ctx.weight_stride = weight.shape, weight.stride()
        return weight.reshape(weight.shape[0], weight.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _in_strides(grad.reshape(ctx.weight_shape), ctx.weight_stride)


class ResidualDepthwiseConv(nn.Conv2d):
    """``x + DWConv(x)`` computed as ONE depthwise conv whose kernel has 1 added to its centre tap.

    The sum is the same function (``x + W * x + b = (W + δ) * x + b``), so parameters, state-dict
    keys and gradients are those of the plain conv, but the residual add — a full read and write of
    the activation — disappears (it is the largest saving in memory-bound blocks at high
    resolution). Under bf16 autocast the centre tap ``1 + w`` is rounded to bf16, an error of the
    same order as rounding the separate sum.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        centre = torch.zeros(dim, 1, kernel_size, kernel_size)
        centre[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("centre", centre, persistent=False)

    def centred_weight(self) -> torch.Tensor:
        """The kernel with 1 added to its centre tap (its gradient in the weight's strides)."""
        return _AddCentreTap.apply(self.weight, self.centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centred_weight(), self.bias)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """1×1 conv of a channels_last ``(B, I, H, W)`` by an ``(O, I)`` matrix: a GEMM over the NHWC view."""
    return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def _compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype convs and matrix products run in for ``x``: autocast's when it is on for x's device, else
    the parameters'."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else param.dtype


class _KeepsInferenceValues:
    """Mixin for modules that keep values derived from their parameters (folded weights in the compute
    dtype) between calls that record no gradient, under the attribute named by ``_KEPT``.

    :meth:`_kept` returns the stored value while its key, the dtype and every input's version counter and
    storage, is unchanged: an optimizer step, ``load_state_dict`` or ``.to()`` rebuilds it. Copies and
    pickles of the module leave it behind (derived data). Under a Python dispatch mode (FakeTensorMode, the
    FLOP counter, ...) nothing is read or kept: a value built there would be a fake tensor with the real
    parameters' key, which later real calls would compute with.
    """

    _KEPT = "_inference_kept"

    def _kept(self, dtype: torch.dtype, inputs: Sequence[Optional[torch.Tensor]], build):
        if under_dispatch_mode():
            return build()
        key = (dtype, *(None if t is None else (t._version, t.data_ptr(), t.device) for t in inputs))
        kept = self.__dict__.get(self._KEPT)
        if kept is not None and kept[0] == key:
            return kept[1]
        value = build()
        self.__dict__[self._KEPT] = (key, value)
        return value

    def _drop_kept(self) -> None:
        self.__dict__.pop(self._KEPT, None)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(self._KEPT, None)
        return state


class PointwiseConv(_KeepsInferenceValues, nn.Conv2d):
    """A 1×1 conv computed as a matrix product over the NHWC view of a channels_last input.

    Same parameters and state-dict keys as ``nn.Conv2d(in, out, 1)``. The GEMM adds the bias in its
    epilogue, where a cuDNN 1×1 conv adds it in a separate broadcast pass over the whole output (the
    largest single cost of these models at high resolution); the output is channels_last.

    ``forward(x, scale=s, input_bias=c)`` computes ``s ⊙ (W (x + c) + b)``: a per-output-channel
    scale that follows (the layer scale) and a per-input-channel constant that precedes (the bias of
    a depthwise conv) are folded into the weights, so neither costs a pass over the activations.
    """

    _KEPT = "_inference_fold"

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                input_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            weight, bias = self._fold(scale, input_bias)
        else:
            weight, bias = self._folded_for_inference(x, scale, input_bias)
        return _pointwise(x, weight, bias)

    def _fold(self, scale: Optional[torch.Tensor], input_bias: Optional[torch.Tensor]):
        weight, bias = _PointwiseMatrix.apply(self.weight), self.bias
        if input_bias is not None:
            bias = torch.addmv(bias, weight, input_bias)
        if scale is not None:
            scale = scale.reshape(-1)
            weight, bias = weight * scale[:, None], bias * scale
        return weight, bias

    def _folded_for_inference(self, x: torch.Tensor, scale: Optional[torch.Tensor],
                              input_bias: Optional[torch.Tensor]):
        """The folded ``(weight, bias)`` in the dtype the product runs in, kept between calls while no
        gradient is recorded (:class:`_KeepsInferenceValues`): the folds and autocast's casts of them are
        half of a block's small launches, and at 224² the model is bound by launches, not by the GPU."""
        dtype = _compute_dtype(x, self.weight)
        return self._kept(dtype, (self.weight, self.bias, scale, input_bias),
                          lambda: tuple(t.to(dtype) for t in self._fold(scale, input_bias)))


class ConvFfn(nn.Module):
    """1×1 conv → GELU → (y + DWConv3×3(y)) → 1×1 conv."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = PointwiseConv(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = ResidualDepthwiseConv(hidden_dim, 3)
        self.fc2 = PointwiseConv(hidden_dim, dim)

    def forward(self, x: torch.Tensor, weights: "BlockWeights") -> torch.Tensor:
        """``weights``: the block's weights (:class:`BlockWeights`: ``fc2`` carries the layer scale and the
        depthwise conv's bias)."""
        # GELU stays a separate pass: fused into the depthwise kernel it is evaluated once per tap (9×), and
        # that kernel measured 3–4× slower than GELU + cuDNN's depthwise conv on an H100.
        h = self.act(_pointwise(x, weights.fc1_weight, weights.fc1_bias))
        h = F.conv2d(h, weights.dw_weight, None, 1, 1, 1, h.shape[1])       # h + DWConv(h), bias in fc2
        return _pointwise(h, weights.fc2_weight, weights.fc2_bias)


class GatedAttention(nn.Module):
    """qkvo projection, token mixer, LePE and output gate.

    ``out = proj((mixer(q, k, v) + LePE(v)) ⊙ o)``; input/output ``(B, C, H, W)``. The mixer is
    ``create_mixer(attn, dim, num_heads, **attn_kwargs)``.
    """

    def __init__(self, dim: int, num_heads: int, attn: str, attn_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_type = attn
        self.qkvo = PointwiseConv(dim, 4 * dim)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.mixer = create_mixer(attn, dim, num_heads, **(attn_kwargs or {}))
        self.proj = PointwiseConv(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeGrid, weights: "BlockWeights", fused: bool = False) -> torch.Tensor:
        """``weights``: the block's weights (:class:`BlockWeights`: ``proj`` carries the layer scale). ``fused``:
        LePE, its bias, the add and the gate in one Triton pass (inference only, see :class:`LinViTBlock`)."""
        b, c, h, w = x.shape
        q, k, v_map, o = _pointwise(x, weights.qkvo_weight, weights.qkvo_bias).chunk(4, dim=1)
        # (B, C, H, W) -> (B, heads, N, d) with channel = head * d + j (head-major), tokens row-major.
        q, k, v = (t.reshape(b, self.num_heads, self.head_dim, h * w).transpose(-1, -2) for t in (q, k, v_map))
        u = self.mixer(q, k, v, hw=(h, w), rope=rope if self.mixer.uses_rope else None)
        u = u.transpose(-1, -2).reshape(b, c, h, w)
        if fused:
            gated = fused_depthwise_conv(v_map, self.lepe.weight, self.lepe.bias, add=u, gate=o, backend="triton")
        else:
            gated = (u + F.conv2d(v_map, weights.lepe_weight, weights.lepe_bias, 1, 2, 1, c)) * o
        return _pointwise(gated, weights.proj_weight, weights.proj_bias)


class AutocastLayerNorm2d(LayerNorm2d):
    """timm's LayerNorm2d run in the autocast dtype (fp32 statistics inside the kernel) instead of
    autocast's fp32 output, which the next conv would cast back: one pass instead of three."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)
        self._fast_norm = True

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight``, ``bias``: used instead of the module's own (prepared weights, :class:`BlockWeights`)."""
        if weight is None:
            return super().forward(x)
        return fast_layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, weight, bias, self.eps).permute(0, 3, 1, 2)


class BlockWeights(NamedTuple):
    """The tensors one :class:`LinViTBlock` computes with.

    In training built for all blocks of a stage at once, in the compute dtype, by :func:`pack_stage_weights`;
    else by the block from its own layers (:meth:`LinViTBlock.block_weights`). Depthwise weights keep their
    parameter's shape and strides, with 1 added to the centre tap (``x + DWConv(x)`` as one conv, see
    :class:`ResidualDepthwiseConv`); 1×1 conv weights are ``(out, in)`` matrices. ``proj`` carries the layer
    scale γ1; ``fc2`` carries γ2 and the FFN's depthwise-conv bias, ``fc2_bias = γ2 ⊙ (b + W · dw_bias)``
    (the folds of :class:`PointwiseConv`).
    """

    cpe_weight: torch.Tensor
    cpe_bias: torch.Tensor
    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    qkvo_weight: torch.Tensor
    qkvo_bias: torch.Tensor
    lepe_weight: torch.Tensor
    lepe_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    dw_weight: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


# The block parameter behind each BlockWeights field, in field order, then the three that are folded into
# others and have no field of their own.
_PACKED_PATHS = (
    "cpe.weight", "cpe.bias", "norm1.weight", "norm1.bias", "attn.qkvo.weight", "attn.qkvo.bias",
    "attn.lepe.weight", "attn.lepe.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.dwconv.weight", "mlp.fc2.weight", "mlp.fc2.bias",
    "gamma_1", "gamma_2", "mlp.dwconv.bias",
)
_KIND = {name: i for i, name in enumerate(BlockWeights._fields + ("gamma_1", "gamma_2", "dw_bias"))}
_OUT_KINDS = len(BlockWeights._fields)
_MATRIX_KINDS = frozenset(_KIND[k] for k in ("qkvo_weight", "proj_weight", "fc1_weight", "fc2_weight"))
_CONV_KINDS = frozenset(_KIND[k] for k in ("cpe_weight", "lepe_weight", "dw_weight"))
_CENTRED_KINDS = (_KIND["cpe_weight"], _KIND["dw_weight"])
# What the folds' gradients need of the un-folded parameters.
_FOLD_KINDS = tuple(_KIND[k] for k in ("proj_weight", "proj_bias", "fc2_weight", "fc2_bias", "gamma_1",
                                       "gamma_2", "dw_bias"))


def _param_getter(path: str):
    """``block -> parameter`` through the modules' dicts (``nn.Module.__getattr__`` is slow and a stage reads
    20 parameters per block on every training step); ``getattr`` where a wrapper keeps it elsewhere."""
    *modules, name = path.split(".")
    slow = attrgetter(path)

    def get(block: nn.Module) -> torch.Tensor:
        try:
            for part in modules:
                block = block._modules[part]
            return block._parameters[name]
        except KeyError:
            return slow(block)
    return get


_PACKED_GETTERS = tuple(_param_getter(path) for path in _PACKED_PATHS)


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _PackLayout:
    """Where each parameter sits in a stage's kind-major flat buffer, and the views taken of it (host work
    done once per stage shape; see :func:`_pack_layout`).

    ``specs[i]``: ``(shape, strides, offset)`` of parameter i (kind-major) in the flat buffer; the elements are
    in row-major order, which is the parameter's memory order when it is contiguous up to its size-1 dims
    (conv weights in channels_last included), so its own strides apply (else row-major ones). ``out_specs``:
    the same for the BlockWeights fields (1×1 conv weights as ``(out, in)`` matrices). ``kinds[k]``: the
    ``(offset, batched shape)`` of kind k: ``(nb, out, in)`` matrices, ``(nb, C, 1, k, k)`` depthwise kernels,
    ``(nb, numel)`` else; ``fold_kinds``: the same in the buffer of the ``_FOLD_KINDS`` parameters only.
    """

    def __init__(self, first: Sequence[torch.Tensor], nb: int):
        self.nb = nb
        self.specs, self.out_specs, self.kinds, offset = [], [], {}, 0
        for kind, p in enumerate(first):
            strides = tuple(p.stride()) if p.is_contiguous() else _contiguous_strides(tuple(p.shape))
            self.kinds[kind] = (offset, self._batched(kind, p, nb))
            for _ in range(nb):
                self.specs.append((tuple(p.shape), strides, offset))
                if kind in _MATRIX_KINDS:
                    self.out_specs.append(((p.shape[0], p.shape[1]), (p.shape[1], 1), offset))
                elif kind < _OUT_KINDS:
                    self.out_specs.append((tuple(p.shape), strides, offset))
                offset += p.numel()
            if kind == _OUT_KINDS - 1:
                self.n_out = offset
        self.total = offset
        self.fold_kinds, offset = {}, 0
        for kind in _FOLD_KINDS:
            self.fold_kinds[kind] = (offset, self._batched(kind, first[kind], nb))
            offset += nb * first[kind].numel()

    @staticmethod
    def _batched(kind: int, p: torch.Tensor, nb: int) -> Tuple[int, ...]:
        if kind in _MATRIX_KINDS:
            return (nb, p.shape[0], p.shape[1])
        if kind in _CONV_KINDS:
            return (nb, *p.shape)
        return (nb, p.numel())

    @staticmethod
    def views(flat: torch.Tensor, kinds: Dict[int, Tuple[int, Tuple[int, ...]]]) -> Dict[int, torch.Tensor]:
        """One batched view of ``flat`` per kind."""
        return {kind: flat[offset:offset + math.prod(shape)].view(shape) for kind, (offset, shape) in kinds.items()}


_LAYOUTS: Dict[Tuple, _PackLayout] = {}


def _pack_layout(first: Sequence[torch.Tensor], nb: int) -> _PackLayout:
    """The layout of a stage of ``nb`` blocks whose first block has the parameters ``first`` (one per kind),
    kept per shapes and strides."""
    key = (nb, tuple((tuple(p.shape), tuple(p.stride())) for p in first))
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = _PackLayout(first, nb)
    return layout


class _PackedStageWeights(torch.autograd.Function):
    """All blocks' :class:`BlockWeights` of a stage in one pass, and all those parameters' gradients in one.

    A training step of these models is bound by the host rather than the GPU: per block, autocast casts 16
    parameters to the compute dtype (and casts their gradients back) and the layer-scale and bias folds add
    a dozen small ops more, a third of a step's launches. Here a stage's parameters are concatenated kind by
    kind (every block's ``proj.weight``, then every block's ``proj.bias``, ...), so each fold is one batched
    op over the stage and the cast is one op; the backward is one cast and the folds' batched gradients.
    The values are those of the per-layer ops: the same fp32 folds, one rounding to the compute dtype.

    ``apply(layout, dtype, centres, *params)``: ``params`` kind-major in ``_PACKED_PATHS`` order, ``centres``
    the two centre-tap buffers. Returns the blocks' BlockWeights fields, kind-major.
    """

    @staticmethod
    def forward(ctx, layout: _PackLayout, dtype: torch.dtype, centres: Tuple[torch.Tensor, torch.Tensor],
                *params: torch.Tensor):
        ctx.layout, ctx.dtype = layout, dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*params)
        with torch.autocast(params[0].device.type, enabled=False):
            flat = torch.cat([p.reshape(-1) for p in params])
            k = layout.views(flat, layout.kinds)
            for kind, centre in zip(_CENTRED_KINDS, centres):
                k[kind].add_(centre)
            w2, b2 = k[_KIND["fc2_weight"]], k[_KIND["fc2_bias"]]
            b2.unsqueeze(-1).baddbmm_(w2, k[_KIND["dw_bias"]].unsqueeze(-1))   # before W2 is scaled
            for w, b, gamma in ((k[_KIND["proj_weight"]], k[_KIND["proj_bias"]], k[_KIND["gamma_1"]]),
                                (w2, b2, k[_KIND["gamma_2"]])):
                w.mul_(gamma.unsqueeze(-1))
                b.mul_(gamma)
            out = flat[:layout.n_out].to(dtype)
        return tuple(out.as_strided(shape, strides, offset) for shape, strides, offset in layout.out_specs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        params, layout = ctx.saved_tensors, ctx.layout
        grad = params[0].new_empty(layout.total)
        grad[:layout.n_out].copy_(torch.cat([
            g.reshape(-1) if g is not None else p.new_zeros(p.numel(), dtype=ctx.dtype)
            for g, p in zip(grads, params)]))
        g = layout.views(grad, layout.kinds)
        nb = layout.nb
        ref = torch.cat([params[kind * nb + j].reshape(-1) for kind in _FOLD_KINDS for j in range(nb)])
        r = layout.views(ref, layout.fold_kinds)
        # proj: W' = γ1 W, b' = γ1 b.
        gamma1 = r[_KIND["gamma_1"]]
        _rowdot_add(g[_KIND["proj_weight"]], r[_KIND["proj_weight"]], g[_KIND["proj_bias"]], r[_KIND["proj_bias"]],
                    out=g[_KIND["gamma_1"]])
        g[_KIND["proj_weight"]].mul_(gamma1.unsqueeze(-1))
        g[_KIND["proj_bias"]].mul_(gamma1)
        # fc2: W' = γ2 W, b' = γ2 (b + W d), d the depthwise conv's bias.
        gamma2, w2, d = r[_KIND["gamma_2"]], r[_KIND["fc2_weight"]], r[_KIND["dw_bias"]]
        u = torch.baddbmm(r[_KIND["fc2_bias"]].unsqueeze(-1), w2, d.unsqueeze(-1)).squeeze(-1)
        gw2, gb2 = g[_KIND["fc2_weight"]], g[_KIND["fc2_bias"]]
        _rowdot_add(gw2, w2, gb2, u, out=g[_KIND["gamma_2"]])
        gb2.mul_(gamma2)                                   # now the gradient of b (and of u)
        gw2.mul_(gamma2.unsqueeze(-1)).baddbmm_(gb2.unsqueeze(-1), d.unsqueeze(-2))
        torch.bmm(gb2.unsqueeze(-2), w2, out=g[_KIND["dw_bias"]].unsqueeze(-2))
        return (None, None, None) + tuple(grad.as_strided(shape, strides, offset)
                                          for shape, strides, offset in layout.specs)


def _rowdot_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
    """``out = Σ_i a[..., i] b[..., i] + c ⊙ d`` for ``(nb, O, I)`` a, b and ``(nb, O)`` c, d, out."""
    nb, o, i = a.shape
    dot = torch.bmm(a.reshape(nb * o, 1, i), b.reshape(nb * o, i, 1)).view(nb, o)
    torch.addcmul(dot, c, d, out=out)


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def pack_stage_weights(blocks: Sequence["LinViTBlock"], dtype: torch.dtype) -> List[BlockWeights]:
    """Every block's :class:`BlockWeights` in ``dtype``, from one :class:`_PackedStageWeights` pass (training).

    The blocks must have one shape (those of one stage)."""
    nb = len(blocks)
    params = [get(block) for get in _PACKED_GETTERS for block in blocks]
    layout = _pack_layout(params[::nb], nb)
    first = blocks[0]
    fields = _PackedStageWeights.apply(layout, dtype, (first.cpe.centre, first.mlp.dwconv.centre), *params)
    return [BlockWeights(*fields[j::nb]) for j in range(nb)]


class LinViTBlock(_KeepsInferenceValues, nn.Module):
    """CPE → attention → FFN, with layer scale ``(1, C, 1, 1)`` and drop path.

    Where no gradient is recorded (inference) the depthwise convs run fused with their neighbours
    (:func:`linvision.ops.fused_depthwise_conv`): CPE + residual + bias + LayerNorm, LePE + bias + add +
    gate, and the attention branch's residual add + LayerNorm are one Triton pass each, in place of eight
    PyTorch ops. The same function; outputs differ by the rounding of the skipped intermediate results.
    ``fused_backend`` (set by :class:`LinViT`) chooses when, see :meth:`_use_fused`.

    The block computes with a :class:`BlockWeights`: in training its stage passes one
    (:func:`pack_stage_weights`), else the block builds its own (:meth:`block_weights`, kept between
    inference calls; a CUDA graph captured in inference replays with the weights kept at capture, so
    capture again after changing the parameters). The submodules hold the parameters (and the official
    state-dict keys).
    """

    fused_backend = "auto"
    _KEPT = "_inference_weights"

    def __init__(self, dim: int, num_heads: int, attn: str, mlp_ratio: float = 3.5,
                 layer_scale_init: float = 1.0, drop_path: float = 0.0,
                 attn_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.cpe = ResidualDepthwiseConv(dim, 3)     # x + CPE(x)
        self.norm1 = AutocastLayerNorm2d(dim, eps=1e-6)
        self.attn = GatedAttention(dim, num_heads, attn, attn_kwargs)
        self.norm2 = AutocastLayerNorm2d(dim, eps=1e-6)
        self.mlp = ConvFfn(dim, int(mlp_ratio * dim))
        # Official shape (1, C, 1, 1): checkpoints load as they are, and (as in the official recipe)
        # timm's default optimizer filter weight-decays them.
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init)))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeGrid, weights: Optional[BlockWeights] = None) -> torch.Tensor:
        """``weights``: this block's weights prepared by its stage (training, :func:`pack_stage_weights`), or
        None: the block's own (:meth:`block_weights`)."""
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._drop_kept()   # stale after the next optimizer step: free it
        fused = weights is None and self._use_fused(x)
        if weights is None:
            weights = self.block_weights(x)
        # The layer scales γ are folded into the last linear map of each branch, so the residual adds are
        # plain adds of two tensors of one layout and dtype: under autocast the stream stays in the autocast
        # dtype rather than being promoted to fp32 by an fp32 γ.
        if fused:
            x, h = fused_depthwise_conv(x, self.cpe.weight, self.cpe.bias, identity=True, backend="triton",
                                        norm=(self.norm1.weight, self.norm1.bias, self.norm1.eps))
            attn = self.attn(h, rope, weights, fused=True)
            x, h = fused_depthwise_conv(x, None, identity=True, add=attn, backend="triton",
                                        norm=(self.norm2.weight, self.norm2.bias, self.norm2.eps))
            return x + self.mlp(h, weights)
        x = F.conv2d(x, weights.cpe_weight, weights.cpe_bias, 1, 1, 1, x.shape[1])    # x + CPE(x)
        h = self.norm1(x, weights.norm1_weight, weights.norm1_bias)
        x = x + self.drop_path(self.attn(h, rope, weights))
        h = self.norm2(x, weights.norm2_weight, weights.norm2_bias)
        return x + self.drop_path(self.mlp(h, weights))

    def block_weights(self, x: torch.Tensor) -> BlockWeights:
        """This block's :class:`BlockWeights` from its own layers, one op per fold (the per-layer reference of
        :func:`pack_stage_weights`; autocast casts them inside the convs and matrix products). Where no
        gradient is recorded (inference) they are kept between calls, already in the compute dtype
        (:class:`_KeepsInferenceValues`): the folds and casts are a quarter of a block's launches, and a 224²
        forward is bound by launches. Not kept under ``torch.compile``, which fuses the folds."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._layer_weights()
        dtype = _compute_dtype(x, self.cpe.weight)
        # Detached: inference values, and parameters passed on as module arguments under no_grad confuse
        # hooks that track autograd through module calls (FlopCounterMode's module tracker).
        return self._kept(dtype, [get(self) for get in _PACKED_GETTERS],
                          lambda: BlockWeights(*(t.detach().to(dtype) for t in self._layer_weights())))

    def _layer_weights(self) -> BlockWeights:
        qkvo_weight, qkvo_bias = self.attn.qkvo._fold(None, None)
        proj_weight, proj_bias = self.attn.proj._fold(self.gamma_1, None)
        fc1_weight, fc1_bias = self.mlp.fc1._fold(None, None)
        fc2_weight, fc2_bias = self.mlp.fc2._fold(self.gamma_2, self.mlp.dwconv.bias)
        return BlockWeights(
            self.cpe.centred_weight(), self.cpe.bias, self.norm1.weight, self.norm1.bias, qkvo_weight, qkvo_bias,
            self.attn.lepe.weight, self.attn.lepe.bias, proj_weight, proj_bias, self.norm2.weight, self.norm2.bias,
            fc1_weight, fc1_bias, self.mlp.dwconv.centred_weight(), fc2_weight, fc2_bias)

    def _use_fused(self, x: torch.Tensor) -> bool:
        """Whether this call runs the fused depthwise-conv kernels (:mod:`linvision.ops`): they are forward
        only, so only where autograd records nothing, and drop path must be off (eval mode or rate 0).
        ``fused_backend`` ``"auto"`` takes them for CUDA tensors, ``"triton"`` for any tensor the kernel
        takes (CPU under ``TRITON_INTERPRET=1``: tests), ``"torch"`` never. Never under a Python dispatch mode
        (fake tensors, the FLOP counter): the kernels take real tensors only, and the counter sees PyTorch's
        convolutions but not a Triton kernel, so MACs are the same on every device."""
        if self.fused_backend == "torch" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if under_dispatch_mode():
            return False
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return False
        return (x.is_cuda or self.fused_backend == "triton") and triton_available(x)


class LinViTStage(nn.Module):
    """Optional downsample, then blocks sharing one RoPE ``angle`` buffer built from the stage grid.

    ``pack_weights`` (default True): in training the blocks compute with weights prepared for the whole
    stage at once (:func:`pack_stage_weights`), False: each layer casts and folds its own (the reference).
    """

    pack_weights = True

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, attn: str, downsample: bool,
                 mlp_ratio: float, layer_scale_init: float, drop_path: Sequence[float],
                 attn_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.rope = Rope2d(dim // num_heads)
        self.blocks = nn.ModuleList([
            LinViTBlock(dim, num_heads, attn, mlp_ratio, layer_scale_init, drop_path[j], attn_kwargs)
            for j in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        rope = self.rope(x.shape[-2], x.shape[-1])
        weights = self._packed_weights(x)
        for j, blk in enumerate(self.blocks):
            w = weights[j] if weights is not None else None
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, rope, w, use_reentrant=False)
            else:
                x = blk(x, rope, w)
        return x

    def _packed_weights(self, x: torch.Tensor) -> Optional[List[BlockWeights]]:
        """The blocks' weights prepared in one pass (:func:`pack_stage_weights`) when autograd records
        (training) and ``pack_weights`` is on; None (each layer uses its own parameters) under
        ``torch.compile``, which fuses the per-layer ops itself, and where nothing is recorded (inference
        keeps each block's weights, see :meth:`LinViTBlock.block_weights`); also None for parameters that are not
        plain tensors (FSDP2 shards each block, and a block's parameters are only whole inside its forward)."""
        if not self.pack_weights or not self.blocks or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        if any(type(blk.cpe.weight) not in _PLAIN_TENSOR_TYPES for blk in self.blocks):
            return None
        return pack_stage_weights(self.blocks, _compute_dtype(x, self.blocks[0].cpe.weight))


class LinViT(nn.Module):
    """Hierarchical linear-attention ViT (MAViT/RAVLT skeleton) with timm's model API.

    Args:
        embed_dims, depths, num_heads: per-stage widths, block counts and head counts.
        attn: token mixer for the linear stages, a key of ``linvision.attn.MIXERS``.
        attn_kwargs: options of that mixer (``linvision.attn.MIXERS[attn].options()``, e.g.
            ``dict(focusing_power=4)``, ``dict(form="pure")``, ``dict(backend="torch")``), given to every mixer of
            the linear stages (the softmax stages take none); an unknown name is a ``TypeError``.
        softmax_stages: stage indices that use softmax attention instead (MAViT/RAVLT: ``(2, 3)``).
        mlp_ratio: FFN expansion (3.5 in every official variant).
        layer_scale_init: per-stage initial value of the layer-scale gammas.
        projection: width ``P`` of the 1×1 conv + BN + SiLU before pooling (the pre-logits width).
        fused_backend: where inference runs the blocks' fused depthwise-conv kernels: ``"auto"`` (CUDA
            tensors), ``"torch"`` (never: plain PyTorch ops, e.g. to compare), ``"triton"`` (any tensor the
            kernel takes; CPU under ``TRITON_INTERPRET=1``). Training always runs PyTorch ops.
        pack_weights: in training, prepare each stage's block weights in one op (:func:`pack_stage_weights`;
            default) or, False, let every layer cast and fold its own (the same values; e.g. to compare).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            attn: str = "mala",
            attn_kwargs: Optional[Dict[str, Any]] = None,
            softmax_stages: Sequence[int] = (),
            mlp_ratio: float = 3.5,
            layer_scale_init: Union[float, Sequence[float]] = 1.0,
            projection: int = 2048,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            fused_backend: str = "auto",
            pack_weights: bool = True,
    ):
        super().__init__()
        if fused_backend not in FUSED_BACKENDS:
            raise ValueError(f"fused_backend must be one of {FUSED_BACKENDS}, got {fused_backend!r}")
        if attn not in MIXERS:
            raise ValueError(f"attn must be one of {sorted(MIXERS)}, got {attn!r}")
        attn_kwargs = dict(attn_kwargs or {})
        MIXERS[attn].check_options(attn_kwargs, attn)
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == num_stages):
            raise ValueError("embed_dims, depths and num_heads must have one entry per stage")
        if any(not 0 <= s < num_stages for s in softmax_stages):
            raise ValueError(f"softmax_stages must index stages 0..{num_stages - 1}, got {tuple(softmax_stages)}")
        if isinstance(layer_scale_init, (int, float)):
            layer_scale_init = (float(layer_scale_init),) * num_stages
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.attn = attn
        self.attn_kwargs = attn_kwargs
        self.softmax_stages = tuple(softmax_stages)
        self.grad_checkpointing = False

        self.stem = ConvStem(in_chans, embed_dims[0])
        # Stochastic depth rises linearly over all blocks (computed in Python: meta-device safe).
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            softmax = i in self.softmax_stages
            stages.append(LinViTStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i],
                "softmax" if softmax else attn, downsample=i > 0, mlp_ratio=mlp_ratio,
                layer_scale_init=layer_scale_init[i], drop_path=dpr[i], attn_kwargs=None if softmax else attn_kwargs,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        for stage in stages:
            stage.pack_weights = bool(pack_weights)
        for block in self.modules():
            if isinstance(block, LinViTBlock):
                block.fused_backend = fused_backend

        self.num_features = self.head_hidden_size = projection
        self.conv_head = PointwiseConv(embed_dims[-1], projection)
        self.norm_head = nn.BatchNorm2d(projection)
        self.act_head = nn.SiLU()
        self.global_pool_layer = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        # channels_last is the model's own layout: every op here is a conv, a per-pixel norm or an
        # elementwise op, all of which read NHWC fastest, and the attention core takes q, k, v as
        # strided views of an NHWC projection without a copy. Inputs are converted on entry. Only
        # conv weights change layout: a (1, C, 1, 1) layer scale keeps the default one, the layout
        # its gradient (a reduction) comes out in, so that DDP sees matching strides.
        conv_weights = [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]
        for weight in conv_weights:
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: conv/linear trunc_normal(0.02), bias 0; norms at defaults.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Nothing beyond timm's default (1-D params and biases): the official recipe decays the
        # (1, C, 1, 1) layer-scale gammas and there is no position table or token parameter.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
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
            self.global_pool = global_pool
            self.global_pool_layer = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate an image batch and return it in the model's layout (channels_last)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last)

    def _forward_head_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_head(self.norm_head(self.conv_head(x)))

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

        ``indices``: last n stages if int, all if None, else explicit (negative allowed).
        ``norm`` is accepted for API compatibility; classification models have no stage norms.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        x = self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if isinstance(self.conv_head, nn.Conv2d) and len(stages) == len(self.stages):
            x = self._forward_head_features(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one needed (and the head when asked); return the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.conv_head, self.norm_head, self.act_head = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → ``(B, projection, ⌈H/32⌉, ⌈W/32⌉)`` (channels_last memory)."""
        x = self._check_input(x)
        x = self.stem(x)
        x = self.stages(x)
        return self._forward_head_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool_layer(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------- official checkpoints
_RENAMES = (
    (r"^module\.", ""),
    (r"^patch_embed\.proj\.", "stem."),
    (r"^layers\.(\d+)\.RoPE\.angle$", r"stages.\1.rope.angle"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.pos\.", r"stages.\1.blocks.\2.cpe."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.norm([12])\.norm\.", r"stages.\1.blocks.\2.norm\3."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.ffn\.", r"stages.\1.blocks.\2.mlp."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^proj\.", "conv_head."),
    (r"^norm\.", "norm_head."),
)


def convert_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official MAViT/RAVLT (qhfan/MALA, qhfan/RALA) state dict to LinViT's layout.

    Unwraps training checkpoints, strips ``module.``, moves each downsample to the start of the
    next stage, squeezes the 1×1-conv classifier and drops the dense-backbone ``extra_norms``.
    Native state dicts pass through unchanged. Pure: no check against a model.
    """
    # EMA first when a container holds both (timm's order; which one the authors evaluated is unknown).
    state_dict = unwrap_checkpoint(state_dict, prefer_ema=True)
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if re.match(r"^(?:module\.)?extra_norms\.", k):  # dense-backbone output norms: not part of LinViT
            continue
        m = re.match(r"^(?:module\.)?layers\.(\d+)\.downsample\.(reduction|norm)\.(.+)$", k)
        if m:
            # Official downsample sits at the end of stage i; ours starts stage i + 1.
            name = "conv" if m.group(2) == "reduction" else "norm"
            out[f"stages.{int(m.group(1)) + 1}.downsample.{name}.{m.group(3)}"] = v
            continue
        k = rename_key(k, _RENAMES)
        if k == "head.weight" and v.dim() == 4:  # the official classifier is a 1x1 conv
            v = v.flatten(1)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: LinViT) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: :func:`convert_official_keys`, then a coverage check.

    Raises ``ValueError`` naming the missing keys when the converted checkpoint does not cover
    the model (classifier keys excepted: timm drops them when ``num_classes`` differs).
    """
    state_dict = convert_official_keys(state_dict)
    missing = [k for k in model.state_dict() if k not in state_dict and not k.startswith("head.")]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys {shown}")
    return state_dict


# ------------------------------------------------------------------- builders and cfgs
def _create_linvit(variant: str, pretrained: bool = False, **kwargs) -> LinViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        LinViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> Dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head", **kwargs,
    }


_MALA = dict(paper_name="Rectifying Magnitude Neglect in Linear Attention", paper_ids="arXiv:2507.00698",
             origin_url="https://github.com/qhfan/MALA", license="unknown")
_RALA = dict(paper_name="Breaking the Low-Rank Dilemma of Linear Attention", paper_ids="arXiv:2411.07635",
             origin_url="https://github.com/qhfan/RALA", license="unknown")

# Sizes of MALA_T/S/B/L and RAVLT_T/S/B/L: the drop-path rates are the official,
# hard-coded per-variant ones; any `drop_path_rate=` passed to create_model overrides them.
_SIZES = {
    "t": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
              layer_scale_init=(1.0, 1.0, 1.0, 1.0), drop_path_rate=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
              layer_scale_init=(1.0, 1.0, 1.0, 1.0), drop_path_rate=0.15),
    "b": dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
              layer_scale_init=(1.0, 1.0, 1e-6, 1e-6), drop_path_rate=0.4),
    "l": dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
              layer_scale_init=(1e-6,) * 4, drop_path_rate=0.55),
}
_MALA_PROJECTION = {"t": 2048, "s": 2048, "b": 2048, "l": 2560}
# LinViT variants beyond the default MALA, one per mechanism module in linvision.attn.
_OTHER_MECHANISMS = ("rala", "focused", "inline", "qt", "mirror", "infsa")
_RAVLT_FILES = {"t": "RAVLT_T.pth", "s": "RAVLT_S.pth", "b": "RAVLT_B.pth", "l": "RAVLT_L.pth"}

default_cfgs = generate_default_cfgs({
    **{f"linvit_{s}.untrained": _cfg() for s in _SIZES},
    **{f"linvit_{s}_{m}.untrained": _cfg() for m in _OTHER_MECHANISMS for s in _SIZES},
    # The authors publish MAViT weights in this hub repository without documenting the file names:
    # `url` is the page to pick the file from (tools/download.py prints it; tools/convert.py stores it).
    **{f"mavit_{s}.in1k": _cfg(url="https://huggingface.co/aldjalkdf/MAViT/tree/main", **_MALA) for s in _SIZES},
    **{f"ravlt_{s}.in1k": _cfg(hf_hub_id="aldjalkdf/RAVLT", hf_hub_filename=f, **_RALA)
       for s, f in _RAVLT_FILES.items()},
})


def _linvit(variant: str, size: str, default_attn: str, pretrained: bool, **kwargs) -> LinViT:
    """LinViT of the given size; ``attn=`` overrides the mechanism named by the variant."""
    args = dict(_SIZES[size], attn=default_attn, projection=_MALA_PROJECTION[size])
    return _create_linvit(variant, pretrained=pretrained, **dict(args, **kwargs))


def _mavit(size: str, pretrained: bool, **kwargs) -> LinViT:
    args = dict(_SIZES[size], attn="mala", softmax_stages=(2, 3), projection=_MALA_PROJECTION[size])
    return _create_linvit(f"mavit_{size}", pretrained=pretrained, **dict(args, **kwargs))


def _ravlt(size: str, pretrained: bool, **kwargs) -> LinViT:
    args = dict(_SIZES[size], attn="rala", softmax_stages=(2, 3), projection=1024)
    return _create_linvit(f"ravlt_{size}", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def linvit_t(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t", "t", "mala", pretrained, **kwargs)


@register_model
def linvit_s(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s", "s", "mala", pretrained, **kwargs)


@register_model
def linvit_b(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b", "b", "mala", pretrained, **kwargs)


@register_model
def linvit_l(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l", "l", "mala", pretrained, **kwargs)


@register_model
def linvit_t_rala(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_rala", "t", "rala", pretrained, **kwargs)


@register_model
def linvit_s_rala(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_rala", "s", "rala", pretrained, **kwargs)


@register_model
def linvit_b_rala(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_rala", "b", "rala", pretrained, **kwargs)


@register_model
def linvit_l_rala(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_rala", "l", "rala", pretrained, **kwargs)


@register_model
def linvit_t_focused(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_focused", "t", "focused", pretrained, **kwargs)


@register_model
def linvit_s_focused(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_focused", "s", "focused", pretrained, **kwargs)


@register_model
def linvit_b_focused(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_focused", "b", "focused", pretrained, **kwargs)


@register_model
def linvit_l_focused(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_focused", "l", "focused", pretrained, **kwargs)


@register_model
def linvit_t_inline(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_inline", "t", "inline", pretrained, **kwargs)


@register_model
def linvit_s_inline(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_inline", "s", "inline", pretrained, **kwargs)


@register_model
def linvit_b_inline(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_inline", "b", "inline", pretrained, **kwargs)


@register_model
def linvit_l_inline(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_inline", "l", "inline", pretrained, **kwargs)


@register_model
def linvit_t_qt(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_qt", "t", "qt", pretrained, **kwargs)


@register_model
def linvit_s_qt(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_qt", "s", "qt", pretrained, **kwargs)


@register_model
def linvit_b_qt(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_qt", "b", "qt", pretrained, **kwargs)


@register_model
def linvit_l_qt(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_qt", "l", "qt", pretrained, **kwargs)


@register_model
def linvit_t_mirror(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_mirror", "t", "mirror", pretrained, **kwargs)


@register_model
def linvit_s_mirror(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_mirror", "s", "mirror", pretrained, **kwargs)


@register_model
def linvit_b_mirror(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_mirror", "b", "mirror", pretrained, **kwargs)


@register_model
def linvit_l_mirror(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_mirror", "l", "mirror", pretrained, **kwargs)


@register_model
def linvit_t_infsa(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_t_infsa", "t", "infsa", pretrained, **kwargs)


@register_model
def linvit_s_infsa(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_s_infsa", "s", "infsa", pretrained, **kwargs)


@register_model
def linvit_b_infsa(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_b_infsa", "b", "infsa", pretrained, **kwargs)


@register_model
def linvit_l_infsa(pretrained: bool = False, **kwargs) -> LinViT:
    return _linvit("linvit_l_infsa", "l", "infsa", pretrained, **kwargs)


@register_model
def mavit_t(pretrained: bool = False, **kwargs) -> LinViT:
    return _mavit("t", pretrained, **kwargs)


@register_model
def mavit_s(pretrained: bool = False, **kwargs) -> LinViT:
    return _mavit("s", pretrained, **kwargs)


@register_model
def mavit_b(pretrained: bool = False, **kwargs) -> LinViT:
    return _mavit("b", pretrained, **kwargs)


@register_model
def mavit_l(pretrained: bool = False, **kwargs) -> LinViT:
    return _mavit("l", pretrained, **kwargs)


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> LinViT:
    return _ravlt("t", pretrained, **kwargs)


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> LinViT:
    return _ravlt("s", pretrained, **kwargs)


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> LinViT:
    return _ravlt("b", pretrained, **kwargs)


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> LinViT:
    return _ravlt("l", pretrained, **kwargs)
