"""The dense-prediction backbone shared by the torchvision and mm* adapters.

:class:`DenseBackbone` turns any timm-registered model (``features_only=True``) into a detection /
segmentation trunk: a list of NCHW maps (high resolution first), an optional LayerNorm2d per output
(the official MALA/RALA dense backbones' ``extra_norms``, with the same key names
``extra_norms.{i}.norm.{weight,bias}``), ``frozen_stages`` and ``norm_eval`` with mmdet's meaning,
and :meth:`DenseBackbone.load_checkpoint`, which loads

* official classification checkpoints (qhfan/MALA, qhfan/RALA: ``{'model': ...}`` …),
* official dense checkpoints (mmdet/mmseg: ``{'state_dict': {'backbone.…', 'neck.…', …}, 'meta'}``,
  whose ``extra_norms`` become ours),
* linvision's own weights (timm-native classification state dicts, ``.safetensors`` from
  ``tools/train.py``, and checkpoints of the detectors/segmenters built on this class),

converting official keys with the backbone family's ``checkpoint_filter_fn`` and reporting what did
not load (unlike mmengine's silent ``strict=False`` Pretrained init).

Key layout: ``features.model.<timm LinViT keys>`` (``features`` is timm's FeatureGetterNet) and
``extra_norms.{i}.norm.*``; ``i`` is the stage index whatever ``out_indices`` is.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models._features import FeatureGetterNet
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones.linvit import LinViT, convert_official_keys
from ..serialization import load_checkpoint_file, unwrap_checkpoint

__all__ = ["DenseBackbone", "LoadReport", "read_checkpoint"]

_logger = logging.getLogger(__name__)

# First key components of the layouts load_checkpoint understands (after prefixes are stripped).
_OWN_ROOTS = ("features.", "extra_norms.")
_LINVIT_ROOTS = ("stem.", "stages.", "patch_embed.", "layers.", "extra_norms.")
# Prefixes searched, in order, when a checkpoint holds a whole model (detector, segmenter).
_AUTO_PREFIXES = ("backbone.body.", "backbone.", "module.backbone.")
# Classification-head keys of a LinViT checkpoint: expected leftovers, not errors.
_HEAD_KEYS = re.compile(r"^(conv_head|norm_head|head)\.")


class OutputNorm(nn.Module):
    """LayerNorm2d (eps 1e-6) on one stage output; the extra ``.norm`` level gives the official key
    names ``extra_norms.{i}.norm.{weight,bias}``."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.norm = LayerNorm2d(num_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@dataclass
class LoadReport:
    """What :meth:`DenseBackbone.load_checkpoint` did: keys of this module that were loaded or
    missed, checkpoint keys ignored as expected leftovers (classification head, stages pruned by
    ``out_indices``) or unexpected."""
    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    prefix: Optional[str] = None

    def summary(self) -> str:
        def short(keys):
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"
                 + (f" (prefix {self.prefix!r} stripped)" if self.prefix else "")]
        norms = [k for k in self.missing if k.startswith("extra_norms.")]
        other = [k for k in self.missing if not k.startswith("extra_norms.")]
        if norms:
            lines.append(f"output norms not in the checkpoint, left at their init (identity): {short(norms)}")
        if other:
            lines.append(f"MISSING (kept their init): {short(other)}")
        if self.unexpected:
            lines.append(f"UNEXPECTED (not loaded): {short(self.unexpected)}")
        if self.ignored:
            lines.append(f"ignored (classification head, stages/norms outside out_indices): {short(self.ignored)}")
        return "; ".join(lines)


def read_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict:
    """Read a ``.safetensors`` or torch checkpoint file into a dict, without running code from it
    (:func:`linvision.serialization.load_checkpoint_file`: the mm* ``meta`` entries such as numpy
    values and message-hub buffers come back as plain data; anything else is refused)."""
    return load_checkpoint_file(path, map_location)


