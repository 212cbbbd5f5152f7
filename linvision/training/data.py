"""Datasets and loaders for training and evaluation, over timm's data utilities.

Sources (:func:`create_datasets`):

- an ImageFolder tree ``DATA/<split>/<class>/<image>`` (split-name synonyms accepted), checked
  for layout mistakes with readable errors;
- a tar of one split, ``DATA/<split>.tar`` (class folders inside; timm's ``ReaderImageInTar``);
- any of timm's named sources, passed to ``timm.data.create_dataset`` unchanged:
  ``torch/cifar10``, ``hfds/<name>``, ``hfids/<name>``, ``tfds/<name>``, ``wds/<name>``
  (webdataset shards; the iterable ones need their optional packages).

Training loader (:func:`build_train_loader`). timm's ``create_loader`` picks its own sampler
(``RandomSampler`` on the global RNG for one process), so for map-style datasets this module
composes the same parts itself — ``create_transform`` (RandAugment, random erasing, ...),
``DistributedSampler`` or timm's ``RepeatAugSampler``, ``fast_collate`` and ``PrefetchLoader`` —
around a :class:`ResumableSampler`, which

- orders each epoch from ``(seed, epoch)`` only, so a resumed run sees the same order;
- can start an epoch at any batch (:meth:`ResumableSampler.skip`) for a mid-epoch resume;
- gives every sample its own seed, under which :class:`SeededDataset` runs the random
  transforms, so augmentations do not depend on the worker count, on which worker loads a
  sample, or on where a run was resumed.

An image that cannot be read or decoded is skipped by timm's ``ImageDataset``: the next image of the
folder takes its place and a warning (``Skipped sample (index i)``) is logged; only a long run of
unreadable files stops the epoch with an error.

Iterable sources (``wds/``, ``hfids/``, ``tfds/``) go through ``create_loader`` as is; a
mid-epoch resume there discards the batches already done (re-reading them).

Evaluation loaders (:func:`build_eval_loader`) call ``create_loader`` on :class:`ShardView`, this
rank's strided share of the dataset **without padding**, so that summing correct counts over ranks
gives exactly the single-process metrics (timm's ``OrderedDistributedSampler`` repeats samples
to even out the shards).
"""
import contextlib
import os
import random
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from timm.data import Mixup, create_dataset, create_loader, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, _worker_init, fast_collate
from timm.data.readers.img_extensions import get_img_extensions

from .common import InputError
from .config import TrainConfig
from .distributed import DistEnv

__all__ = [
    "find_split_dir", "create_datasets", "resolve_num_classes", "load_class_map", "source_kwargs", "is_iterable",
    "SeededDataset", "ResumableSampler", "ShardView", "build_train_loader", "build_eval_loader", "create_mixup",
    "train_sampler", "set_loader_epoch", "use_prefetcher", "NAMED_SOURCES",
]

# timm dataset-name prefixes passed straight to create_dataset.
NAMED_SOURCES = ("torch", "hfds", "hfids", "tfds", "wds")
# Folder names accepted for each split when the exact name is absent (ImageNet-style trees vary).
_SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid", "eval", "evaluation", "test"),
}


# ----------------------------------------------------------------------------------------------
# Sources

def find_split_dir(data_dir: os.PathLike, split: str, allow_root: bool = False) -> Path:
    """The folder (or ``.tar`` file) holding ``split``'s classes.

    Args:
        data_dir: dataset root holding ``<split>/<class>/<image>`` or ``<split>.tar`` (or a
            synonym of ``split``: ``validation``/``valid``/``eval``/``test`` for ``val``,
            ``training`` for ``train``), or a ``.tar`` file itself when ``allow_root``.
        split: ``"train"``, ``"val"`` or any folder name.
        allow_root: when no split folder exists, accept ``data_dir`` itself as the split (so that
            ``eval --data-dir /data/imagenet/val`` works).
    """
    root = Path(data_dir)
    if allow_root and root.is_file() and root.suffix == ".tar":
        return root
    if not root.is_dir():
        raise InputError(f"data directory not found: {root}")
    for name in (split,) + _SPLIT_SYNONYMS.get(split, ()):
        if (root / name).is_dir():
            return root / name
        if (root / f"{name}.tar").is_file():
            return root / f"{name}.tar"
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # A root holding other splits but not this one is a dataset root, not a split folder.
    if allow_root and not set(subdirs) & {s for syn in _SPLIT_SYNONYMS.values() for s in syn}:
        return root
    raise InputError(
        f"{root} has no '{split}' folder (found: {', '.join(subdirs) or 'no folders'}); expected the "
        f"ImageFolder layout {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        f"(or {root}/train.tar and {root}/val.tar)")


def _scan_classes(split_dir: Path) -> List[str]:
    """Class folder names of an ImageFolder split, after checking its layout."""
    exts = get_img_extensions(as_set=True)
    loose = [p.name for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in exts]
    if loose:
        raise InputError(
            f"{split_dir} holds images directly ({loose[0]}, ...); expected one folder per class: "
            f"{split_dir}/<class>/<image>")
    classes = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix.lower() in exts for _, _, files in os.walk(d) for f in map(Path, files)):
            classes.append(d.name)
    if not classes:
        raise InputError(
            f"{split_dir} has no class folders with images ({', '.join(sorted(exts))}); expected "
            f"{split_dir}/<class>/<image>")
    return classes


