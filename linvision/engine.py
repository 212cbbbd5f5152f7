"""Training and evaluation loop over timm's utilities; ``tools/train.py`` and ``tools/eval.py`` only
parse arguments and call :func:`train` / :func:`evaluate_checkpoint`.

What the loop calls (timm's, not rewritten): ``create_dataset``/``create_transform``/
``create_loader``/``RepeatAugSampler``/``PrefetchLoader`` (data), ``Mixup`` +
``SoftTargetCrossEntropy``/``BinaryCrossEntropy``/``LabelSmoothingCrossEntropy`` (losses),
``create_optimizer_v2`` (weight-decay groups from ``no_weight_decay``, layer decay from
``group_matcher``), ``create_scheduler_v2`` (warmup + cosine...), ``ModelEmaV3``, ``NativeScaler``,
``dispatch_clip_grad``, ``distribute_bn``, ``init_distributed_device_so``, ``update_summary``.
The parts around them live in :mod:`linvision.training` (resumable sampler, DDP/FSDP2 wrapping,
checkpoint sets with manifests, CSV/TensorBoard monitor, configs).

A run (:func:`train`) under ``torchrun --nproc_per_node=N``: every rank trains on its share of each
epoch (``DistributedSampler`` or ``RepeatAugSampler``), metrics are summed over ranks, and only rank 0
writes files and logs. Output directory (``--output``)::

    config.yaml        the resolved settings (``tools/train.py -c`` reads it back)
    log.txt            the log lines
    summary.csv        one row per epoch (train loss, img/s, val/EMA top-1/top-5, lr, peak memory)
    run_summary.json   best top-1, time, images/s, peak memory of the finished run
    checkpoints/       the last ``--keep-last`` checkpoint sets (step-N.{safetensors,ema.safetensors,state.pth,json})
    last.safetensors, last.ema.safetensors, last_state.pth, last.json   the newest set (hard links)
    best.safetensors   weights (model or EMA, whichever scored) with the best ``--eval-metric`` (top-1)
    args.yaml, model_best.safetensors   timm's names: the arguments, a hard link to best.safetensors

SIGTERM/SIGUSR1 finish the step in progress, write a checkpoint set and return with
``preempted=True`` (:mod:`linvision.training.preemption`).

Resuming (``--resume auto``) restores weights, EMA, optimizer, scheduler position, loss scaler,
counters and every rank's RNG states, and continues at the exact batch where the checkpoint was
taken (mid-epoch checkpoints come from ``--save-every-steps``). On CPU with the same settings the
resumed run ends with bit-identical weights to an uninterrupted one (tested); see
:mod:`linvision.training.data` for why the data order and augmentations allow that.
"""
import argparse
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import timm
from timm.data import resolve_data_config as timm_resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, random_seed

from .backbones._builder import unwrap_checkpoint
from .checkpoint import atomic_link, capture_rng_state, read_weights_metadata, restore_rng_state, write_json
from .serialization import CheckpointError, check_checkpoint_model, load_checkpoint_file
from .training.checkpoints import (BEST_WEIGHTS, LAST_EMA, LAST_MANIFEST, LAST_STATE, LAST_WEIGHTS, Checkpoint,
                                   CheckpointManager, ema_sibling, resolve_resume)
from .training.cli import compile_settings
from .training.common import InputError, plain as _plain
from .training.config import save_config
from .training.preemption import PreemptionHandler
from .training.data import (build_eval_loader, build_train_loader, create_datasets, create_mixup, find_split_dir,
                            set_loader_epoch, train_sampler)
from .training.distributed import (DistEnv, Wrapped, full_model_state, full_state, init_distributed,
                                   load_full_model_state, load_full_state, wrap_model)
from .training.monitor import SUMMARY, RunMonitor, peak_memory_mb

__all__ = [
    "InputError", "LAST_WEIGHTS", "LAST_EMA", "LAST_STATE", "LAST_MANIFEST", "BEST_WEIGHTS", "SUMMARY",
    "CONFIG_FILE", "RUN_SUMMARY", "TIMM_ARGS_FILE", "TIMM_BEST_ALIAS", "load_weights_file",
    "resolve_device", "resolve_amp_dtype", "find_split_dir", "create_datasets", "build_model",
    "resolve_data_config", "to_channels_last", "check_distributed_options", "build_loader", "build_loaders",
    "resolve_lr", "build_train_loss",
    "train_one_epoch", "evaluate", "resolve_resume", "train", "evaluate_checkpoint", "evaluate_many", "write_results",
    "RESULT_COLUMNS",
]

CONFIG_FILE = "config.yaml"
RUN_SUMMARY = "run_summary.json"
# timm train.py's names, written beside linvision's own: its arguments file, and the best weights
# under timm's stem (a hard link to best.safetensors, no second copy).
TIMM_ARGS_FILE = "args.yaml"
TIMM_BEST_ALIAS = "model_best.safetensors"

