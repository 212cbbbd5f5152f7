"""``LinVisionBackbone``: linvision backbones for mmdet 3.x / mmseg 1.x, through mmengine's registry.

The class is registered in mmengine's **root** ``MODELS`` registry, which mmdet's and mmseg's
registries fall back to, so both accept it as a bare ``type='LinVisionBackbone'`` once this module
is imported (configs do it with ``custom_imports=dict(imports=['linvision.adapters.mm'])``).
Importing it needs mmengine only — never mmcv, mmdet or mmseg::

    backbone = dict(
        type='LinVisionBackbone', model_name='mavit_s', out_indices=(0, 1, 2, 3),
        frozen_stages=-1, norm_eval=False, out_norms=True, drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint='MAViT_S.pth'))        # classification weights
    # a whole official (or our own) detector/segmenter checkpoint:
    #   init_cfg=dict(type='Pretrained', checkpoint='maskrcnn_s_1x_12_epoch.pth', prefix='backbone.')

``init_cfg`` Pretrained goes through :meth:`DenseBackbone.load_checkpoint` (official key
conversion, ``extra_norms``, a logged report of missing / unexpected keys) instead of mmengine's
``PretrainedInit``, which loads with ``strict=False`` and says nothing about keys that did not match.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import update_init_info
from mmengine.registry import MODELS, WEIGHT_INITIALIZERS

from .dense import DenseBackbone, LoadReport

__all__ = ["LinVisionBackbone", "LinVisionPretrainedInit"]


@MODELS.register_module()
class LinVisionBackbone(DenseBackbone, BaseModule):
    """Any timm-registered model as an mmdet/mmseg backbone (mmdet Swin/ResNet conventions).

    Args:
        model_name: timm name (``mavit_s``, ``ravlt_b``, ``linvit_t_focused`` …).
        out_indices: stages returned, high resolution first; necks need ``in_channels`` =
            :attr:`channels` (e.g. ``mavit_s``: ``[64, 128, 320, 512]``).
        frozen_stages: ``-1`` none, ``0`` the stem, ``i`` also stages ``0..i-1`` (+ their output norms);
            frozen parts get no gradients and stay in eval mode after ``train()``.
        norm_eval: keep BatchNorm layers (stem, downsampling) in eval mode while training.
        out_norms: a LayerNorm2d per output (official ``extra_norms``, keys ``extra_norms.{i}.norm.*``).
        pretrained: timm's own pretrained weights (``pretrained_file=`` for a local classification file).
        with_cp: activation checkpointing in every stage (``set_grad_checkpointing``).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix=None|'backbone.', strict=False)``
            and/or other mmengine initialisers.
        **model_kwargs: passed to ``timm.create_model`` (``drop_path_rate=``, ``attn=`` …).

    ``forward(x)`` returns a tuple of NCHW maps, one per ``out_indices`` entry.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            out_norms: bool = True,
            pretrained: bool = False,
            with_cp: bool = False,
            init_cfg: Optional[Union[Dict, List[Dict]]] = None,
            **model_kwargs,
    ):
        # MRO: DenseBackbone → BaseModule → nn.Module, so DenseBackbone's super().__init__() runs
        # BaseModule.__init__(init_cfg=None); the real init_cfg is set right after.
        super().__init__(model_name, out_indices=out_indices, out_norms=out_norms, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, pretrained=pretrained, **model_kwargs)
        self.init_cfg = copy.deepcopy(init_cfg)
        if with_cp:
            self.set_grad_checkpointing(True)
        if pretrained or model_kwargs.get("pretrained_file"):
            # Weights came through timm; do not let init_weights re-initialise them (cf. mmpretrain TIMMBackbone).
            self._is_init = True
        print_log(f"LinVisionBackbone({model_name}): out_indices {self.out_indices}, channels {self.channels}, "
                  f"strides {self.strides}", logger="current", level=logging.DEBUG)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(super().forward(x))

    def init_weights(self) -> None:
        """mmengine's ``BaseModule.init_weights``, with every ``Pretrained`` entry of ``init_cfg`` run
        (last) through :meth:`load_pretrained` instead of mmengine's silent ``PretrainedInit``."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        if not pretrained:
            super().init_weights()
            return
        saved = self.init_cfg
        self.init_cfg = ([c for c in cfgs if c.get("type") != "Pretrained"]
                         + [dict(c, type="LinVisionPretrained") for c in pretrained])
        self._is_init = False  # an explicit Pretrained init_cfg wins over weights timm loaded
        try:
            super().init_weights()
        finally:
            self.init_cfg = saved

    def _dump_init_info(self) -> None:
        """mmengine writes one entry per parameter tensor (over a thousand lines for a backbone). Inside
        a Runner they go to its log file, as mmengine does; outside one (a logger without a file) they
        would flood the console, so a one-line summary is logged instead."""
        from logging import FileHandler

        from mmengine.logging import MMLogger
        if any(isinstance(h, FileHandler) for h in MMLogger.get_current_instance().handlers):
            super()._dump_init_info()
            return
        infos = [self._params_init_info[p]["init_info"] for p in self.parameters() if p in self._params_init_info]
        # mmengine's note for a tensor no initialiser touched starts "The value is the same before and after".
        set_by = [i for i in infos if not i.startswith("The value is the same")]
        how = sorted({i.strip() for i in set_by})
        print_log(f"{type(self).__name__}({self.model_name}): init_weights: {len(infos)} parameter tensors, "
                  f"{len(set_by)} set by init_cfg" + (f" ({'; '.join(how[:3])}"
                                                       f"{', ...' if len(how) > 3 else ''})" if how else "")
                  + f", {len(infos) - len(set_by)} kept as constructed", logger="current")

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None, map_location: str = "cpu",
                        strict: bool = False) -> LoadReport:
        """Load a local file (``.pth``/``.safetensors``), an ``http(s)://`` URL (downloaded once into
        linvision's cache) or anything else mmengine's ``CheckpointLoader`` reads (``open-mmlab://``
        …, which mmengine reads with ``torch.load(weights_only=True)``); log the key report to
        mmengine's logger. Files are read by :func:`linvision.serialization.load_checkpoint_file`."""
        source = str(checkpoint)
        path = os.path.expanduser(source)
        if source.startswith(("http://", "https://")):
            path = _download(source)
        elif not os.path.isfile(path) and "://" in source:
            from mmengine.runner.checkpoint import CheckpointLoader
            path = CheckpointLoader.load_checkpoint(source, map_location=map_location)
        report = self.load_checkpoint(path, prefix=prefix, strict=strict, map_location=map_location,
                                      log=lambda msg, level: print_log(msg, logger="current", level=level))
        report.source = source
        return report


