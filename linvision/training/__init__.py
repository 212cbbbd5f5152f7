"""Pieces of the training loop that :mod:`linvision.engine` composes.

- :mod:`.common` — :class:`InputError` (bad user input, printed without a traceback).
- :mod:`.distributed` — torchrun process group, DDP / FSDP2 wrapping, collectives, full
  (gathered) state dicts for checkpoints.
- :mod:`.data` — dataset sources (ImageFolder, ``.tar``, timm's named sources), the resumable
  training sampler with per-sample seeds, train/eval loaders, mixup/cutmix.
- :mod:`.checkpoints` — checkpoint sets with sha256 manifests, keep-last-K, best weights,
  newest-valid lookup with fallback.
- :mod:`.monitor` — console/file log, CSV summary, optional TensorBoard, peak memory.
- :mod:`.config` — YAML configs, ``--set key=value`` overrides, the resolved config file.
"""
from .common import InputError

__all__ = ["InputError"]