# Keys of a run's arguments that describe the model and its input; stored in every weights file so
# that eval can rebuild the same model and preprocessing from the checkpoint alone.
_MODEL_KEYS = ("model", "num_classes", "in_chans", "model_kwargs")
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _arg(args, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


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


def resolve_amp_dtype(amp: Optional[bool], device: torch.device, dtype: str = "bfloat16") -> Optional[torch.dtype]:
    """Autocast dtype, or None for full precision.

    ``amp`` None (auto) means on for CUDA, off on CPU (slower there). ``dtype`` is ``bfloat16``
    (the project default: no loss scaler needed, DESIGN.md Numerics) or ``float16`` (the official
    MAViT/RAVLT recipes; trained with timm's ``NativeScaler``)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if dtype not in _AMP_DTYPES:
        raise InputError(f"--amp-dtype {dtype!r}: expected bfloat16 or float16")
    return _AMP_DTYPES[dtype]


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# ----------------------------------------------------------------------------------------------
# Data

def resolve_data_config(args: argparse.Namespace, model: nn.Module, use_test_size: bool = False) -> Dict[str, Any]:
    """timm's data config (input size, interpolation, mean/std, crop) from ``args`` and the model's
    pretrained cfg; ``args.img_size``/``input_size``/``mean``/``std``/``crop_pct``/
    ``interpolation`` override. Mean/std are reduced to ``in_chans`` values when the model cfg has 3.
    ``use_test_size``: the cfg's ``test_input_size`` where it has one (timm's validate.py default)."""
    cfg = timm_resolve_data_config(
        {k: getattr(args, k, None) for k in ("in_chans", "img_size", "input_size", "crop_pct", "crop_mode",
                                             "interpolation", "mean", "std")},
        model=model, use_test_size=use_test_size)
    in_chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        if len(cfg[key]) != in_chans:
            # An RGB cfg on a greyscale model: torchvision's Normalize would silently broadcast a
            # 1-channel image to 3 channels, so use the channel average instead.
            cfg[key] = (float(np.mean(cfg[key])),) * in_chans
    return cfg


def build_loader(dataset, data_config: Mapping[str, Any], is_training: bool, batch_size: int,
                 args: argparse.Namespace, device: torch.device, rank: int = 0, world_size: int = 1):
    """A train (:func:`linvision.training.data.build_train_loader`) or eval
    (:func:`~linvision.training.data.build_eval_loader`) loader for one process of ``world_size``."""
    env = DistEnv(device, rank, rank, world_size, world_size > 1)
    if is_training:
        args = argparse.Namespace(**dict(vars(args), batch_size=batch_size))
        return build_train_loader(dataset, data_config, args, env)
    return build_eval_loader(dataset, data_config, batch_size, args, env)


def build_loaders(args: argparse.Namespace, datasets: Mapping[str, Any], data_config: Mapping[str, Any],
                  device: torch.device, env: Optional[DistEnv] = None):
    """Train and val loaders for ``datasets['train']`` / ``datasets['val']``; val batches are
    ``args.val_batch_size`` (default twice the train batch: no activations are kept)."""
    env = env or DistEnv(device)
    train_loader = build_train_loader(datasets["train"], data_config, args, env)
    val_bs = getattr(args, "val_batch_size", None) or 2 * args.batch_size
    return train_loader, build_eval_loader(datasets["val"], data_config, val_bs, args, env)


# ----------------------------------------------------------------------------------------------
# Model, optimisation

def build_model(args: argparse.Namespace, num_classes: int, **overrides) -> nn.Module:
    """``timm.create_model(args.model, ...)`` with ``pretrained``, ``in_chans``, ``drop_path``, ``drop``
    and ``model_kwargs`` from ``args`` (``overrides`` win). The linvision families are registered
    with timm already: importing this module runs ``linvision/__init__``."""
    if ":" not in args.model and not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:10]
        raise InputError(f"unknown model {args.model!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    # None values are dropped by timm.create_model, so models without e.g. bn_eps are unaffected.
    kwargs = dict(pretrained=getattr(args, "pretrained", False), num_classes=num_classes,
                  in_chans=getattr(args, "in_chans", None) or 3, drop_path_rate=getattr(args, "drop_path", None),
                  drop_rate=getattr(args, "drop", None), drop_block_rate=getattr(args, "drop_block", None),
                  global_pool=getattr(args, "gp", None), bn_momentum=getattr(args, "bn_momentum", None),
                  bn_eps=getattr(args, "bn_eps", None), **(getattr(args, "model_kwargs", None) or {}))
    kwargs.update(overrides)
    if getattr(args, "fast_norm", False):
        from timm.layers import set_fast_norm
        set_fast_norm()
    try:
        model = timm.create_model(args.model, **kwargs)
    except TypeError as e:
        raise InputError(f"{args.model} does not take one of the options given ({e})") from e
    head_scale, head_bias = getattr(args, "head_init_scale", None), getattr(args, "head_init_bias", None)
    if head_scale is not None or head_bias is not None:
        head = model.get_classifier()
        with torch.no_grad():
            if head_scale is not None and getattr(head, "weight", None) is not None:
                head.weight.mul_(head_scale)
            if head_bias is not None and getattr(head, "bias", None) is not None:
                head.bias.fill_(head_bias)
    return model


def load_weights_file(args: argparse.Namespace, path: os.PathLike, num_classes: int, *, what: str,
                      pretrained_semantics: bool = False, use_ema: Optional[bool] = None) -> nn.Module:
    """Build ``args.model`` with the weights of ``path`` (read by :func:`load_checkpoint_file`).

    A linvision ``.safetensors`` must have been written by the same model name unless
    ``args.allow_model_mismatch``; it is loaded strictly. Other files (official ``.pth``, plain state
    dicts) go through the model family's ``checkpoint_filter_fn``. ``pretrained_semantics``
    (``--pretrained-path``) lets timm drop a classifier of another size, as for registry weights;
    otherwise the classifier must fit (``--initial-checkpoint``, ``tools/eval.py``).

    Raises:
        InputError: missing, unsafe or damaged file, another model's file, or shapes that do not fit;
            the message starts with ``what`` (the flag).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        written_by = check_checkpoint_model(path, args.model, allow=bool(getattr(args, "allow_model_mismatch", False)))
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as e:
        raise InputError(f"{what}: {e}") from None
    in_chans = getattr(args, "in_chans", None) or 3
    try:
        if written_by and not pretrained_semantics:
            model = build_model(args, num_classes, pretrained=False)
            model.load_state_dict(checkpoint, strict=True)
            return model
        if use_ema is not None and isinstance(checkpoint, dict):
            checkpoint = unwrap_checkpoint(checkpoint, prefer_ema=use_ema)
        overlay = dict(state_dict=checkpoint)
        if not pretrained_semantics:
            overlay["num_classes"] = num_classes  # the classifier must fit: no silent re-initialisation
        return build_model(args, num_classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError) as e:
        raise InputError(f"{what} {path} does not fit {args.model} with {num_classes} classes and "
                         f"{in_chans} input channels:\n{e}") from e


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put ``model``'s convolution weights (and 4-D buffers) in channels_last, in place.

    Other 4-D parameters, such as layer scales of shape ``(1, C, 1, 1)``, keep the default layout.
    Their gradients come out of reductions in that layout. With size-1 dims, both layouts count as
    contiguous, so autograd does not restride such a gradient. DDP then finds gradient strides that
    differ from the parameter's bucket view: it warns, and copies the gradient on every step.
    """
    model.to(memory_format=torch.channels_last)
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for param in model.parameters():
        if param.dim() == 4 and id(param) not in conv_weights:
            param.data = param.data.clone(memory_format=torch.contiguous_format)
    return model


def resolve_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr`` if given, else ``--lr-base`` × (global batch / ``--lr-base-size``), scaled linearly
    (MAViT/RAVLT/DeiT rule) or by the square root (``--lr-base-scale sqrt``).

    The global batch counts every rank and every accumulated micro-batch of one update."""
    if getattr(args, "lr", None) is not None:
        return float(args.lr)
    ratio = global_batch / _arg(args, "lr_base_size", 512)
    scale = _arg(args, "lr_base_scale", "linear")
    if not scale:  # timm's automatic choice
        scale = "sqrt" if any(o in str(_arg(args, "opt", "")).lower() for o in ("ada", "lamb")) else "linear"
    if scale == "sqrt":
        ratio = ratio ** 0.5
    return float(_arg(args, "lr_base", 5e-4)) * ratio