def _strip_prefix(state_dict: Mapping, prefix: str) -> Dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class DenseBackbone(nn.Module):
    """A timm ``features_only`` model as a dense-prediction backbone.

    Args:
        model_name: any timm-registered name (``linvit_*``, ``mavit_*``, ``ravlt_*``, or timm's own).
        out_indices: stages to return (``0`` = stride 4 … ``3`` = stride 32 for 4-stage models).
        out_norms: add a LayerNorm2d per returned stage (official dense ``extra_norms``).
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``i`` also freezes stages
            ``0..i-1`` and their output norms (no gradients, eval mode, kept so by :meth:`train`).
            LinViT's stage ``i > 0`` starts with its downsampling conv (officially the end of stage
            ``i-1``), so ``frozen_stages=i`` freezes the convs that produce stage ``i-1``'s output.
        norm_eval: keep every BatchNorm (incl. SyncBatchNorm) in eval mode while training.
        pretrained: load timm's default pretrained weights (needs the hub unless overridden).
        pretrained_file: load a classification checkpoint through timm
            (``pretrained_cfg_overlay=dict(file=...)``; any timm model, classification layouts).
        checkpoint: load a file or state dict with :meth:`load_checkpoint` (LinViT families: official
            classification or dense checkpoints, or linvision's own); ``checkpoint_prefix`` as there.
        **model_kwargs: passed to ``timm.create_model`` (``drop_path_rate=``, ``attn=``, ``img_size=``…).

    ``forward(x)``: ``(B, C_in, H, W)`` → list of ``(B, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉)`` for LinViT (any H, W);
    the dtype follows autocast. ``channels`` / ``strides`` describe the outputs.
    """

    def __init__(
            self,
            model_name: str,
            *,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            out_norms: bool = True,
            frozen_stages: int = -1,
            norm_eval: bool = False,
            pretrained: bool = False,
            pretrained_file: Optional[str] = None,
            checkpoint: Optional[Union[str, os.PathLike, Mapping]] = None,
            checkpoint_prefix: Optional[str] = None,
            **model_kwargs,
    ):
        super().__init__()
        if pretrained_file is not None:
            pretrained = True
            overlay = dict(model_kwargs.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(pretrained_file))
            model_kwargs["pretrained_cfg_overlay"] = overlay
        self.model_name = model_name
        self.features = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                          out_indices=tuple(out_indices), **model_kwargs)
        info = self.features.feature_info
        self.num_stages = len(info.info)
        self.out_indices: Tuple[int, ...] = tuple(int(i) for i in info.out_indices)
        self.channels: List[int] = list(info.channels())
        self.strides: List[int] = list(info.reduction())
        # timm's FeatureListNet returns the host's own layout (NHWC for Swin); the getter is NCHW.
        self._nhwc = str(getattr(self.features, "output_fmt", "NCHW")).endswith("NHWC")
        out_chs = dict(zip(self.out_indices, self.channels))
        self.extra_norms = nn.ModuleList([
            OutputNorm(out_chs[i]) if out_norms and i in out_chs else nn.Identity() for i in range(self.num_stages)
        ])
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f"frozen_stages must be in -1..{self.num_stages}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, prefix=checkpoint_prefix)
        self._freeze_stages()

    # ------------------------------------------------------------------ structure
    @property
    def is_linvit(self) -> bool:
        return isinstance(getattr(self.features, "model", None), LinViT)

    @property
    def pretrained_cfg(self) -> Dict:
        return dict(getattr(self.features, "pretrained_cfg", None) or {})

    def _stage_module_name(self, i: int) -> str:
        name = self.features.feature_info.info[i]["module"]
        if isinstance(self.features, FeatureGetterNet):
            return f"model.{name}"
        return name.replace(".", "_")  # FeatureListNet/DictNet flatten the top-level Sequential names

    def _frozen_modules(self) -> List[nn.Module]:
        """Subtrees of ``features`` that come before stage ``frozen_stages`` (stem and earlier stages)."""
        if self.frozen_stages < 0:
            return []
        stop = self._stage_module_name(self.frozen_stages) if self.frozen_stages < self.num_stages else None
        if stop is None:
            return [self.features]
        modules, roots = [], []
        for name, module in self.features.named_modules():
            if name == stop:
                break
            if name == "" or stop.startswith(name + "."):  # an ancestor of the first trainable stage
                continue
            if any(name.startswith(r + ".") for r in roots):
                continue
            roots.append(name)
            modules.append(module)
        else:
            raise RuntimeError(f"{self.model_name}: stage module {stop!r} not found; cannot freeze stages")
        return modules

    def _freeze_stages(self) -> None:
        frozen = self._frozen_modules() + [self.extra_norms[i] for i in range(max(self.frozen_stages, 0))]
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "DenseBackbone":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        model = getattr(self.features, "model", self.features)
        model.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.features(x)
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return [self.extra_norms[i](f) for i, f in zip(self.out_indices, feats)]

    # ------------------------------------------------------------------ weights
    def _native_prefix(self) -> str:
        return "features.model." if isinstance(self.features, FeatureGetterNet) else "features."

    def load_checkpoint(
            self,
            checkpoint: Union[str, os.PathLike, Mapping],
            prefix: Optional[str] = None,
            strict: bool = False,
            map_location: Union[str, torch.device] = "cpu",
            log: Optional[Callable[[str, int], None]] = None,
    ) -> LoadReport:
        """Load official (classification or dense) or linvision weights; report what did not load.

        Args:
            checkpoint: a path (``.pth``/``.safetensors``) or an already loaded dict.
            prefix: keep only keys under this prefix and strip it (``'backbone.'`` for a whole
                mmdet/mmseg detector, ``'backbone.body.'`` for a torchvision one). ``None``: the file's
                own layout is detected, and ``backbone.body.`` / ``backbone.`` are stripped when the
                checkpoint holds a whole model.
            strict: raise ``KeyError`` if any tensor of this module is missing or a checkpoint key is
                unexpected (classification-head keys and missing output norms are always allowed).
            log: ``log(message, level)``; default: Python logging (WARNING when something is missing).

        Shapes that do not match (a different model size, say) always raise ``ValueError``.
        """
        source = "state dict" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
        raw = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint, map_location)
        state = unwrap_checkpoint(raw, prefer_ema=True)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        used_prefix = prefix
        if prefix:
            state = _strip_prefix(state, prefix)
            if not state:
                raise KeyError(f"{source}: no keys under prefix {prefix!r}")
        elif not any(k.startswith(_OWN_ROOTS + _LINVIT_ROOTS) for k in state):
            for candidate in _AUTO_PREFIXES:
                stripped = _strip_prefix(state, candidate)
                if any(k.startswith(_OWN_ROOTS + _LINVIT_ROOTS) for k in stripped):
                    state, used_prefix = stripped, candidate
                    break

        if not any(k.startswith("features.") for k in state):
            if not self.is_linvit:
                raise ValueError(
                    f"{source}: load_checkpoint converts LinViT-family checkpoints only; for {self.model_name} "
                    "pass a classification checkpoint as pretrained_file= (timm's loader) or a checkpoint "
                    "of this module's own layout (keys 'features.…', 'extra_norms.…')")
            norms = {k: v for k, v in state.items() if k.startswith("extra_norms.")}
            rest = {k: v for k, v in state.items() if not k.startswith("extra_norms.")}
            # Coverage is reported below, key by key, rather than by checkpoint_filter_fn's check.
            converted = convert_official_keys(rest)
            kept_stages = len(self.features.model.stages)  # timm prunes the stages after the last out index

            def leftover(k: str) -> bool:
                m = re.match(r"^stages\.(\d+)\.", k)
                return bool(_HEAD_KEYS.match(k) or (m and int(m.group(1)) >= kept_stages))

            ignored = sorted(k for k in converted if leftover(k))
            native = self._native_prefix()
            state = {native + k: v for k, v in converted.items() if not leftover(k)}
            state.update(norms)
        else:
            ignored = []

        own = self.state_dict()
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if mismatched:
            raise ValueError(f"{source}: shapes do not match {self.model_name} (wrong model size?): "
                             + "; ".join(mismatched[:5]) + (f" ... ({len(mismatched)} in all)" if len(mismatched) > 5 else ""))
        # Official dense checkpoints hold all four output norms whatever out_indices is.
        no_norm = {i for i, m in enumerate(self.extra_norms) if isinstance(m, nn.Identity)}

        def unused_norm(k: str) -> bool:
            m = re.match(r"^extra_norms\.(\d+)\.", k)
            return bool(m and int(m.group(1)) in no_norm)

        unexpected = sorted(k for k in state if k not in own)
        report = LoadReport(
            source=source, prefix=used_prefix,
            ignored=ignored + [k for k in unexpected if unused_norm(k)],
            loaded=[k for k in own if k in state],
            missing=[k for k in own if k not in state],
            unexpected=[k for k in unexpected if not unused_norm(k)],
        )
        hard_missing = [k for k in report.missing if not k.startswith("extra_norms.")]
        if not report.loaded:
            raise KeyError(f"{source}: no tensor matches {self.model_name}; {report.summary()}")
        if strict and (hard_missing or report.unexpected):
            raise KeyError(f"{source}: strict load failed; {report.summary()}")
        self.load_state_dict(state, strict=False)
        self._freeze_stages()
        level = logging.WARNING if hard_missing or report.unexpected else logging.INFO
        (log or (lambda msg, lvl: _logger.log(lvl, msg)))(f"{type(self).__name__}({self.model_name}): "
                                                          f"{report.summary()}", level)
        return report
