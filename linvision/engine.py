"""Training and evaluation loop over timm's utilities; ``tools/train.py`` and ``tools/eval.py`` only
parse arguments and call :func:`train` / :func:`evaluate_checkpoint`.

The pieces are separate functions so that later work can swap one without touching the rest
(distributed data parallel: the sampler in :func:`build_loader` is already a
``DistributedSampler`` and :func:`train_one_epoch` takes any wrapped model; EMA, mixup and extra
losses slot into :func:`train_one_epoch`):

- :func:`create_datasets` — ImageFolder splits through ``timm.data.create_dataset``, with layout
  checks that fail with a readable :class:`InputError`.
- :func:`build_model`, :func:`resolve_data_config`, :func:`build_loader` / :func:`build_loaders`.
- :func:`train_one_epoch`, :func:`evaluate`.
- :func:`save_training_state`, :func:`load_training_state`, :func:`resolve_resume`.

All functions take the argument namespace the tools build (field names follow timm's
``train.py``), so a YAML config or a test can provide the same fields.

Checkpoints in the output directory, each written atomically (:mod:`linvision.checkpoint`):
``last.safetensors`` (weights after the latest epoch), ``last_state.pth`` (optimizer, scheduler,
epoch, RNG states, arguments), ``best.safetensors`` (weights with the best val top-1 so far) and
``summary.csv`` (one row per epoch, timm's ``update_summary`` format).
"""
import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import timm
from timm.data import create_dataset, create_transform
from timm.data import resolve_data_config as timm_resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.models import load_checkpoint as timm_load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy, random_seed, update_summary

from .checkpoint import (capture_rng_state, load_state, load_weights, read_weights_metadata,
                         restore_rng_state, save_state, save_weights)

__all__ = [
    "InputError", "LAST_WEIGHTS", "LAST_STATE", "BEST_WEIGHTS",
    "resolve_device", "resolve_amp_dtype", "find_split_dir", "create_datasets", "build_model",
    "resolve_data_config", "build_loader", "build_loaders", "train_one_epoch", "evaluate",
    "save_training_state", "load_training_state", "resolve_resume", "train", "evaluate_checkpoint",
]

LAST_WEIGHTS = "last.safetensors"
LAST_STATE = "last_state.pth"
BEST_WEIGHTS = "best.safetensors"
SUMMARY = "summary.csv"

# Folder names accepted for each split when the exact name is absent (ImageNet-style trees vary).
_SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid", "eval", "evaluation", "test"),
}
# Keys of a run's arguments that describe the model and its input; stored in every weights file so
# that eval can rebuild the same model and preprocessing from the checkpoint alone.
_MODEL_KEYS = ("model", "num_classes", "in_chans", "model_kwargs")
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class InputError(Exception):
    """Bad user input (paths, data layout, flags); the tools print it without a traceback."""


# ----------------------------------------------------------------------------------------------
# Device and precision

def resolve_device(name: Optional[str] = None) -> torch.device:
    """``name`` as a device; ``None`` picks ``cuda`` when a GPU is visible, else ``cpu``."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def resolve_amp_dtype(amp: Optional[bool], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: bf16 when ``amp`` is True, or when it is None (auto) on CUDA; else None.

    bf16 rather than fp16 because it needs no loss scaler and is the project's default autocast
    dtype (DESIGN.md, Numerics); on CPU autocast is opt-in because it is slower there.
    """
    if amp is None:
        amp = device.type == "cuda"
    return torch.bfloat16 if amp else None


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# ----------------------------------------------------------------------------------------------
# Data