def _class_index(ds) -> Optional[Dict[str, int]]:
    """class name -> index of a timm or torchvision dataset, when it has one."""
    reader = getattr(ds, "reader", None)
    for obj in (reader, ds):
        for attr in ("class_to_idx", "class_name_to_idx"):
            mapping = getattr(obj, attr, None)
            if isinstance(mapping, Mapping) and mapping:
                return {str(k): int(v) for k, v in mapping.items()}
    return None


def is_iterable(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def create_datasets(
        data_dir: os.PathLike,
        splits: Sequence[str] = ("train", "val"),
        in_chans: int = 3,
        class_map: Optional[Mapping[str, int]] = None,
        allow_root: bool = False,
        dataset: str = "",
        split_names: Optional[Mapping[str, str]] = None,
        training_splits: Sequence[str] = ("train",),
        download: bool = False,
        batch_size: Optional[int] = None,
        seed: int = 42,
        num_samples: Optional[Mapping[str, int]] = None,
        source_kwargs: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """Datasets for ``splits`` with one shared class index.

    Args:
        data_dir: dataset root (see :func:`find_split_dir`); for named sources the ``root`` that
            ``timm.data.create_dataset`` gets.
        splits: logical split names (``"train"``, ``"val"``); the first one defines the class
            index unless ``class_map`` is given.
        in_chans: 1 loads images as greyscale (``L``), otherwise as ``RGB``.
        class_map: class folder name -> index (e.g. from a checkpoint), default: natural sort
            of the first split's class folders (timm's rule).
        allow_root: passed to :func:`find_split_dir`.
        dataset: ``""`` for a folder/tar tree, else a timm name with one of :data:`NAMED_SOURCES`.
        split_names: logical split -> the name on disk / in the source (``--train-split``...).
        training_splits: splits read in training mode (iterable sources shuffle them).
        download, batch_size, seed, num_samples: passed to ``create_dataset`` for named
            sources (``num_samples`` per logical split).
        source_kwargs: more ``create_dataset`` arguments for named sources (``input_key``,
            ``target_key``, ``trust_remote_code``).

    Returns:
        ``({split: dataset without transform}, class_to_idx)``; ``class_to_idx`` is ``{}`` when
        a named source has no class names (give ``--num-classes`` then). Set each dataset's
        ``transform`` (the loader builders do) before iterating.
    """
    img_mode = "L" if in_chans == 1 else "RGB"
    split_names = dict(split_names or {})
    prefix = dataset.split("/", 1)[0].lower() if dataset else ""
    if dataset and ("/" not in dataset or prefix not in NAMED_SOURCES):
        raise InputError(f"--dataset {dataset!r}: expected '' (folder or .tar) or a timm source "
                         f"{'/'.join(NAMED_SOURCES)}/<name>")
    datasets = {}
    for split in splits:
        name = split_names.get(split) or split
        if dataset:
            try:
                ds = create_dataset(
                    dataset, root=str(data_dir), split=name, is_training=split in training_splits,
                    class_map=dict(class_map) if class_map is not None else None, download=download,
                    batch_size=batch_size, seed=seed, input_img_mode=img_mode,
                    num_samples=(num_samples or {}).get(split), **dict(source_kwargs or {}))
            except (ImportError, ModuleNotFoundError) as e:
                raise InputError(f"--dataset {dataset}: {e} (install the package this source needs)") from e
            except (FileNotFoundError, AssertionError, RuntimeError, ValueError) as e:
                raise InputError(f"--dataset {dataset} split {name!r} at {data_dir}: {e}") from e
            if class_map is None:
                class_map = _class_index(ds)
        else:
            split_dir = find_split_dir(data_dir, name, allow_root=allow_root)
            if split_dir.is_dir():
                classes = _scan_classes(split_dir)
                if class_map is not None:
                    unknown = sorted(set(classes) - set(class_map))
                    if unknown:
                        raise InputError(
                            f"{split_dir} has class folders {unknown[:5]} that are not among the {len(class_map)} "
                            f"known classes ({', '.join(list(class_map)[:5])}, ...); every split (and the "
                            f"checkpoint) must use the same class folder names")
            ds = create_dataset("", root=str(split_dir), split=name, search_split=False, is_training=False,
                                class_map=dict(class_map) if class_map is not None else None,
                                input_img_mode=img_mode)
            if class_map is None:
                class_map = _class_index(ds)
        datasets[split] = ds
    return datasets, dict(class_map or {})


def resolve_num_classes(requested: Optional[int], class_to_idx: Mapping[str, int]) -> int:
    """``--num-classes`` if given (at least the classes found), else the number of classes in the data."""
    found = len(class_to_idx)
    if requested is None:
        if not found:
            raise InputError("the dataset has no class names; pass --num-classes")
        return found
    if requested < found:
        raise InputError(f"--num-classes {requested} is smaller than the {found} class folders in the data")
    return requested


def load_class_map(path: Optional[str]) -> Optional[Dict[str, int]]:
    """``--class-map FILE`` (one class name per line, or ``name index``) as timm reads it; ``None``
    when no file is given."""
    if not path:
        return None
    from timm.data.readers.class_map import load_class_map as timm_load_class_map
    try:
        return dict(timm_load_class_map(path))
    except (OSError, AssertionError, ValueError) as e:
        raise InputError(f"--class-map {path}: {e}") from e


def source_kwargs(input_key: Optional[str], target_key: Optional[str], trust_remote_code: bool) -> Dict[str, Any]:
    """The ``create_dataset`` arguments of a named source's fields (``--input-key``, ``--target-key``,
    ``--dataset-trust-remote-code``), only those given."""
    source: Dict[str, Any] = {k: v for k, v in (("input_key", input_key), ("target_key", target_key)) if v}
    if trust_remote_code:
        source["trust_remote_code"] = True
    return source


# ----------------------------------------------------------------------------------------------
# Samplers and dataset views

_M64 = (1 << 64) - 1


def sample_seed(*values: int) -> int:
    """A 32-bit seed mixed from integers (splitmix64 finaliser; cheap enough per sample)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & _M64
        x ^= x >> 29
    return x & 0xFFFFFFFF


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Python, NumPy and torch-CPU generators seeded with ``seed`` inside, restored afterwards.

    Only the CPU generator is touched (not ``torch.manual_seed``, which would reseed CUDA too):
    with ``--workers 0`` this runs in the training process, whose other random streams (drop
    path, mixup) must not be disturbed."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededDataset(Dataset):
    """Wraps a map-style dataset whose items are requested as ``(index, seed)`` pairs (what
    :class:`ResumableSampler` yields); the item's transforms run under that seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        with _seeded_rng(seed):
            return self.dataset[index]


class ResumableSampler(Sampler):
    """A training sampler whose epochs can start at any position.

    Wraps a per-rank sampler (``DistributedSampler`` or ``RepeatAugSampler``, both ordered by
    the epoch number alone) and yields ``(index, seed)`` pairs, the seed mixed from
    ``(seed, epoch, rank, position)``.

    Args:
        inner: the per-rank sampler; its ``set_epoch`` is forwarded.
        seed: run seed.
        rank: this process's rank (samples at the same position on different ranks differ).
    """

    def __init__(self, inner: Sampler, seed: int, rank: int = 0):
        self.inner = inner
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        """Start the next iteration at position ``num_samples`` (a mid-epoch resume)."""
        self._start = num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(iter(self.inner))
        start, self._start = self._start, 0
        for pos in range(start, len(indices)):
            yield indices[pos], sample_seed(self.seed, self.epoch, self.rank, pos)

    def __len__(self) -> int:
        # The full epoch, also when resuming: loader length = the epoch's batch count.
        return len(self.inner)


class ShardView(Dataset):
    """Rank ``rank``'s strided share ``dataset[rank::world_size]`` (no padding, no repeats).

    ``transform`` reads and writes the underlying dataset's, so ``create_loader`` can set it."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.indices = range(rank, len(dataset), world_size)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


# ----------------------------------------------------------------------------------------------
# Loaders

def use_prefetcher(prefetcher: Optional[bool], device: torch.device) -> bool:
    """``--prefetcher`` as given, default on for CUDA (uint8 batches normalised on the GPU)."""
    return device.type == "cuda" if prefetcher is None else bool(prefetcher)


def _pin_memory(pin_mem: Optional[bool], device: torch.device) -> bool:
    return device.type == "cuda" if pin_mem is None else bool(pin_mem)


def build_train_loader(dataset, data_config: Mapping[str, Any], cfg: TrainConfig, env: DistEnv):
    """The training loader: batches ``(images (B, C, H, W) float32 normalised, labels (B,) int64)``.

    Map-style datasets: a :class:`ResumableSampler` (``loader.sampler``; call its ``set_epoch``
    each epoch and ``skip`` to resume mid-epoch) over ``RepeatAugSampler`` (``--aug-repeats``)
    or ``DistributedSampler`` (shuffled by ``seed + epoch``). The last incomplete batch is dropped
    (a batch of one breaks BatchNorm; mixup needs an even batch) unless the dataset is smaller
    than one global batch. With the prefetcher, images travel as uint8 and are normalised and
    randomly erased on the device (timm's ``PrefetchLoader``).
    """
    prefetch = use_prefetcher(cfg.prefetcher, env.device)
    interpolation = cfg.train_interpolation or data_config["interpolation"]
    aug = dict(
        is_training=True, no_aug=cfg.no_aug, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, vflip=cfg.vflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=interpolation, mean=data_config["mean"],
        std=data_config["std"], train_crop_mode=cfg.train_crop_mode, color_jitter_prob=cfg.color_jitter_prob,
        # unset (None) probabilities mean "never"
        grayscale_prob=cfg.grayscale_prob or 0.0, gaussian_blur_prob=cfg.gaussian_blur_prob or 0.0)
    erase = dict(re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
    workers = cfg.workers
    pin = _pin_memory(cfg.pin_mem, env.device)
    if is_iterable(dataset):
        if cfg.aug_repeats:
            raise InputError("--aug-repeats needs a map-style dataset (folder, tar, torch/...), not an iterable source")
        return create_loader(
            dataset, input_size=data_config["input_size"], batch_size=cfg.batch_size,
            num_workers=workers, distributed=env.distributed, pin_memory=pin, device=env.device,
            use_prefetcher=prefetch, crop_pct=data_config["crop_pct"], **aug, **erase)

    dataset.transform = create_transform(data_config["input_size"], use_prefetcher=prefetch, **aug,
                                         **({} if prefetch else erase))
    repeats = cfg.aug_repeats
    seed = cfg.seed
    if repeats:
        inner = RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 num_repeats=repeats)
    else:
        inner = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                   drop_last=False)
    sampler = ResumableSampler(inner, seed=seed, rank=env.rank)
    loader = DataLoader(
        SeededDataset(dataset), batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=fast_collate if prefetch else None, pin_memory=pin,
        drop_last=len(inner) >= cfg.batch_size, persistent_workers=workers > 0,
        # The loader draws its workers' base seed from this generator, not from the global RNG,
        # whose state a mid-epoch checkpoint captures.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=partial(_worker_init, worker_seeding="all"))
    if prefetch:
        loader = PrefetchLoader(loader, mean=data_config["mean"], std=data_config["std"],
                                channels=data_config["input_size"][0], device=env.device,
                                re_prob=0.0 if aug["no_aug"] else erase["re_prob"], re_mode=erase["re_mode"],
                                re_count=erase["re_count"])
    return loader


def train_sampler(loader) -> Optional[ResumableSampler]:
    """The :class:`ResumableSampler` behind a training loader (``None`` for iterable sources)."""
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, ResumableSampler) else None


def set_loader_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def build_eval_loader(dataset, data_config: Mapping[str, Any], batch_size: int, env: DistEnv, *, workers: int = 0,
                      pin_mem: Optional[bool] = None, prefetcher: Optional[bool] = None,
                      crop_border_pixels: Optional[int] = None):
    """An evaluation loader over this rank's :class:`ShardView` (iterable sources shard themselves).

    ``pin_mem`` and ``prefetcher`` ``None``: on for CUDA."""
    view = dataset if is_iterable(dataset) else ShardView(dataset, env.rank, env.world_size)
    return create_loader(
        view, input_size=data_config["input_size"], batch_size=batch_size, is_training=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        crop_pct=data_config["crop_pct"], crop_mode=data_config.get("crop_mode"),
        crop_border_pixels=crop_border_pixels, num_workers=workers,
        distributed=is_iterable(dataset) and env.distributed,
        pin_memory=_pin_memory(pin_mem, env.device), device=env.device,
        use_prefetcher=use_prefetcher(prefetcher, env.device), persistent_workers=workers > 0)


def create_mixup(cfg: TrainConfig, num_classes: int) -> Optional[Mixup]:
    """timm's ``Mixup`` (mixup/cutmix with label smoothing folded into the soft targets), applied
    to device batches in the training process, or ``None`` when neither is on."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    if cfg.batch_size % 2:
        raise InputError(f"mixup/cutmix pair the images of a batch: --batch-size must be even, got {cfg.batch_size}")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)