def build_train_loss(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    """timm train.py's choice: soft-target CE (or BCE) on mixup targets, else label-smoothing CE
    (or BCE with smoothing), else plain CE."""
    smoothing = _arg(args, "smoothing", 0.0)
    bce = _arg(args, "bce_loss", False)
    thresh = getattr(args, "bce_target_thresh", None)
    bce_kw = dict(target_threshold=thresh, sum_classes=bool(_arg(args, "bce_sum", False)),
                  pos_weight=getattr(args, "bce_pos_weight", None))
    if mixup_active:
        return BinaryCrossEntropy(**bce_kw) if bce else SoftTargetCrossEntropy()
    if bce:
        return BinaryCrossEntropy(smoothing=smoothing, **bce_kw)
    return LabelSmoothingCrossEntropy(smoothing=smoothing) if smoothing else nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------------------------
# Loops

def _lr(optimizer: torch.optim.Optimizer) -> float:
    # The unscaled lr: with --layer-decay the groups carry lr x lr_scale (largest for the head).
    return max(group["lr"] for group in optimizer.param_groups)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_one_epoch(
        model: nn.Module,
        loader,
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
        *,
        clip_mode: str = "norm",
        mixup_fn=None,
        model_ema: Optional[ModelEmaV3] = None,
        scaler: Optional[NativeScaler] = None,
        grad_accum_steps: int = 1,
        channels_last: bool = False,
        wrapped: Optional[Wrapped] = None,
        env: Optional[DistEnv] = None,
        start_batch: int = 0,
        meter: Optional[Mapping[str, float]] = None,
        on_update: Optional[Callable[[int, int, Callable[[], Dict[str, float]]], None]] = None,
        log: Optional[Callable[[str], None]] = None,
        synchronize_step: bool = False,
) -> Dict[str, float]:
    """One pass over ``loader`` (from batch ``start_batch``), one optimizer update every
    ``grad_accum_steps`` batches.

    Args:
        model: the module to train (any wrapper); ignored when ``wrapped`` is given.
        loader: yields ``(images (B, C, H, W) float32, labels (B,) int64)``.
        loss_fn: ``(logits (B, num_classes), targets) -> scalar``; targets are soft after mixup.
        scheduler: timm scheduler; ``step_update(num_updates)`` after every update.
        num_updates: optimizer updates before this batch (the scheduler's and EMA's clock).
        amp_dtype: autocast dtype or None for full precision.
        clip_grad, clip_mode: ``dispatch_clip_grad`` value and mode (norm, value, agc).
        progress: tqdm bar (loss, lr, img/s, ETA); without it a line every ``log_interval``
            steps goes to ``log``.
        mixup_fn: timm ``Mixup`` applied to each batch on the device.
        model_ema: updated after every optimizer update.
        scaler: timm ``NativeScaler`` (fp16), which does backward, unscale+clip and step.
        grad_accum_steps: micro-batches per update; the gradient all-reduce runs on the last one only.
        wrapped: the model as :func:`linvision.training.distributed.wrap_model` prepared it.
        env: ranks to sum the epoch's loss over.
        start_batch: batches of this epoch already done (mid-epoch resume); the loader must
            already start there (map-style) or is advanced here (iterable sources).
        meter: ``{"loss_sum", "seen", "time"}`` of those batches, so the epoch's mean is exact.
        on_update: called after every update with ``(batches_done, num_updates, meter_fn)``
            (``meter_fn()`` returns the running meter); the loop saves checkpoints there.
        synchronize_step: ``torch.cuda.synchronize()`` after every update (timm's
            ``--synchronize-step``, for timing and debugging).

    Returns:
        ``{"loss": mean loss per image over all ranks, "lr", "img_per_sec" (all ranks),
        "time", "num_updates", "num_images"}``.
    """
    w = wrapped or Wrapped(model, model, _unwrap(model), "single")
    env = env or DistEnv(device)
    w.train.train()
    num_batches = len(loader)
    accum = max(1, int(grad_accum_steps))
    updates_per_epoch = math.ceil(num_batches / accum)
    last_group = num_batches - (updates_per_epoch - 1) * accum
    meter = dict(meter or {})
    loss_sum = torch.tensor(float(meter.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
    seen, prior_time = int(meter.get("seen", 0)), float(meter.get("time", 0.0))
    params = [p for p in w.bare.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(total=num_batches, initial=start_batch, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=0.5)
    iterator = iter(loader)
    if start_batch and train_sampler(loader) is None:
        for _ in range(start_batch):  # an iterable source cannot seek: re-read the batches done
            next(iterator)

    def running() -> Dict[str, float]:
        return {"loss_sum": loss_sum.item(), "seen": seen, "time": prior_time + time.perf_counter() - start}

    optimizer.zero_grad(set_to_none=True)
    batch_idx = start_batch
    for batch_idx in range(start_batch, num_batches):
        try:
            images, labels = next(iterator)
        except StopIteration:  # an iterable source's length is an estimate
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        group = last_group if batch_idx // accum == updates_per_epoch - 1 else accum
        need_update = (batch_idx + 1) % accum == 0 or batch_idx + 1 == num_batches
        with w.grad_sync(need_update):
            with _autocast(device, amp_dtype):
                loss = loss_fn(w.train(images), labels)
            scaled = loss / group if group > 1 else loss
            if scaler is not None:
                scaler(scaled, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=params,
                       need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if clip_grad:
                        dispatch_clip_grad(params, clip_grad, mode=clip_mode)
                    optimizer.step()
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(w.bare, step=num_updates)
            if synchronize_step and device.type == "cuda":
                torch.cuda.synchronize(device)
            if on_update is not None:
                on_update(batch_idx + 1, num_updates, running)
        bar.update(1)
        done = batch_idx + 1 - start_batch
        # The bar refreshes every 10 steps at most; log lines (no bar) come every log_interval.
        if done % (min(log_interval, 10) if progress else log_interval) == 0 or batch_idx == num_batches - 1:
            mean_loss = loss_sum.item() / max(seen, 1)
            if not np.isfinite(mean_loss):
                raise FloatingPointError(f"{desc}: loss became {mean_loss} at step {batch_idx}; lower --lr "
                                         f"or enable --clip-grad")
            elapsed = time.perf_counter() - start
            rate = done * images.shape[0] * env.world_size / max(elapsed, 1e-9)
            lr = _lr(optimizer)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
            if not progress and log is not None and done % log_interval == 0:
                eta = elapsed / done * (num_batches - batch_idx - 1)
                log(f"  {desc} step {batch_idx + 1}/{num_batches}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                    f"{rate:.0f} img/s  eta {_fmt_time(eta)}")
    bar.close()
    totals = env.sum(torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    elapsed = prior_time + time.perf_counter() - start
    total_seen = int(totals[1].item())
    return {"loss": totals[0].item() / max(total_seen, 1), "lr": _lr(optimizer),
            "img_per_sec": total_seen / max(elapsed, 1e-9), "time": elapsed, "num_updates": num_updates,
            "num_images": total_seen}


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
        desc: str = "val",
        *,
        env: Optional[DistEnv] = None,
        lockstep: bool = False,
        channels_last: bool = False,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Under torchrun every rank evaluates its share and the correct counts and loss sums are summed
    over ranks, so the result is the same on every rank and equals a single-process run.

    Args:
        env: ranks to sum over (default: this process only).
        lockstep: every rank runs as many forwards as the rank with the most batches (FSDP, whose
            forward is a collective); the extra ones are discarded.

    Returns:
        ``{"loss", "top1", "top5", "num_images", "img_per_sec", "time"}``; ``img_per_sec``
        covers the whole loop (data loading included) and all ranks. top-5 is top-k with
        k = min(5, num_classes).
    """
    env = env or DistEnv(device)
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    num_batches = len(loader)
    steps = env.max_int(num_batches) if lockstep else num_batches
    start = time.perf_counter()
    last = None
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
                               mininterval=0.5):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.sum().double(),
                               torch.tensor(float(labels.shape[0]), device=device, dtype=torch.float64)])
        last = images[:1]
    for _ in range(steps - num_batches):  # FSDP: keep the other ranks' all-gathers company
        with _autocast(device, amp_dtype):
            model(last if last is not None else _dummy_input(loader, device))
    totals = env.sum(totals)
    loss_sum, top1, top5, seen = totals.tolist()
    seen = int(seen)
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "top1": round(100.0 * top1 / max(seen, 1), 4),
            "top5": round(100.0 * top5 / max(seen, 1), 4), "num_images": seen,
            "img_per_sec": seen / max(elapsed, 1e-9), "time": elapsed}


def _dummy_input(loader, device: torch.device) -> torch.Tensor:
    size = getattr(loader, "input_size", None)
    if size is None:
        ds = loader.dataset
        item = ds[0] if len(ds) else None
        size = tuple(item[0].shape) if item is not None and hasattr(item[0], "shape") else (3, 224, 224)
    return torch.zeros((1, *size), device=device)


# ----------------------------------------------------------------------------------------------
# Checkpoint contents

def _unwrap(model: nn.Module) -> nn.Module:
    # DDP wraps in .module, torch.compile in ._orig_mod; checkpoints hold the bare model's keys.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _weights_meta(args: argparse.Namespace, num_classes: int, class_to_idx: Mapping[str, int],
                  data_config: Mapping[str, Any]) -> Dict[str, Any]:
    meta = {"model": args.model, "num_classes": num_classes, "in_chans": data_config["input_size"][0],
            "model_kwargs": getattr(args, "model_kwargs", None) or {},
            "classes": sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None}
    meta.update({k: data_config[k] for k in _DATA_KEYS})
    return _plain(meta)


def _ema_generator(model_ema: Optional[ModelEmaV3]) -> Optional[torch.Generator]:
    return getattr(model_ema, "_sr_generator", None) if model_ema is not None else None


# ----------------------------------------------------------------------------------------------
# Programs

def _resolve_num_classes(requested: Optional[int], class_to_idx: Mapping[str, int]) -> int:
    found = len(class_to_idx)
    if requested is None:
        if not found:
            raise InputError("the dataset has no class names; pass --num-classes")
        return found
    if requested < found:
        raise InputError(f"--num-classes {requested} is smaller than the {found} class folders in the data")
    return requested


def _epoch_line(epoch: int, epochs: int, train_m: Mapping[str, float], val_m: Optional[Mapping[str, float]],
                ema_m: Optional[Mapping[str, float]]) -> str:
    line = f"epoch {epoch + 1}/{epochs}  train loss {train_m['loss']:.4f}  "
    if val_m is not None:
        line += f"val loss {val_m['loss']:.4f} top-1 {val_m['top1']:.2f} top-5 {val_m['top5']:.2f}  "
    if ema_m is not None:
        line += f"ema top-1 {ema_m['top1']:.2f} top-5 {ema_m['top5']:.2f}  "
    extra = (val_m or {}).get("time", 0.0) + (ema_m or {}).get("time", 0.0)
    return line + (f"lr {train_m['lr']:.2e}  {train_m['img_per_sec']:.0f} img/s  "
                   f"time {train_m['time'] + extra:.1f}s")


def _class_map(args: argparse.Namespace) -> Optional[Dict[str, int]]:
    """``--class-map FILE`` (one class name per line, or ``name index``) as timm reads it."""
    path = getattr(args, "class_map", None)
    if not path:
        return None
    from timm.data.readers.class_map import load_class_map
    try:
        return dict(load_class_map(path))
    except (OSError, AssertionError, ValueError) as e:
        raise InputError(f"--class-map {path}: {e}") from e


def _dataset_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    source = {k: getattr(args, k) for k in ("input_key", "target_key") if getattr(args, k, None)}
    if getattr(args, "dataset_trust_remote_code", False):
        source["trust_remote_code"] = True
    return dict(dataset=_arg(args, "dataset", ""), download=_arg(args, "dataset_download", False),
                batch_size=args.batch_size, seed=_arg(args, "seed", 0), class_map=_class_map(args),
                source_kwargs=source,
                split_names={"train": _arg(args, "train_split", "train"), "val": _arg(args, "val_split", "val")},
                num_samples={"train": getattr(args, "train_num_samples", None),
                             "val": getattr(args, "val_num_samples", None)})


def check_distributed_options(args: argparse.Namespace, env: DistEnv) -> None:
    """Refuse, before any work, the option combinations PyTorch cannot run, saying what to use instead.

    Every rank reaches the same verdict, so under torchrun all of them exit with the message.
    """
    if env.distributed and _arg(args, "sync_bn", False) and env.device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation. "
                         "Without it, BatchNorm statistics are averaged over the ranks at each epoch end "
                         "(--dist-bn reduce, the default)")
    if (env.distributed and _arg(args, "fsdp", False) and _arg(args, "clip_grad", None)
            and _arg(args, "clip_mode", "norm") == "agc"):
        raise InputError("--clip-mode agc does not run under --fsdp: timm's adaptive clipping changes the "
                         "sharded gradient norms in place. Use --clip-mode norm or value, or DDP (no --fsdp)")


def _primary_log(env: DistEnv, log: Callable[[str], None]) -> Callable[[str], None]:
    return log if env.is_primary else (lambda message: None)


def train(args: argparse.Namespace, log: Callable[[str], None] = print,
          config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train ``args.model`` and evaluate it (and its EMA) every ``--eval-interval`` epochs.

    Args:
        args: the namespace ``tools/train.py`` builds (field names follow timm's ``train.py``).
        log: console printer (rank 0 only).
        config: the resolved settings to save as ``config.yaml`` (default: ``vars(args)``).

    Returns (on every rank):
        ``{"best_top1", "best_epoch" (1-based), "best_source" ("model"/"ema"), "last": val
        metrics of the final epoch, "last_ema", "history": per-epoch rows, "epochs_run",
        "num_updates", "img_per_sec", "time", "peak_mem_mb", "rank", "world_size", "output",
        "best_checkpoint", "last_checkpoint"}``.
    """
    run_start = time.perf_counter()
    if getattr(args, "in_chans", None) is None:
        args.in_chans = args.input_size[0] if getattr(args, "input_size", None) else 3
    env = init_distributed(getattr(args, "device", None), getattr(args, "dist_backend", None))
    device = env.device
    amp_dtype = resolve_amp_dtype(args.amp, device, _arg(args, "amp_dtype", "bfloat16"))
    check_distributed_options(args, env)
    if _arg(args, "deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # The same initial weights on every rank (FSDP shards each rank's own copy); data order,
    # augmentation and drop path then draw from per-rank streams.
    random_seed(args.seed, 0)
    output = Path(args.output)
    monitor = RunMonitor(output, enabled=env.is_primary, tensorboard=_arg(args, "tensorboard", False), echo=log)
    say = monitor.log

    # Data and model
    datasets, class_to_idx = create_datasets(args.data_dir, ("train", "val"), in_chans=args.in_chans,
                                             **_dataset_kwargs(args))
    num_classes = _resolve_num_classes(args.num_classes, class_to_idx)
    if getattr(args, "initial_checkpoint", None):
        model = load_weights_file(args, args.initial_checkpoint, num_classes, what="--initial-checkpoint")
        say(f"initial weights from {args.initial_checkpoint}")
    elif getattr(args, "pretrained_path", None):
        model = load_weights_file(args, args.pretrained_path, num_classes, what="--pretrained-path",
                                  pretrained_semantics=True)
        say(f"pretrained weights from {args.pretrained_path}")
    else:
        model = build_model(args, num_classes)
    if _arg(args, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    random_seed(args.seed, env.rank)
    data_config = resolve_data_config(args, model)
    model.to(device)
    fsdp = bool(_arg(args, "fsdp", False)) and env.distributed
    channels_last = bool(_arg(args, "channels_last", False))
    if channels_last and not fsdp:
        # FSDP2 shards only contiguous parameters: under it the weights stay as they are and only the
        # batches go channels_last (convolutions then run channels_last all the same).
        to_channels_last(model)
    if env.distributed and _arg(args, "sync_bn", False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    accum = max(1, int(_arg(args, "grad_accum_steps", 1)))
    global_batch = args.batch_size * env.world_size * accum
    model_ema = None
    if _arg(args, "model_ema", False):
        decay = float(_arg(args, "model_ema_decay", 0.9998))
        if getattr(args, "model_ema_decay_base_size", None):
            decay = decay ** (global_batch / args.model_ema_decay_base_size)
        # Under FSDP parameters are DTensors but buffers plain tensors, which one foreach call
        # cannot mix: update tensor by tensor there.
        model_ema = ModelEmaV3(model, decay=decay, warmup_power=3 / 4, foreach=not fsdp,
                               use_warmup=bool(_arg(args, "model_ema_warmup", False)))
    compile_mode, compile_backend = compile_settings(args)
    w = wrap_model(model, env, fsdp=fsdp, compile_mode=compile_mode, compile_backend=compile_backend,
                   broadcast_buffers=not _arg(args, "no_ddp_bb", False),
                   extra_fsdp=(model_ema.module,) if (fsdp and model_ema is not None) else ())

    if _arg(args, "fsdp", False) and not env.distributed:
        say("note: --fsdp needs several processes (torchrun); training unsharded")
    if fsdp and amp_dtype == torch.float16:
        say("warning: --fsdp with float16 uses the plain GradScaler, whose overflow check is per rank "
            "(untested); prefer --amp-dtype bfloat16")
    lr = resolve_lr(args, global_batch)
    opt_cfg = argparse.Namespace(**dict(vars(args), lr=lr, opt_args=dict(getattr(args, "opt_kwargs", None) or {})))
    if getattr(opt_cfg, "opt_betas", None):
        opt_cfg.opt_betas = tuple(opt_cfg.opt_betas)
    optimizer = create_optimizer_v2(w.bare, **optimizer_kwargs(cfg=opt_cfg))
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None

    train_loader, val_loader = build_loaders(args, datasets, data_config, device, env)
    if len(train_loader) == 0:
        raise InputError(f"{args.data_dir}: the train split gives no batches")
    updates_per_epoch = math.ceil(len(train_loader) / accum)
    if str(args.sched).lower() == "plateau":
        raise InputError("--sched plateau is not supported: the loop sets the schedule from the update count "
                         "(exact resume), which a metric-driven schedule cannot follow; use cosine, step, multistep...")
    # timm's own translation of the flags; unset values (None) fall back to create_scheduler_v2's
    # defaults (timm <= 1.0.29 also fails on an explicit decay_epochs=None).
    sched_kwargs = {k: v for k, v in scheduler_kwargs(argparse.Namespace(**dict(
        vars(args), sched_on_updates=_arg(args, "sched_on_updates", True)))).items() if v is not None}
    scheduler, num_epochs = create_scheduler_v2(optimizer, **sched_kwargs, updates_per_epoch=updates_per_epoch)
    mixup_fn = create_mixup(args, num_classes)
    loss_fn = build_train_loss(args, mixup_fn is not None).to(device)
    sampler = train_sampler(train_loader)
    meta = _weights_meta(args, num_classes, class_to_idx, data_config)
    manager = CheckpointManager(output, keep_last=_arg(args, "keep_last", 3), log=say)

    # Resume
    start_epoch, start_batch, num_updates = 0, 0, 0
    metric_name = _arg(args, "eval_metric", "top1")
    best: Dict[str, Any] = {"top1": None, "epoch": None, "source": None, "metric": metric_name, "value": None}
    history: List[Dict[str, Any]] = []
    resume_meter: Optional[Dict[str, float]] = None
    found, problem = None, None
    if env.is_primary:  # rank 0 verifies (sha256) and tells the others which set to load
        try:
            found = resolve_resume(args.resume, output, log=say, keep_last=manager.keep_last)
        except InputError as e:
            problem = str(e)
    found_path, problem = env.broadcast_object((str(found.path) if found is not None else None, problem))
    if problem is not None:
        raise InputError(problem)
    if found_path is not None:
        ckpt = found if env.is_primary else resolve_resume(found_path, output, log=say, check_hash=False)
        restored = _restore(ckpt, args, w, optimizer, scaler, model_ema, env, say)
        state = restored["state"]
        start_epoch, start_batch, num_updates = state["next_epoch"], state["batches_done"], state["num_updates"]
        best, history = dict(restored["best"]), list(state.get("history") or [])
        if best.get("metric", "top1") != metric_name:  # another --eval-metric than the checkpoint's run
            best.update(top1=None, epoch=None, source=None, value=None)
        best.update(metric=metric_name, value=best.get("value", best["top1"]))
        resume_meter = state.get("epoch_progress")
        if env.is_primary:
            manager.discard_newer(num_updates)
        if start_batch and (state.get("world_size", env.world_size) != env.world_size
                            or state.get("global_batch", global_batch) != global_batch):
            say(f"warning: the checkpoint was taken with {state.get('world_size')} processes and global batch "
                f"{state.get('global_batch')}, this run has {env.world_size} and {global_batch}: epoch "
                f"{start_epoch + 1} continues after {start_batch} batches but in a different sample order")
        say(f"resumed from {ckpt.path} at epoch {start_epoch + 1}/{num_epochs}"
            + (f", batch {start_batch}/{len(train_loader)}" if start_batch else "")
            + f" ({num_updates} updates done)")
    if getattr(args, "start_epoch", None) is not None:
        # timm's --start-epoch: wins over the resumed position; the schedule follows the epoch.
        start_epoch, start_batch, resume_meter = int(args.start_epoch), 0, None
        num_updates = start_epoch * updates_per_epoch
        say(f"--start-epoch: starting at epoch {start_epoch + 1}/{num_epochs} ({num_updates} updates)")
    if scheduler is not None:
        scheduler.step_update(num_updates=num_updates)

    if env.is_primary:
        save_config(config if config is not None else _plain(vars(args)), output / "config.yaml", header=[
            f"resolved config of {args.model} (tools/train.py -c reads it back)",
            f"world size {env.world_size}, global batch {global_batch}, lr {lr:.6g}, torch {torch.__version__}, "
            f"timm {timm.__version__}"])
        # timm's train.py writes its arguments as args.yaml: the same settings under timm's file name.
        save_config(_plain({k: v for k, v in vars(args).items() if k not in ("config", "set")}),
                    output / TIMM_ARGS_FILE, header=[
            "the run's arguments under timm's file name (config.yaml holds the same; -c reads either)"])
        _init_wandb(args, output, monitor)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{args.model}: {n_params / 1e6:.2f}M params, {num_classes} classes, input {tuple(data_config['input_size'])}, "
        f"{len(datasets['train'])} train / {len(datasets['val'])} val images, {num_epochs} epochs of "
        f"{len(train_loader)} steps, {env.world_size} x {device}, global batch {global_batch}, lr {lr:.3g}, "
        f"amp {amp_dtype or 'off'}, {w.kind}{' + compile' if compile_mode else ''}"
        f"{', channels_last' + (' (batches only)' if fsdp else '') if channels_last else ''}"
        f"{', ema' if model_ema is not None else ''}, output {output}")

    def checkpoint(next_epoch: int, batches_done: int, meter: Optional[Dict[str, float]],
                   best_source: Optional[str] = None) -> None:
        """Save one set (and ``best.safetensors`` first when ``best_source`` names a new best: a
        crash in between then repeats the epoch rather than leave a stale best file)."""
        model_state = optim_state = ema_state = None
        if w.kind == "fsdp" or env.is_primary:  # a collective under FSDP, a CPU copy otherwise
            model_state, optim_state = full_state(w.bare, optimizer)
            ema_state = full_model_state(model_ema.module) if model_ema is not None else None
        rng = env.gather_objects(capture_rng_state())
        if not env.is_primary:
            return
        if best_source is not None:
            best_file = manager.save_best(ema_state if best_source == "ema" else model_state,
                                          dict(meta, epoch=next_epoch - 1, top1=best["top1"], source=best_source,
                                               eval_metric=best["metric"], metric_value=best["value"]))
            atomic_link(best_file, output / TIMM_BEST_ALIAS)  # where a timm user looks (model_best.pth.tar)
        gen = _ema_generator(model_ema)
        state = {
            "format": "linvision.train_state/2",
            "epoch": next_epoch - 1,  # the last finished epoch (-1: none)
            "next_epoch": next_epoch,
            "batches_done": batches_done,
            "num_updates": num_updates_box[0],
            "epoch_progress": meter,
            "best": _plain(best),
            "history": _plain(history),
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "ema_generator": gen.get_state() if gen is not None else None,
            "world_size": env.world_size,
            "global_batch": global_batch,
            "args": _plain(vars(args)),
        }
        saved_box[0] = manager.save(num_updates_box[0], model_state, state, dict(meta, epoch=next_epoch - 1),
                                    ema=ema_state)

    num_updates_box = [num_updates]
    saved_box: List[Optional[Path]] = [None]
    save_every = int(_arg(args, "save_every_steps", 0))
    preempt = PreemptionHandler(env)

    def on_update(batches_done: int, updates: int, meter_fn) -> None:
        num_updates_box[0] = updates
        mid_epoch = batches_done < len(train_loader)
        saved = bool(save_every and updates % save_every == 0 and mid_epoch)
        if saved:
            checkpoint(epoch_box[0], batches_done, meter_fn())
        if mid_epoch and preempt.should_stop(updates):
            if not saved:
                checkpoint(epoch_box[0], batches_done, meter_fn())
            raise _Preempted(epoch_box[0], batches_done)

    epoch_box = [start_epoch]
    eval_interval = int(_arg(args, "eval_interval", 1))
    val_m = ema_m = None
    session = []
    stopped: Optional[_Preempted] = None
    with preempt:
        for epoch in range(start_epoch, num_epochs):
            epoch_box[0] = epoch
            set_loader_epoch(train_loader, epoch)
            skip = start_batch if epoch == start_epoch else 0
            if skip and sampler is not None:
                sampler.skip(skip * args.batch_size)
            if scheduler is not None:
                scheduler.step(epoch)
            if mixup_fn is not None and getattr(args, "mixup_off_epoch", None) and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            try:
                train_m = train_one_epoch(
                    w.train, train_loader, optimizer, loss_fn, device, scheduler=scheduler,
                    num_updates=num_updates_box[0], amp_dtype=amp_dtype, clip_grad=getattr(args, "clip_grad", None),
                    progress=args.progress and env.is_primary, desc=f"epoch {epoch + 1}/{num_epochs}",
                    log_interval=_arg(args, "log_interval", 50), clip_mode=_arg(args, "clip_mode", "norm"),
                    mixup_fn=mixup_fn, model_ema=model_ema, scaler=scaler, grad_accum_steps=accum,
                    channels_last=channels_last, wrapped=w, env=env, start_batch=skip,
                    meter=resume_meter if skip else None, on_update=on_update, log=say,
                    synchronize_step=bool(_arg(args, "synchronize_step", False)))
            except _Preempted as e:
                stopped = e
                break
            num_updates_box[0] = train_m["num_updates"]
            dist_bn = _arg(args, "dist_bn", "reduce")
            if env.distributed and not _arg(args, "sync_bn", False) and dist_bn in ("reduce", "broadcast"):
                # BatchNorm statistics drift apart per rank; average (or copy rank 0's) once per epoch.
                distribute_bn(w.bare, env.world_size, dist_bn == "reduce")
                if model_ema is not None:
                    distribute_bn(model_ema.module, env.world_size, dist_bn == "reduce")
            val_m = ema_m = None
            if (eval_interval and (epoch + 1) % eval_interval == 0) or epoch == num_epochs - 1:
                val_m = evaluate(w.eval, val_loader, device, amp_dtype, progress=args.progress and env.is_primary,
                                 env=env, lockstep=w.eval_needs_lockstep, channels_last=channels_last)
                if model_ema is not None:
                    ema_m = evaluate(model_ema.module, val_loader, device, amp_dtype, desc="val (ema)",
                                     progress=args.progress and env.is_primary, env=env,
                                     lockstep=w.eval_needs_lockstep, channels_last=channels_last)
            best_source = None
            for source, m in (("model", val_m), ("ema", ema_m)):
                if m is not None and _improves(m[metric_name], best["value"], metric_name):
                    best = {"top1": m["top1"], "epoch": epoch, "source": source, "metric": metric_name,
                            "value": m[metric_name]}
                    best_source = source
            peak = peak_memory_mb(device)
            row = {"epoch": epoch + 1, "train_loss": train_m["loss"], "img_per_sec": train_m["img_per_sec"],
                   "time": train_m["time"], "lr": train_m["lr"], "peak_mem_mb": peak,
                   "top1": (val_m or {}).get("top1"), "top5": (val_m or {}).get("top5"),
                   "ema_top1": (ema_m or {}).get("top1"), "ema_top5": (ema_m or {}).get("top5")}
            history.append(row)
            session.append(row)
            checkpoint(epoch + 1, 0, None, best_source)
            monitor.epoch(epoch, train_m, val_m, ema_m, train_m["lr"], peak, num_updates_box[0])
            say(_epoch_line(epoch, num_epochs, train_m, val_m, ema_m))
            resume_meter = None
            if epoch + 1 < num_epochs and preempt.should_stop():  # a signal during evaluation
                stopped = _Preempted(epoch + 1, 0)
                break

    best_path = output / BEST_WEIGHTS
    if stopped is not None:
        where = f"epoch {stopped.epoch + 1}, batch {stopped.batches_done}/{len(train_loader)}" if stopped.batches_done \
            else f"the end of epoch {stopped.epoch}"
        say(f"preempted by {preempt.signal_name}: checkpoint {saved_box[0]} written at {where} "
            f"({num_updates_box[0]} updates); rerun the same command with --resume auto to continue")
        monitor.close()
        env.barrier()
        return dict(preempted=True, signal=preempt.signal_name, checkpoint=saved_box[0], epoch=stopped.epoch,
                    batches_done=stopped.batches_done, num_updates=num_updates_box[0], rank=env.rank,
                    world_size=env.world_size, output=output, best_checkpoint=best_path,
                    last_checkpoint=output / LAST_WEIGHTS)

    total_time = time.perf_counter() - run_start
    peak = peak_memory_mb(device)
    rates = [r["img_per_sec"] for r in session]
    summary = {
        "model": args.model, "best_top1": best["top1"],
        "best_epoch": None if best["epoch"] is None else best["epoch"] + 1, "best_source": best["source"],
        "best_metric": metric_name, "best_metric_value": best["value"],
        "epochs_run": num_epochs - start_epoch, "num_updates": num_updates_box[0], "time": total_time,
        "img_per_sec": float(np.median(rates)) if rates else None, "peak_mem_mb": peak,
        "world_size": env.world_size, "global_batch": global_batch, "device": str(device),
        "last": val_m, "last_ema": ema_m, "preempted": False,
    }
    if env.is_primary:
        write_json(_plain(dict(summary, history=history)), output / RUN_SUMMARY)
        if best["top1"] is not None:
            say(f"best val {metric_name} {best['value']:.4g} (top-1 {best['top1']:.2f}, {best['source']}, "
                f"epoch {best['epoch'] + 1})")
        say(f"done: {summary['epochs_run']} epochs in {_fmt_time(total_time)}, "
            + (f"{summary['img_per_sec']:.0f} img/s (median epoch, all ranks), " if rates else "")
            + f"peak memory {peak:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'}, rank 0)")
        say(f"files: best weights {best_path} (also {TIMM_BEST_ALIAS}); resumable state {output / LAST_MANIFEST} "
            f"(--resume auto); {len(manager.step_manifests())} checkpoint set(s) in {manager.dir}")
    monitor.close()
    env.barrier()  # nobody reads the output before rank 0 has written it
    return dict(summary, history=history, rank=env.rank, output=output, best_checkpoint=best_path,
                last_checkpoint=output / LAST_WEIGHTS)


class _Preempted(Exception):
    """Raised from the update hook after the preemption checkpoint: unwinds the epoch loop."""

    def __init__(self, epoch: int, batches_done: int):
        super().__init__(f"preempted at epoch {epoch}, batch {batches_done}")
        self.epoch, self.batches_done = epoch, batches_done


def _improves(value: Optional[float], best: Optional[float], metric: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _init_wandb(args: argparse.Namespace, output: Path, monitor: RunMonitor) -> None:
    """timm's ``--log-wandb``: a wandb run that receives every ``summary.csv`` row (rank 0 only)."""
    if not getattr(args, "log_wandb", False):
        return
    try:
        import wandb
    except ImportError:
        monitor.log("warning: --log-wandb: the wandb package is not installed (pip install wandb); "
                    "metrics go to summary.csv only")
        return
    wandb.init(project=getattr(args, "wandb_project", None), name=output.name, config=_plain(vars(args)),
               tags=getattr(args, "wandb_tags", None) or None,
               resume="must" if getattr(args, "wandb_resume_id", "") else None,
               id=getattr(args, "wandb_resume_id", "") or None)
    monitor.log_wandb = True


def _restore(ckpt: Checkpoint, args: argparse.Namespace, w: Wrapped, optimizer, scaler, model_ema,
             env: DistEnv, say: Callable[[str], None]) -> Dict[str, Any]:
    """Load a checkpoint set into the (wrapped) model, EMA, optimizer and scaler; restore this
    rank's RNG states. Returns ``{"state", "best"}`` with the counters normalised to format 2."""
    loaded = ckpt.load()
    state = loaded["state"]
    trained_as = (state.get("args") or {}).get("model")
    if (trained_as or "").split(".")[0] != args.model.split(".")[0]:
        if not getattr(args, "allow_model_mismatch", False):
            raise InputError(f"--resume {ckpt.path} was written by model {trained_as!r}, not {args.model!r}; "
                             f"pass --model {trained_as}, or --allow-model-mismatch to load it anyway")
        say(f"warning: --allow-model-mismatch: resuming {args.model} from a checkpoint of {trained_as}")
    resume_opt = not getattr(args, "no_resume_opt", False)
    if state["format"] == "linvision.train_state/1":  # epoch-end states before manifests
        state.update(next_epoch=state["epoch"] + 1, batches_done=0)
        optim = state["optimizer"]
        load_full_state(w.bare, None, loaded["weights"], None)
        if resume_opt:
            optimizer.load_state_dict(optim)
    elif resume_opt:
        load_full_state(w.bare, optimizer, loaded["weights"], state["optimizer"])
    else:  # --no-resume-opt: weights and counters only; the optimizer starts afresh
        load_full_state(w.bare, None, loaded["weights"], None)
    if model_ema is not None:
        if loaded["ema"] is not None:
            load_full_model_state(model_ema.module, loaded["ema"])
        else:
            say("warning: the checkpoint has no EMA weights; the EMA restarts from the model weights")
            load_full_model_state(model_ema.module, loaded["weights"])
        gen = _ema_generator(model_ema)
        if gen is not None and state.get("ema_generator") is not None:
            gen.set_state(state["ema_generator"])
    if scaler is not None and state.get("scaler") and resume_opt:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if isinstance(rng, dict):  # format 1: one process
        rng = [rng]
    if len(rng) == env.world_size:
        restore_rng_state(rng[env.rank])
    else:
        say(f"warning: the checkpoint holds RNG states of {len(rng)} processes, this run has {env.world_size}; "
            f"random streams are reseeded")
        random_seed(args.seed + state["num_updates"], env.rank)
    best = state.get("best") or {}
    best = {"top1": best.get("top1"), "epoch": best.get("epoch"), "source": best.get("source", "model"),
            "metric": best.get("metric", "top1"), "value": best.get("value", best.get("top1"))}
    return {"state": state, "best": best}


# ----------------------------------------------------------------------------------------------
# Evaluation program

def _apply_checkpoint_defaults(args: argparse.Namespace, meta: Mapping[str, Any]) -> None:
    """Fill the model/input settings the user left unset from a linvision weights file's metadata."""
    for key in _MODEL_KEYS + ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
        if getattr(args, key, None) in (None, {}) and meta.get(key) is not None:
            setattr(args, key, meta[key])
    if getattr(args, "img_size", None) is None and getattr(args, "input_size", None) is None and meta.get("input_size"):
        args.input_size = list(meta["input_size"])


def _checkpoint_file(path: Path) -> Path:
    """The weights file a ``--checkpoint`` names (a manifest names its ``weights``)."""
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.name.endswith(("_state.pth", ".state.pth")):
        raise InputError(f"{path} is a training-state file without weights; pass "
                         f"{path.parent / BEST_WEIGHTS} or {path.parent / LAST_WEIGHTS}")
    if path.suffix == ".json":
        from .checkpoint import read_json
        try:
            return path.parent / read_json(path)["files"]["weights"]["name"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path} is not a linvision checkpoint manifest: {e}") from e
    return path


def evaluate_checkpoint(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate a checkpoint file, pretrained weights or a fresh model on one split.

    Weights: ``args.checkpoint`` — a linvision ``.safetensors`` (model name, classes and
    preprocessing come from its metadata; ``--use-ema`` takes the ``.ema.safetensors`` beside it)
    or any other ``.pth``/``.safetensors`` (official checkpoints are converted by the model
    family's ``checkpoint_filter_fn``; ``--use-ema``/``--no-use-ema`` pick the EMA or raw
    entry, default: the family's choice) — or ``args.pretrained`` (timm's registry, e.g.
    ``--model mavit_s.<tag> --pretrained``).

    A CUDA out-of-memory error halves the batch size and starts again (down to 1). Under torchrun
    every rank evaluates a share and the metrics are summed.

    Returns:
        :func:`evaluate`'s metrics plus ``"checkpoint"``, ``"weights"`` (the file used),
        ``"model"`` and ``"batch_size"`` (the one that fitted).
    """
    env = init_distributed(getattr(args, "device", None), getattr(args, "dist_backend", None))
    device = env.device
    log = _primary_log(env, log)
    meta: Dict[str, Any] = {}
    weights_file: Optional[Path] = None
    use_ema = getattr(args, "use_ema", None)
    checkpoint: Any = None
    if args.checkpoint:
        weights_file = _checkpoint_file(Path(args.checkpoint))
        if use_ema and weights_file.name.endswith(".safetensors"):
            sibling = ema_sibling(weights_file)
            if sibling.is_file():
                weights_file = sibling
        # Read (and check against any manifest) before anything else: a damaged or unsafe file is
        # reported as such, never as a missing option.
        try:
            checkpoint = load_checkpoint_file(weights_file)
        except CheckpointError as e:
            raise InputError(str(e)) from None
        meta = read_weights_metadata(weights_file) if weights_file.name.endswith(".safetensors") else {}
        if args.model:
            try:
                check_checkpoint_model(weights_file, args.model, allow=bool(getattr(args, "allow_model_mismatch", False)))
            except CheckpointError as e:
                raise InputError(str(e)) from None
        _apply_checkpoint_defaults(args, meta)
        if meta and use_ema and not meta.get("ema"):
            log(f"warning: --use-ema: no EMA weights beside {weights_file} ({ema_sibling(weights_file).name}); "
                f"using the file given")
    if not args.model:
        raise InputError("--model is required (the checkpoint does not name its model)")
    if not args.checkpoint and not args.pretrained:
        log("warning: neither --checkpoint nor --pretrained given: evaluating randomly initialised weights")

    amp_dtype = resolve_amp_dtype(args.amp, device, _arg(args, "amp_dtype", "bfloat16"))
    in_chans = args.in_chans or (args.input_size[0] if getattr(args, "input_size", None) else 3)
    args.in_chans = in_chans
    class_map = {c: i for i, c in enumerate(meta["classes"])} if meta.get("classes") else _class_map(args)
    split = _arg(args, "split", "val")
    source = _dataset_kwargs(argparse.Namespace(**dict(vars(args), class_map=None)))["source_kwargs"]
    datasets, class_to_idx = create_datasets(
        args.data_dir, ("val",), in_chans=in_chans, class_map=class_map, allow_root=True,
        dataset=_arg(args, "dataset", ""), split_names={"val": split}, training_splits=(),
        batch_size=args.batch_size, num_samples={"val": getattr(args, "num_samples", None)},
        download=bool(_arg(args, "dataset_download", False)), source_kwargs=source)
    num_classes = _resolve_num_classes(args.num_classes, class_to_idx)
    if weights_file is not None and meta:
        model = build_model(args, num_classes, pretrained=False)
        try:
            model.load_state_dict(checkpoint, strict=True)
        except RuntimeError as e:
            raise InputError(f"{weights_file} does not fit {args.model} with {num_classes} classes and "
                             f"{in_chans} input channels:\n{e}") from e
    elif weights_file is not None:
        try:
            # The whole container goes to the family's filter (its documented raw/EMA default)
            # unless --use-ema / --no-use-ema chose.
            if use_ema is not None and isinstance(checkpoint, dict):
                checkpoint = unwrap_checkpoint(checkpoint, prefer_ema=use_ema)
            model = build_model(args, num_classes, pretrained=True, pretrained_cfg_overlay=dict(
                state_dict=checkpoint, num_classes=num_classes))
        except (RuntimeError, KeyError, ValueError) as e:
            raise InputError(f"{weights_file} does not fit {args.model} with {num_classes} classes and "
                             f"{in_chans} input channels:\n{e}") from e
    else:
        model = build_model(args, num_classes)
    if getattr(args, "reparam", False):
        from timm.utils.model import reparameterize_model
        model = reparameterize_model(model)
    model.to(device)
    channels_last = bool(_arg(args, "channels_last", False))
    if channels_last:
        to_channels_last(model)
    data_config = resolve_data_config(args, model, use_test_size=not getattr(args, "use_train_size", True))
    compile_mode, compile_backend = compile_settings(args)
    run_model = model if compile_mode is None else torch.compile(
        model, backend=compile_backend, mode=None if compile_mode == "default" else compile_mode)

    batch_size = args.batch_size
    while True:
        loader = build_eval_loader(datasets["val"], data_config, batch_size, args, env)
        try:
            metrics = evaluate(run_model, loader, device, amp_dtype, progress=args.progress and env.is_primary,
                               env=env, channels_last=channels_last)
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            del loader
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"warning: rank {env.rank}: out of memory at batch size {batch_size}; retrying with "
                  f"{batch_size // 2}", flush=True)
            batch_size //= 2
    source = str(args.checkpoint) if args.checkpoint else f"pretrained {args.model}" if args.pretrained else "random init"
    used = str(weights_file) if weights_file is not None else source
    log(f"{args.model} on {metrics['num_images']} images ({split}): top-1 {metrics['top1']:.2f}  "
        f"top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  {metrics['img_per_sec']:.0f} img/s  "
        f"checkpoint {source}" + (f" (weights {Path(used).name})" if weights_file is not None and used != source else ""))
    log(f"throughput: {metrics['img_per_sec']:.1f} img/s end to end (data loading included) at batch size "
        f"{batch_size} x {env.world_size} process(es) on {device}, amp {amp_dtype or 'off'}"
        f"{', channels_last' if channels_last else ''}{', compiled' if run_model is not model else ''}")
    return dict(metrics, checkpoint=source, weights=used, model=args.model, batch_size=batch_size,
                param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                img_size=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                interpolation=data_config["interpolation"])


RESULT_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "loss", "param_count", "img_size", "crop_pct",
                  "interpolation", "img_per_sec", "batch_size", "num_images", "checkpoint", "error")


def evaluate_many(args: argparse.Namespace, jobs: List[tuple], log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """timm ``validate.py``'s bulk mode: :func:`evaluate_checkpoint` for every ``(model, checkpoint)``.

    ``model`` ``None`` takes the name from the checkpoint; ``checkpoint`` ``None`` evaluates the
    model's pretrained weights when ``args.pretrained``, else its random initialisation. A job that
    fails (unknown model, unreadable file, weights that do not fit) gets a row with ``error`` and
    the others go on.

    Returns:
        Rows with :data:`RESULT_COLUMNS`, sorted by top-1 (best first), failed ones last.
    """
    rows = []
    for model_name, checkpoint in jobs:
        job = argparse.Namespace(**vars(args))
        job.model, job.checkpoint = model_name, checkpoint
        label = " ".join(x for x in (model_name, checkpoint) if x)
        try:
            r = evaluate_checkpoint(job, log=log)
        except (InputError, CheckpointError, RuntimeError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log(f"error: {label}: {message}")
            rows.append({"model": model_name, "checkpoint": checkpoint, "error": message})
            continue
        rows.append({"model": r["model"], "top1": r["top1"], "top1_err": round(100 - r["top1"], 4),
                     "top5": r["top5"], "top5_err": round(100 - r["top5"], 4), "loss": round(r["loss"], 6),
                     "param_count": r["param_count"], "img_size": r["img_size"], "crop_pct": r["crop_pct"],
                     "interpolation": r["interpolation"], "img_per_sec": round(r["img_per_sec"], 2),
                     "batch_size": r["batch_size"], "num_images": r["num_images"], "checkpoint": r["weights"]})
    return sorted(rows, key=lambda row: (row.get("top1") is None, -(row.get("top1") or 0.0)))


def write_results(path: os.PathLike, rows: List[Mapping[str, Any]], fmt: str = "csv") -> Path:
    """Write evaluation rows atomically as CSV (:data:`RESULT_COLUMNS`) or JSON (timm's ``--results-file``)."""
    import csv
    import io
    import json
    if fmt == "json":
        text = json.dumps([_plain(dict(r)) for r in rows], indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in RESULT_COLUMNS})
        text = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    from .checkpoint import atomic_write
    return atomic_write(path, write)