def find_split_dir(data_dir: os.PathLike, split: str, allow_root: bool = False) -> Path:
    """The folder holding ``split``'s class folders.

    Args:
        data_dir: dataset root holding ``<split>/<class>/<image>`` (or a synonym of ``split``:
            ``validation``/``valid``/``eval``/``test`` for ``val``, ``training`` for ``train``).
        split: ``"train"``, ``"val"`` or any folder name.
        allow_root: when no split folder exists, accept ``data_dir`` itself as the split (so that
            ``eval --data-dir /data/imagenet/val`` works).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"data directory not found: {root}")
    for name in (split,) + _SPLIT_SYNONYMS.get(split, ()):
        if (root / name).is_dir():
            return root / name
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # A root holding other splits but not this one is a dataset root, not a split folder.
    if allow_root and not set(subdirs) & {s for syn in _SPLIT_SYNONYMS.values() for s in syn}:
        return root
    raise InputError(
        f"{root} has no '{split}' folder (found: {', '.join(subdirs) or 'no folders'}); expected the "
        f"ImageFolder layout {root}/train/<class>/<image> and {root}/val/<class>/<image>")


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


def create_datasets(
        data_dir: os.PathLike,
        splits: Sequence[str] = ("train", "val"),
        in_chans: int = 3,
        class_map: Optional[Mapping[str, int]] = None,
        allow_root: bool = False,
) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """ImageFolder datasets for ``splits`` with one shared class index.

    Args:
        data_dir: dataset root (see :func:`find_split_dir`).
        splits: split names; the first one defines the class index unless ``class_map`` is given.
        in_chans: 1 loads images as greyscale (``L``), otherwise as ``RGB``.
        class_map: class folder name -> index (e.g. from a checkpoint), default: natural sort
            of the first split's class folders (timm's rule).
        allow_root: passed to :func:`find_split_dir`.

    Returns:
        ``({split: timm ImageDataset without transform}, class_to_idx)``. Set each dataset's
        ``transform`` (done by :func:`build_loader`) before iterating; items are
        ``(PIL image, int label)`` until then.
    """
    img_mode = "L" if in_chans == 1 else "RGB"
    datasets = {}
    for split in splits:
        split_dir = find_split_dir(data_dir, split, allow_root=allow_root)
        classes = _scan_classes(split_dir)
        if class_map is not None:
            unknown = sorted(set(classes) - set(class_map))
            if unknown:
                raise InputError(
                    f"{split_dir} has class folders {unknown[:5]} that are not among the {len(class_map)} "
                    f"known classes ({', '.join(list(class_map)[:5])}, ...); every split (and the "
                    f"checkpoint) must use the same class folder names")
        ds = create_dataset("", root=str(split_dir), split=split, search_split=False, is_training=False,
                            class_map=dict(class_map) if class_map is not None else None,
                            input_img_mode=img_mode)
        if class_map is None:
            class_map = dict(ds.reader.class_to_idx)
        datasets[split] = ds
    return datasets, dict(class_map)


def resolve_data_config(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """timm's data config (input size, interpolation, mean/std, crop) from ``args`` and the model's
    pretrained cfg; ``args.img_size``/``input_size``/``mean``/``std``/``crop_pct``/
    ``interpolation`` override. Mean/std are reduced to ``in_chans`` values when the model cfg has 3."""
    cfg = timm_resolve_data_config(
        {k: getattr(args, k, None) for k in ("in_chans", "img_size", "input_size", "crop_pct", "crop_mode",
                                             "interpolation", "mean", "std")},
        model=model)
    in_chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        if len(cfg[key]) != in_chans:
            # An RGB cfg on a greyscale model: torchvision's Normalize would silently broadcast a
            # 1-channel image to 3 channels, so use the channel average instead.
            cfg[key] = (float(np.mean(cfg[key])),) * in_chans
    return cfg


def build_loader(
        dataset,
        data_config: Mapping[str, Any],
        is_training: bool,
        batch_size: int,
        args: argparse.Namespace,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
) -> DataLoader:
    """A DataLoader over ``dataset`` with timm's train or eval transform.

    Batches are ``(images, labels)``: ``(B, C, H, W)`` float32 normalised with the config's
    mean/std, and ``(B,)`` int64. Training shuffles with a ``DistributedSampler`` (one replica by
    default) seeded by ``args.seed`` and the epoch — call ``loader.sampler.set_epoch(epoch)`` — so
    the order of every epoch is reproducible after a resume, and DDP only needs ``rank`` and
    ``world_size``. Training drops the last incomplete batch (a batch of one breaks BatchNorm)
    unless the dataset is smaller than one batch.
    """
    aug = dict(no_aug=getattr(args, "no_aug", False), scale=getattr(args, "scale", None),
               ratio=getattr(args, "ratio", None), hflip=getattr(args, "hflip", 0.5),
               color_jitter=getattr(args, "color_jitter", 0.4)) if is_training else {}
    dataset.transform = create_transform(
        input_size=data_config["input_size"], is_training=is_training,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"], **aug)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=is_training,
                                 seed=getattr(args, "seed", 0), drop_last=False)
    workers = getattr(args, "workers", 0)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        drop_last=is_training and len(dataset) >= batch_size * world_size,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def build_loaders(args: argparse.Namespace, datasets: Mapping[str, Any], data_config: Mapping[str, Any],
                  device: torch.device) -> Tuple[DataLoader, DataLoader]:
    """Train and val loaders for ``datasets['train']`` / ``datasets['val']``; val batches are
    ``args.val_batch_size`` (default twice the train batch: no activations are kept)."""
    train_loader = build_loader(datasets["train"], data_config, True, args.batch_size, args, device)
    val_bs = getattr(args, "val_batch_size", None) or 2 * args.batch_size
    val_loader = build_loader(datasets["val"], data_config, False, val_bs, args, device)
    return train_loader, val_loader


# ----------------------------------------------------------------------------------------------
# Model

def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """``timm.create_model(args.model, ...)`` with ``pretrained``, ``in_chans``, ``drop_path``
    and ``model_kwargs`` from ``args``. The linvision families are registered with timm already:
    importing this module runs ``linvision/__init__``."""
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:10]
        raise InputError(f"unknown model {args.model!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(
        args.model, pretrained=getattr(args, "pretrained", False), num_classes=num_classes,
        in_chans=getattr(args, "in_chans", None) or 3, drop_path_rate=getattr(args, "drop_path", None),
        **(getattr(args, "model_kwargs", None) or {}))


# ----------------------------------------------------------------------------------------------
# Loops

def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        scheduler=None,
        num_updates: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        clip_grad: Optional[float] = None,
        progress: bool = True,
        desc: str = "train",
        log_interval: int = 10,
) -> Dict[str, float]:
    """One pass over ``loader``, stepping ``scheduler.step_update`` after every optimizer update.

    Args:
        model: in any wrapper (DDP, compiled); put in train mode here.
        loader: yields ``(images (B, C, H, W) float32, labels (B,) int64)``.
        loss_fn: ``(logits (B, num_classes), labels) -> scalar``.
        num_updates: optimizer updates before this epoch (the scheduler's clock).
        amp_dtype: autocast dtype or None for full precision.
        clip_grad: max global gradient norm, or None.
        progress: show a tqdm bar (loss, lr, img/s).
        log_interval: steps between reading the loss back (a device sync) for the bar.

    Returns:
        ``{"loss": mean loss per image, "lr": last lr, "img_per_sec", "time", "num_updates"}``.
    """
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, mininterval=0.5)
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        num_updates += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if step % log_interval == 0 or step == len(loader) - 1:
            mean_loss = loss_sum.item() / seen
            if not np.isfinite(mean_loss):
                raise FloatingPointError(f"{desc}: loss became {mean_loss} at step {step}; lower --lr "
                                         f"or enable --clip-grad")
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
            "img_per_sec": seen / elapsed, "time": elapsed, "num_updates": num_updates}


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
        desc: str = "val",
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Returns:
        ``{"loss", "top1", "top5", "num_images", "img_per_sec", "time"}``; ``img_per_sec``
        covers the whole loop (data loading included). top-5 is top-k with
        k = min(5, num_classes).
    """
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss, top-1, top-5 (sums)
    seen = 0
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
                               mininterval=0.5):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, labels, topk=(1, 5))
        n = images.shape[0]
        totals += torch.stack([F.cross_entropy(logits, labels).double(), top1.double(), top5.double()]) * n
        seen += n
    loss, top1, top5 = (totals / max(seen, 1)).tolist()
    elapsed = time.perf_counter() - start
    # timm's accuracy() works in float32; round off its representation noise (97.39999…).
    return {"loss": loss, "top1": round(top1, 4), "top5": round(top5, 4), "num_images": seen,
            "img_per_sec": seen / elapsed, "time": elapsed}