def _download(url: str) -> str:
    """``url`` downloaded once (resumable, atomic) into linvision's cache, ``<cache>/downloads``."""
    from urllib.parse import urlparse

    from ..pretrained import cache_dir, download_file
    path = cache_dir() / "downloads" / os.path.basename(urlparse(url).path)
    if not path.is_file():
        print_log(f"downloading {url} to {path}", logger="current")
        download_file(url, path)
    return str(path)


@WEIGHT_INITIALIZERS.register_module(name="LinVisionPretrained")
class LinVisionPretrainedInit:
    """The initialiser ``LinVisionBackbone.init_weights`` substitutes for ``type='Pretrained'``:
    loads through :meth:`LinVisionBackbone.load_pretrained` and records it in mmengine's init info."""

    def __init__(self, checkpoint: str, prefix: Optional[str] = None, map_location: str = "cpu",
                 strict: bool = False):
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.map_location = map_location
        self.strict = strict

    def __call__(self, module: LinVisionBackbone) -> None:
        if not isinstance(module, LinVisionBackbone):
            raise TypeError(f"LinVisionPretrained initialises a LinVisionBackbone, got {type(module).__name__}")
        module.load_pretrained(self.checkpoint, prefix=self.prefix, map_location=self.map_location,
                               strict=self.strict)
        if hasattr(module, "_params_init_info"):
            update_init_info(module, init_info=self._get_init_info())

    def _get_init_info(self) -> str:
        return f"LinVisionPretrained: load from {self.checkpoint}" + (f" (prefix {self.prefix!r})" if self.prefix else "")
