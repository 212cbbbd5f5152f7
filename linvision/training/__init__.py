"""The training layer: ``tools/train.py`` and ``tools/eval.py`` are thin shims over this package.

- :mod:`.config` — :class:`TrainConfig` / :class:`EvalConfig`, the typed settings built once from
  YAML (``-c``), ``--set`` and flags; YAML files and the saved resolved config.
- :mod:`.cli` — the two programs' parsers (timm's flags, refused ones with their reason) and ``main``.
- :mod:`.trainer` — a training run (:class:`Trainer`: setup, resume, epoch, validate, save, finish).
- :mod:`.evaluation` — evaluating a checkpoint, registry weights or many of them; results files.
- :mod:`.loop` — one training epoch and one evaluation pass.
- :mod:`.model` — building the model (registry, weights files), preprocessing, device, precision.
- :mod:`.data` — dataset sources (ImageFolder, ``.tar``, timm's named sources), the resumable
  training sampler with per-sample seeds, train/eval loaders, mixup/cutmix.
- :mod:`.distributed` — torchrun process group, DDP / FSDP2 wrapping, collectives, full
  (gathered) state dicts for checkpoints.
- :mod:`.checkpoint_sets` — a run's checkpoint sets with sha256 manifests, keep-last-K, best
  weights, newest-valid lookup with fallback (the files themselves: :mod:`linvision.checkpoint`).
- :mod:`.monitor` — console/file log, CSV summary, optional TensorBoard, peak memory.
- :mod:`.preemption` — SIGTERM/SIGUSR1 turned into a checkpoint and a clean stop.
- :mod:`.common` — :class:`InputError` (bad user input, printed without a traceback).
"""
from .common import InputError
from .config import EvalConfig, TrainConfig

__all__ = ["InputError", "TrainConfig", "EvalConfig"]