# ----------------------------------------------------------------------------------------------
# Checkpoints

def _plain(value: Any) -> Any:
    """``value`` reduced to containers of str/int/float/bool/None (``weights_only``-safe, JSON-able)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP wraps in .module, torch.compile in ._orig_mod; checkpoints hold the bare model's keys.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_training_state(
        output_dir: os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        epoch: int,
        num_updates: int,
        best: Mapping[str, Any],
        args: argparse.Namespace,
        weights_meta: Mapping[str, Any],
        is_best: bool,
) -> Dict[str, Path]:
    """Write ``last.safetensors`` then ``last_state.pth`` (and ``best.safetensors`` when
    ``is_best``), each atomically.

    Args:
        epoch: the 0-based epoch just finished; a resume continues with ``epoch + 1``.
        best: ``{"top1", "epoch"}`` of the best epoch so far (including this one).
        weights_meta: run information for the weights files (model, classes, data config…);
            ``epoch`` is added so that a resume can check the weights match the state.

    The weights are written first: if the process dies between the two files, the state still
    names the previous epoch and :func:`load_training_state` reports the mismatch instead of
    silently pairing new weights with an old optimizer.
    """
    out = Path(output_dir)
    state_dict = _unwrap(model).state_dict()
    meta = dict(weights_meta, epoch=epoch)
    paths = {"last": save_weights(state_dict, out / LAST_WEIGHTS, meta)}
    if is_best:
        paths["best"] = save_weights(state_dict, out / BEST_WEIGHTS, meta)
    state = {
        "format": "linvision.train_state/1",
        "weights_file": LAST_WEIGHTS,
        "epoch": epoch,
        "num_updates": num_updates,
        "best": _plain(dict(best)),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "args": _plain(vars(args)),
    }
    paths["state"] = save_state(state, out / LAST_STATE)
    return paths


def load_training_state(path: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler=None, device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """Restore model weights, optimizer, scheduler position and RNG states from a ``last_state.pth``.

    Returns:
        ``{"epoch", "num_updates", "best", "args"}`` as saved (``epoch`` = last finished epoch).
    """
    path = Path(path)
    try:
        state = load_state(path)
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot read training state {path}: {e}") from e
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("linvision.train_state/"):
        raise InputError(f"{path} is not a linvision training-state file (expected {LAST_STATE})")
    weights = path.parent / state["weights_file"]
    if not weights.is_file():
        raise InputError(f"{path} needs its weights file {weights}, which is missing")
    weights_epoch = read_weights_metadata(weights).get("epoch")
    if weights_epoch != state["epoch"]:
        raise InputError(
            f"{weights} is from epoch {weights_epoch} but {path} from epoch {state['epoch']} (the run "
            f"stopped between the two writes); resume from an intact pair or start again")
    _unwrap(model).load_state_dict(load_weights(weights, device="cpu"))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        # timm schedulers hold only their configuration, so the saved one is kept for the record
        # and the schedule built from the current flags is moved to the saved position instead
        # (as timm's train.py does): resuming with a longer --epochs stretches the schedule.
        scheduler.step_update(num_updates=state["num_updates"])
    restore_rng_state(state["rng"])
    return {k: state[k] for k in ("epoch", "num_updates", "best", "args")}


def resolve_resume(resume: Optional[str], output_dir: os.PathLike) -> Optional[Path]:
    """The state file to resume from: ``None``/``""`` → none; ``"auto"`` → ``<output>/last_state.pth``
    if it exists (else none, so a restarted job begins fresh); a directory → its ``last_state.pth``;
    a weights file → the ``last_state.pth`` beside it; otherwise the path itself."""
    if not resume:
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST_STATE
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir() or path.suffix == ".safetensors":
        path = (path if path.is_dir() else path.parent) / LAST_STATE
    if not path.is_file():
        raise InputError(f"--resume: no training state at {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Programs

def _resolve_num_classes(requested: Optional[int], class_to_idx: Mapping[str, int]) -> int:
    found = len(class_to_idx)
    if requested is None:
        return found
    if requested < found:
        raise InputError(f"--num-classes {requested} is smaller than the {found} class folders in the data")
    return requested


def _weights_meta(args: argparse.Namespace, num_classes: int, class_to_idx: Mapping[str, int],
                  data_config: Mapping[str, Any]) -> Dict[str, Any]:
    meta = {"model": args.model, "num_classes": num_classes, "in_chans": data_config["input_size"][0],
            "model_kwargs": getattr(args, "model_kwargs", None) or {},
            "classes": sorted(class_to_idx, key=class_to_idx.get)}
    meta.update({k: data_config[k] for k in _DATA_KEYS})
    return _plain(meta)


def _epoch_line(epoch: int, epochs: int, train_m: Mapping[str, float], val_m: Mapping[str, float]) -> str:
    return (f"epoch {epoch + 1}/{epochs}  train loss {train_m['loss']:.4f}  "
            f"val loss {val_m['loss']:.4f} top-1 {val_m['top1']:.2f} top-5 {val_m['top5']:.2f}  "
            f"lr {train_m['lr']:.2e}  {train_m['img_per_sec']:.0f} img/s  "
            f"time {train_m['time'] + val_m['time']:.1f}s")


def train(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``args.model`` on the ImageFolder tree at ``args.data_dir`` and evaluate every epoch.

    Checkpoints go to ``args.output`` (see the module docstring). ``args.resume`` (path or
    ``"auto"``) restores weights, optimizer, scheduler, counters and RNG states and continues with
    the next epoch.

    Returns:
        ``{"best_top1", "best_epoch" (1-based), "last": val metrics of the final epoch or None,
        "epochs_run", "output", "best_checkpoint", "last_checkpoint"}``.
    """
    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    random_seed(args.seed)

    datasets, class_to_idx = create_datasets(args.data_dir, ("train", "val"), in_chans=args.in_chans)
    num_classes = _resolve_num_classes(args.num_classes, class_to_idx)
    model = build_model(args, num_classes).to(device)
    data_config = resolve_data_config(args, model)
    train_loader, val_loader = build_loaders(args, datasets, data_config, device)
    if len(train_loader) == 0:
        raise InputError(f"{args.data_dir}: the train split gives no batches")

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    output = Path(args.output)
    start_epoch, num_updates, best = 0, 0, {"top1": None, "epoch": None}
    resume_path = resolve_resume(args.resume, output)
    if resume_path is not None:
        restored = load_training_state(resume_path, model, optimizer, scheduler, device)
        if restored["args"].get("model") != args.model:
            raise InputError(f"--resume {resume_path} was trained as {restored['args'].get('model')!r}, "
                             f"not {args.model!r}")
        start_epoch, num_updates, best = restored["epoch"] + 1, restored["num_updates"], restored["best"]
        log(f"resumed from {resume_path} after epoch {start_epoch}/{num_epochs}")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.model}: {n_params / 1e6:.2f}M params, {num_classes} classes, input {tuple(data_config['input_size'])}, "
        f"{len(datasets['train'])} train / {len(datasets['val'])} val images, {num_epochs} epochs of "
        f"{len(train_loader)} steps, device {device}, amp {amp_dtype or 'off'}, output {output}")
    meta = _weights_meta(args, num_classes, class_to_idx, data_config)

    val_m = None
    for epoch in range(start_epoch, num_epochs):
        train_loader.sampler.set_epoch(epoch)
        train_m = train_one_epoch(
            model, train_loader, optimizer, loss_fn, device, scheduler=scheduler, num_updates=num_updates,
            amp_dtype=amp_dtype, clip_grad=args.clip_grad, progress=args.progress,
            desc=f"epoch {epoch + 1}/{num_epochs}")
        num_updates = train_m["num_updates"]
        val_m = evaluate(model, val_loader, device, amp_dtype, progress=args.progress)
        is_best = best["top1"] is None or val_m["top1"] > best["top1"]
        if is_best:
            best = {"top1": val_m["top1"], "epoch": epoch}
        save_training_state(output, model, optimizer, scheduler, epoch, num_updates, best, args,
                            dict(meta, top1=val_m["top1"]), is_best)
        update_summary(epoch, {"loss": train_m["loss"]}, {k: val_m[k] for k in ("loss", "top1", "top5")},
                       str(output / SUMMARY), lr=train_m["lr"], write_header=epoch == 0)
        log(_epoch_line(epoch, num_epochs, train_m, val_m))

    best_path = output / BEST_WEIGHTS
    if best["top1"] is not None:
        log(f"best val top-1 {best['top1']:.2f} (epoch {best['epoch'] + 1}); checkpoint {best_path}")
    return {"best_top1": best["top1"], "best_epoch": None if best["epoch"] is None else best["epoch"] + 1,
            "last": val_m, "epochs_run": num_epochs - start_epoch, "output": output,
            "best_checkpoint": best_path, "last_checkpoint": output / LAST_WEIGHTS}


def _apply_checkpoint_defaults(args: argparse.Namespace, meta: Mapping[str, Any]) -> None:
    """Fill the model/input settings the user left unset from a linvision weights file's metadata."""
    for key in _MODEL_KEYS + ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
        if getattr(args, key, None) in (None, {}) and meta.get(key) is not None:
            setattr(args, key, meta[key])
    if getattr(args, "img_size", None) is None and getattr(args, "input_size", None) is None and meta.get("input_size"):
        args.input_size = list(meta["input_size"])


def evaluate_checkpoint(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate ``args.checkpoint`` (``.safetensors``/``.pth``) or ``--pretrained`` weights on one split.

    Settings left unset (model, classes, channels, input size, normalisation, crop) come from the
    checkpoint's metadata when it was written by :func:`train`, so the same preprocessing is used.

    Returns:
        :func:`evaluate`'s metrics plus ``"checkpoint"`` and ``"model"``.
    """
    meta: Dict[str, Any] = {}
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            raise InputError(f"checkpoint not found: {ckpt}")
        if ckpt.name.endswith("_state.pth"):
            raise InputError(f"{ckpt} is a training-state file without weights; pass "
                             f"{ckpt.parent / BEST_WEIGHTS} or {ckpt.parent / LAST_WEIGHTS}")
        meta = read_weights_metadata(ckpt)
        _apply_checkpoint_defaults(args, meta)
    if not args.model:
        raise InputError("--model is required (the checkpoint does not name its model)")
    if not args.checkpoint and not args.pretrained:
        log("warning: neither --checkpoint nor --pretrained given: evaluating randomly initialised weights")

    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    in_chans = args.in_chans or 3
    args.in_chans = in_chans
    class_map = {c: i for i, c in enumerate(meta["classes"])} if meta.get("classes") else None
    datasets, class_to_idx = create_datasets(args.data_dir, (args.split,), in_chans=in_chans,
                                             class_map=class_map, allow_root=True)
    num_classes = _resolve_num_classes(args.num_classes, class_to_idx)
    model = build_model(args, num_classes)
    if args.checkpoint:
        try:
            timm_load_checkpoint(model, str(args.checkpoint), use_ema=args.use_ema, strict=True)
        except RuntimeError as e:
            raise InputError(f"{args.checkpoint} does not fit {args.model} with {num_classes} classes and "
                             f"{in_chans} input channels:\n{e}") from e
    model.to(device)
    data_config = resolve_data_config(args, model)
    loader = build_loader(datasets[args.split], data_config, False, args.batch_size, args, device)
    metrics = evaluate(model, loader, device, amp_dtype, progress=args.progress)
    source = args.checkpoint or f"pretrained {args.model}"
    log(f"{args.model} on {metrics['num_images']} images ({args.split}): top-1 {metrics['top1']:.2f}  "
        f"top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  {metrics['img_per_sec']:.0f} img/s  "
        f"checkpoint {source}")
    return dict(metrics, checkpoint=str(source), model=args.model)
